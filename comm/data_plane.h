// The data-plane factory: which Communicator a rank uses, from --data-plane and how the process
// was started. Every rank resolves `auto` on its own; the coordinator then compares the resolved
// names at registration, so a cluster never mixes data planes.
//
//   auto  mpi under an MPI launcher, gloo otherwise (TCP, CPU rows)
//   mpi   Open MPI (needs mpirun, or srun with PMI)
//   gloo  gloo over TCP, bootstrapped through the coordinator's store (no launcher)
//   nccl  GPU to GPU (not available in this version)
#ifndef EPX_COMM_DATA_PLANE_H_
#define EPX_COMM_DATA_PLANE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "comm/gloo_communicator.h"

namespace epx::comm {

// The data plane `requested` resolves to: "mpi" or "gloo". InvalidArgument for an unknown name
// or one that cannot work here (mpi without a launcher, gloo under one); Unimplemented for nccl.
absl::StatusOr<std::string> ResolveDataPlane(const std::string& requested, bool launched_by_mpi);

struct DataPlaneOptions {
  std::string name;  // resolved ("mpi" or "gloo")
  GlooOptions gloo;  // gloo: rank, world size, store, host, timeout
};

// Creates this rank's communicator; blocks until all ranks joined (see each backend).
absl::StatusOr<std::unique_ptr<Communicator>> CreateDataPlane(const DataPlaneOptions& options);

}  // namespace epx::comm

#endif  // EPX_COMM_DATA_PLANE_H_
