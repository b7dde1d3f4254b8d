// Built instead of gloo_communicator.cc when gloo is not found: the same API, answering that
// this build has no gloo data plane.
#include "comm/gloo_communicator.h"

namespace epx::comm {

absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(const GlooOptions&) {
  return absl::UnimplementedError(
      "this epx was built without gloo (install libgloo-dev and rebuild), so a cluster without "
      "mpirun has no data plane");
}

}  // namespace epx::comm
