// The data plane between the coordinator (rank 0) and the expert workers (ranks 1..W).
//
// A Communicator connects `world_size()` ranks. Every call is collective over all ranks unless
// it says otherwise, blocks until this rank's part is done, and returns a Status instead of
// hanging: a peer that does not answer within `timeout` makes the call return DeadlineExceeded
// naming the peer ranks that did not answer; a peer known to be gone is Unavailable. After a
// failed call the communicator is unusable; the caller reports and calls Abort().
//
// Backends: MPI (comm/mpi_communicator.h), gloo (comm/gloo_communicator.h), NCCL
// (comm/nccl_communicator.h, which also exchanges device rows: device()), in-process threads
// (comm/inproc_communicator.h, for tests). Thread-compatible: one thread per rank object.
#ifndef EPX_COMM_COMMUNICATOR_H_
#define EPX_COMM_COMMUNICATOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace epx::comm {

class DeviceCommunicator;  // comm/device_communicator.h

// Message kinds; each exchange uses its own tag so that messages of different kinds never match.
enum class Tag : int {
  kHandshake = 1,
  kStepHeader = 2,
  kCounts = 3,
  kDispatch = 4,
  kCombine = 5,
  kReady = 6,
  kControlPlane = 7,
};
const char* TagName(Tag tag);

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;

  // Sends send_bytes[p] bytes to each rank p (laid out back to back in `send`, in rank order)
  // and receives recv_bytes[p] bytes from each rank p into `recv` (same layout). Both sides must
  // agree on every size; zero-byte entries send nothing. `what` names the exchange in errors
  // (e.g. "layer 3 dispatch").
  virtual absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_bytes, void* recv,
                                 absl::Span<const int64_t> recv_bytes, Tag tag,
                                 absl::Duration timeout, const std::string& what) = 0;

  // `bytes` bytes from `root` into `data` on every rank. timeout = absl::InfiniteDuration() waits
  // forever (a worker idling for the next step).
  virtual absl::Status Broadcast(void* data, int64_t bytes, int root, Tag tag,
                                 absl::Duration timeout, const std::string& what) = 0;

  // Every rank's `bytes` bytes, in rank order, into `recv` (world_size * bytes) on every rank.
  virtual absl::Status AllGather(const void* send, int64_t bytes, void* recv, Tag tag,
                                 absl::Duration timeout, const std::string& what) = 0;

  // The exchanges over device memory, for a data plane that has them (NCCL); nullptr for the
  // host-only backends.
  virtual DeviceCommunicator* device() { return nullptr; }

  // The peers a failed call found gone or silent, ascending (empty before any failure, or where
  // the backend cannot tell). What a cluster that survives a lost worker drops.
  virtual std::vector<int> failed_peers() const { return {}; }

  // Thread-safe, from any thread: ends the wait in progress (or the next one) with Unavailable;
  // the communicator is unusable after it. For a backend whose waits a peer's leaving does not
  // end (NCCL: a rank may wait on a peer that left its communicator without a word); on gloo
  // and MPI, where a peer closing its end ends the wait, it does nothing. A worker whose
  // coordinator re-forms the data plane after a failure calls it.
  virtual void Interrupt() {}

  // Ends the whole job (all ranks) with `code`. Not collective; does not return for MPI.
  virtual void Abort(int code, const std::string& message) = 0;
};

}  // namespace epx::comm

#endif  // EPX_COMM_COMMUNICATOR_H_
