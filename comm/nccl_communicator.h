// The NCCL backend: GPU to GPU over NVLink, InfiniBand or sockets, one GPU per rank.
//
// The per-layer exchanges run on device memory on the caller's stream (device(): grouped
// ncclSend/ncclRecv, as NCCL has no all-to-allv), so a GPU coordinator's rows reach a GPU
// worker without touching the host. The host calls of Communicator (start-up handshake, step
// headers, the ready report) are staged through pinned memory and a stream of the
// communicator's own; they are small and once per step.
//
// The communicator is non-blocking (ncclConfig_t.blocking = 0): init and every group return at
// once, and every wait goes through the watchdog (comm/watchdog.h), which polls the stream and
// ncclCommGetAsyncError and, past the deadline or on an error, calls ncclCommAbort (never
// ncclCommDestroy with a dead peer) and reports Unavailable naming the ranks waited on. NCCL
// errors become Status with the call and file:line. Interrupt() (from another thread) makes the
// wait in progress fail the same way: a peer that left for a re-formed data plane does not end
// an NCCL wait on it, so a worker's control plane, told so, does (runtime/runtime.h).
//
// The unique id reaches the ranks through the launcher (an MPI broadcast) or the coordinator's
// rendezvous store (comm/data_plane.h). A build without CUDA or NCCL links nccl_unavailable.cc,
// whose every call says "built without NCCL".
//
// Thread-compatible: one thread per communicator.
#ifndef EPX_COMM_NCCL_COMMUNICATOR_H_
#define EPX_COMM_NCCL_COMMUNICATOR_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/communicator.h"

namespace epx::comm {

// Whether this build has the NCCL data plane.
bool NcclBuilt();

// A new NCCL unique id (rank 0 draws it; it names rank 0's bootstrap socket), as bytes.
absl::StatusOr<std::string> NewNcclUniqueId();

struct NcclOptions {
  int rank = 0;
  int world_size = 1;
  std::string unique_id;  // from rank 0's NewNcclUniqueId()
  int cuda_device = 0;    // this rank's GPU (made current)
  // Limit on init (every rank must have joined) and on each host call and enqueue.
  absl::Duration timeout = absl::Seconds(30);
  // The launcher's communicator the id came over (MPI), kept so that Abort() ends the whole job
  // through it; null without a launcher (Abort ends this process, and the peers notice).
  std::unique_ptr<Communicator> launcher;
};

// Joins the NCCL communicator (blocks until every rank joined, or `timeout`). Errors:
// FailedPrecondition without a device or NCCL, InvalidArgument for bad options, Unavailable
// for a rank that did not join or an NCCL failure.
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(NcclOptions options);

}  // namespace epx::comm

#endif  // EPX_COMM_NCCL_COMMUNICATOR_H_
