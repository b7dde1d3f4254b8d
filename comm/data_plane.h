// The data-plane factory: which Communicator a rank uses, from --data-plane and how the process
// was started. Launcher-free, every rank resolves `auto` on its own and the coordinator compares
// the resolved names at registration; under mpirun the ranks agree on `auto` over the launcher's
// communicator first (runtime/runtime.cc). Either way a cluster never mixes data planes.
//
//   auto  nccl when this rank computes on a GPU (and the build has NCCL); otherwise mpi under
//         an MPI launcher and gloo without one
//   mpi   Open MPI (needs mpirun, or srun with PMI); host rows
//   gloo  gloo over TCP, bootstrapped through the coordinator's store (no launcher); host rows
//   nccl  NCCL, GPU to GPU (every rank on a GPU); its unique id travels by an MPI broadcast
//         under a launcher and through the coordinator's store without one
#ifndef EPX_COMM_DATA_PLANE_H_
#define EPX_COMM_DATA_PLANE_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "comm/gloo_communicator.h"
#include "comm/key_value_store.h"

namespace epx::comm {

// This process's local rank as a launcher sets it (Open MPI, Slurm, torchrun), or -1.
int LocalRankFromEnvironment();

// The data plane `requested` resolves to: "mpi", "gloo" or "nccl". `on_gpu`: this rank computes
// on a GPU. InvalidArgument for an unknown name or one that cannot work here (mpi without a
// launcher, gloo under one, nccl on the CPU); FailedPrecondition for nccl in a build without it.
absl::StatusOr<std::string> ResolveDataPlane(const std::string& requested, bool launched_by_mpi,
                                             bool on_gpu);

struct DataPlaneOptions {
  std::string name;  // resolved ("mpi", "gloo" or "nccl")
  // gloo: rank, world size, store, host, timeout. nccl: rank, world size, timeout, and the
  // store and prefix its unique id is shared through.
  GlooOptions gloo;
  int cuda_device = 0;  // nccl: this rank's GPU
};

// Creates this rank's communicator; blocks until all ranks joined (see each backend). nccl here
// is the launcher-free form (its id through options.gloo's store); under an MPI launcher it is
// CreateNcclOverLauncher, over the job's MPI communicator.
absl::StatusOr<std::unique_ptr<Communicator>> CreateDataPlane(const DataPlaneOptions& options);

// The NCCL communicator of the ranks of `launcher` (an MPI job), its unique id broadcast over it;
// it keeps `launcher`, through which Abort() ends the whole job.
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclOverLauncher(
    std::unique_ptr<Communicator> launcher, int cuda_device, absl::Duration timeout);

// The NCCL unique id every rank needs, from rank 0's `new_id`:
//   through `store` under prefix + "nccl-unique-id" (rank 0 publishes it, the others wait for it
//   up to `timeout`), or
//   over `comm` (a broadcast from rank 0; rank 0's failure to draw one reaches every rank as an
//   empty id, refused with a message).
using NewIdFn = std::function<absl::StatusOr<std::string>()>;
absl::StatusOr<std::string> ShareNcclUniqueId(KeyValueStore& store, const std::string& prefix,
                                              int rank, absl::Duration timeout,
                                              const NewIdFn& new_id);
absl::StatusOr<std::string> BroadcastNcclUniqueId(Communicator& comm, absl::Duration timeout,
                                                  const NewIdFn& new_id);

}  // namespace epx::comm

#endif  // EPX_COMM_DATA_PLANE_H_
