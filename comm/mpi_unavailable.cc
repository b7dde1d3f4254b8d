// Built instead of mpi_communicator.cc when MPI is not found: the same API, answering that this
// build cannot join an MPI job.
#include <cstdlib>

#include "comm/mpi_communicator.h"

namespace epx::comm {

absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator(int*, char***) {
  return absl::UnimplementedError(
      "this epx was built without MPI (install libopenmpi-dev and rebuild) but was started by an "
      "MPI launcher");
}

}  // namespace epx::comm
