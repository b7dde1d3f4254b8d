// The device half of a data plane whose rows live in GPU memory (NCCL): exchanges queued on the
// caller's stream, with no host round trip for the bytes, and a wait that cannot hang on a dead
// peer. A Communicator that has one returns it from Communicator::device(); its host calls
// (the start-up handshake, the step headers) keep working, staged through the device.
//
// Ordering: the host calls and the device exchanges share one communicator, so a rank issues a
// host call only when its device exchanges so far are done (waited on with Synchronize); every
// rank issues the same sequence of calls.
#ifndef EPX_COMM_DEVICE_COMMUNICATOR_H_
#define EPX_COMM_DEVICE_COMMUNICATOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

struct CUstream_st;  // cudaStream_t

namespace epx::comm {

class DeviceCommunicator {
 public:
  virtual ~DeviceCommunicator() = default;

  // One point-to-point transfer of `bytes` bytes of device memory at `data`, to or from `peer`.
  struct Transfer {
    bool is_send = false;
    int peer = 0;
    void* data = nullptr;
    int64_t bytes = 0;
  };
  // Queues `transfers` on `stream` as one group (zero-byte ones post nothing; several to one
  // peer and direction are matched in order). Returns once queued; the bytes are there when the
  // stream reaches this point. A peer's matching transfers must be queued by it in the same
  // order of groups.
  virtual absl::Status Post(absl::Span<const Transfer> transfers, CUstream_st* stream,
                            const std::string& what) = 0;

  // Blocks until the work queued on `stream` so far is done. A peer that does not answer within
  // `timeout` (absl::InfiniteDuration(): wait forever, still watching for errors), or an
  // asynchronous error of the communicator, aborts the communicator and is Unavailable naming
  // `peers` (the ranks this work waits on) and `what`.
  virtual absl::Status Synchronize(CUstream_st* stream, absl::Duration timeout,
                                   const std::vector<int>& peers, const std::string& what) = 0;
};

}  // namespace epx::comm

#endif  // EPX_COMM_DEVICE_COMMUNICATOR_H_
