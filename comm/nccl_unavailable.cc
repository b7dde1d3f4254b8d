// Built instead of nccl_communicator.cc when CUDA or NCCL is not found: the same API, answering
// that this build has no NCCL data plane.
#include "comm/nccl_communicator.h"

namespace epx::comm {
namespace {

absl::Status NoNccl() {
  return absl::FailedPreconditionError(
      "this epx was built without NCCL (it needs the CUDA toolkit with NCCL; rebuild with "
      "-DEPX_ENABLE_NCCL=ON), so it has no --data-plane nccl: use gloo or mpi");
}

}  // namespace

bool NcclBuilt() { return false; }

absl::StatusOr<std::string> NewNcclUniqueId() { return NoNccl(); }

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(NcclOptions) {
  return NoNccl();
}

}  // namespace epx::comm
