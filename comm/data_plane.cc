#include "comm/data_plane.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "comm/mpi_communicator.h"
#include "comm/nccl_communicator.h"
#include "common/status.h"

namespace epx::comm {
namespace {

// The id's size travels first (fixed: 128 bytes in NCCL 2.x) so a rank that failed to draw one
// can say so with a 0.
constexpr int64_t kMaxIdBytes = 1024;

}  // namespace

int LocalRankFromEnvironment() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"}) {
    const char* value = std::getenv(name);
    int rank = -1;
    if (value != nullptr && absl::SimpleAtoi(value, &rank) && rank >= 0) return rank;
  }
  return -1;
}

absl::StatusOr<std::string> ResolveDataPlane(const std::string& requested, bool launched_by_mpi,
                                             bool on_gpu) {
  if (requested == "auto") {
    if (on_gpu && NcclBuilt()) return std::string("nccl");
    return std::string(launched_by_mpi ? "mpi" : "gloo");
  }
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
  if (requested == "nccl") {
    if (!on_gpu)
      return absl::InvalidArgumentError(
          "--data-plane nccl moves rows between GPUs, and this rank computes on the CPU: add "
          "--device cuda, or use --data-plane auto");
    if (!NcclBuilt())
      return absl::FailedPreconditionError(
          "--data-plane nccl: this epx was built without NCCL (it needs the CUDA toolkit with "
          "NCCL); use --data-plane auto");
    return requested;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "--data-plane must be auto, mpi, gloo or nccl, got \"", requested, "\""));
}

absl::StatusOr<std::string> ShareNcclUniqueId(KeyValueStore& store, const std::string& prefix,
                                              int rank, absl::Duration timeout,
                                              const NewIdFn& new_id) {
  const std::string key = prefix + "nccl-unique-id";
  if (rank == 0) {
    EPX_ASSIGN_OR_RETURN(std::string id, new_id());
    EPX_RETURN_IF_ERROR(store.Set(key, id));
    return id;
  }
  absl::StatusOr<std::string> id = store.Get(key, timeout);
  if (!id.ok())
    return absl::Status(id.status().code(),
                        absl::StrCat("the NCCL unique id from the coordinator (", key,
                                     "): ", id.status().message()));
  if (id->empty() || static_cast<int64_t>(id->size()) > kMaxIdBytes)
    return absl::InternalError(absl::StrCat("the coordinator's NCCL unique id has ", id->size(),
                                            " bytes"));
  return id;
}

absl::StatusOr<std::string> BroadcastNcclUniqueId(Communicator& comm, absl::Duration timeout,
                                                  const NewIdFn& new_id) {
  std::string id;
  absl::Status drawn = absl::OkStatus();
  if (comm.rank() == 0) {
    absl::StatusOr<std::string> got = new_id();
    if (got.ok() && !got->empty() && static_cast<int64_t>(got->size()) <= kMaxIdBytes)
      id = *std::move(got);
    else
      drawn = got.ok() ? absl::InternalError("an empty NCCL unique id") : got.status();
  }
  // Every rank takes part even when rank 0 failed, so that all stop with its reason.
  int64_t bytes = static_cast<int64_t>(id.size());
  EPX_RETURN_IF_ERROR(
      comm.Broadcast(&bytes, sizeof(bytes), 0, Tag::kHandshake, timeout, "NCCL unique id size"));
  if (bytes <= 0 || bytes > kMaxIdBytes) {
    if (!drawn.ok()) return drawn;
    return absl::UnavailableError(
        "rank 0 could not draw an NCCL unique id (see its log): no NCCL data plane");
  }
  id.resize(static_cast<size_t>(bytes));
  EPX_RETURN_IF_ERROR(
      comm.Broadcast(id.data(), bytes, 0, Tag::kHandshake, timeout, "NCCL unique id"));
  return id;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclOverLauncher(
    std::unique_ptr<Communicator> launcher, int cuda_device, absl::Duration timeout) {
  NcclOptions nccl;
  nccl.cuda_device = cuda_device;
  nccl.timeout = timeout;
  nccl.rank = launcher->rank();
  nccl.world_size = launcher->world_size();
  EPX_ASSIGN_OR_RETURN(nccl.unique_id, BroadcastNcclUniqueId(*launcher, timeout, NewNcclUniqueId));
  nccl.launcher = std::move(launcher);
  return CreateNcclCommunicator(std::move(nccl));
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateDataPlane(const DataPlaneOptions& options) {
  if (options.name == "mpi") return CreateMpiCommunicator(nullptr, nullptr);
  if (options.name == "gloo") return CreateGlooCommunicator(options.gloo);
  if (options.name == "nccl") {
    if (options.gloo.store == nullptr)
      return absl::InvalidArgumentError(
          "the NCCL data plane without a launcher needs a store (under mpirun: "
          "CreateNcclOverLauncher)");
    NcclOptions nccl;
    nccl.rank = options.gloo.rank;
    nccl.world_size = options.gloo.world_size;
    nccl.cuda_device = options.cuda_device;
    nccl.timeout = options.gloo.connect_timeout;
    EPX_ASSIGN_OR_RETURN(nccl.unique_id,
                         ShareNcclUniqueId(*options.gloo.store, options.gloo.store_prefix,
                                           nccl.rank, nccl.timeout, NewNcclUniqueId));
    return CreateNcclCommunicator(std::move(nccl));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("no data plane named \"", options.name, "\" (resolve it first)"));
}

}  // namespace epx::comm
