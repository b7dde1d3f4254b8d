#include "comm/protocol.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace epx::comm {

absl::Status VerifyHellos(const std::vector<Hello>& hellos) {
  if (hellos.empty()) return absl::InvalidArgumentError("no ranks");
  const Hello& root = hellos[0];
  auto build = [](const Hello& h) {
    return std::string(h.build, strnlen(h.build, sizeof(h.build)));
  };
  for (size_t r = 0; r < hellos.size(); ++r) {
    const Hello& h = hellos[r];
    const Role expected = r == 0 ? Role::kCoordinator : Role::kWorker;
    if (h.role != expected)
      return absl::FailedPreconditionError(absl::StrCat(
          "rank ", r, " started as ", h.role == Role::kCoordinator ? "coordinator" : "worker",
          " but rank 0 must be the coordinator and ranks 1.. the workers"));
    if (build(h) != build(root))
      return absl::FailedPreconditionError(
          absl::StrCat("rank ", r, " runs build ", build(h), " but rank 0 runs ", build(root)));
    if (h.config_hash != root.config_hash)
      return absl::FailedPreconditionError(absl::StrCat(
          "rank ", r, " loaded a model config that differs from rank 0's (config hash ",
          h.config_hash, " vs ", root.config_hash, "): every rank must read the same config.json"));
    if (h.placement_hash != root.placement_hash)
      return absl::FailedPreconditionError(
          absl::StrCat("rank ", r,
                       " computed a different expert placement than rank 0: every rank must get "
                       "the same --placement"));
    if (h.world_size != root.world_size)
      return absl::FailedPreconditionError(absl::StrCat("rank ", r, " sees ", h.world_size,
                                                        " ranks, rank 0 sees ", root.world_size));
  }
  return absl::OkStatus();
}

}  // namespace epx::comm
