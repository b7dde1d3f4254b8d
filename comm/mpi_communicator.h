// The MPI backend of Communicator (Open MPI). Exchanges are non-blocking point-to-point messages
// polled against a deadline, so that a rank that stops answering is reported by name instead of
// hanging a blocking collective. MPI errors are returned (MPI_ERRORS_RETURN), not fatal.
//
// One MpiCommunicator per process; it initialises MPI on Create and finalises it on destruction.
#ifndef EPX_COMM_MPI_COMMUNICATOR_H_
#define EPX_COMM_MPI_COMMUNICATOR_H_

#include <memory>

#include "absl/status/statusor.h"
#include "comm/communicator.h"

namespace epx::comm {

// True when this process was started by an MPI launcher (mpirun/mpiexec/srun with PMI).
bool LaunchedByMpi();

// Initialises MPI (MPI_THREAD_FUNNELED) and returns the world communicator.
absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator(int* argc, char*** argv);

}  // namespace epx::comm

#endif  // EPX_COMM_MPI_COMMUNICATOR_H_
