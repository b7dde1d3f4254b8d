#include "comm/data_plane.h"

#include "absl/strings/str_cat.h"
#include "comm/mpi_communicator.h"

namespace epx::comm {

absl::StatusOr<std::string> ResolveDataPlane(const std::string& requested, bool launched_by_mpi) {
  if (requested == "auto") return std::string(launched_by_mpi ? "mpi" : "gloo");
  if (requested == "mpi") {
    if (!launched_by_mpi)
      return absl::InvalidArgumentError(
          "--data-plane mpi needs an MPI launcher (mpirun, or srun with PMI); a cluster started "
          "without one uses --data-plane gloo");
    return requested;
  }
  if (requested == "gloo") {
    if (launched_by_mpi)
      return absl::InvalidArgumentError(
          "--data-plane gloo forms a cluster without a launcher (epx worker --coordinator ...); "
          "under mpirun use --data-plane mpi or auto");
    return requested;
  }
  if (requested == "nccl")
    return absl::UnimplementedError(
        "--data-plane nccl is not available in this version of epx: use gloo (no launcher) or mpi "
        "(under mpirun)");
  return absl::InvalidArgumentError(absl::StrCat(
      "--data-plane must be auto, mpi, gloo or nccl, got \"", requested, "\""));
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateDataPlane(const DataPlaneOptions& options) {
  if (options.name == "mpi") return CreateMpiCommunicator(nullptr, nullptr);
  if (options.name == "gloo") return CreateGlooCommunicator(options.gloo);
  return absl::InvalidArgumentError(
      absl::StrCat("no data plane named \"", options.name, "\" (resolve it first)"));
}

}  // namespace epx::comm
