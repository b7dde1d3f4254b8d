#include "comm/protocol.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace epx::comm {

absl::Status VerifyHellos(const std::vector<Hello>& hellos) {
  if (hellos.empty()) return absl::InvalidArgumentError("no ranks");
  std::vector<StartupReport> reports;
  for (const Hello& h : hellos) reports.push_back(h.setup);
  EPX_RETURN_IF_ERROR(VerifyReports(reports, "start-up"));
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

StartupReport MakeReport(const absl::Status& status) {
  StartupReport r;
  r.code = static_cast<int32_t>(status.code());
  const std::string text(status.message());
  std::strncpy(r.error, text.c_str(), sizeof(r.error) - 1);
  return r;
}

absl::Status VerifyReports(const std::vector<StartupReport>& reports, const std::string& stage) {
  for (size_t r = 0; r < reports.size(); ++r) {
    if (reports[r].code != 0)
      return absl::Status(
          static_cast<absl::StatusCode>(reports[r].code),
          absl::StrCat("rank ", r, " failed at ", stage, ": ",
                       std::string(reports[r].error,
                                   strnlen(reports[r].error, sizeof(reports[r].error)))));
  }
  return absl::OkStatus();
}

DispatchPlan PlanDispatch(absl::Span<const int64_t> group_base,
                          absl::Span<const int64_t> group_offsets) {
  const size_t world = group_base.size() - 1;
  DispatchPlan plan{std::vector<int64_t>(world, 0), std::vector<int64_t>(world, 0)};
  for (size_t w = 1; w < world; ++w) {
    plan.first[w] = group_offsets[group_base[w]];
    plan.rows[w] = group_offsets[group_base[w + 1]] - plan.first[w];
  }
  return plan;
}

absl::StatusOr<std::vector<int64_t>> LocalOffsets(absl::Span<const int32_t> slice) {
  if (slice.empty()) return absl::InternalError("an empty offsets message");
  std::vector<int64_t> local(slice.size(), 0);
  for (size_t i = 0; i < slice.size(); ++i) {
    if (slice[i] < slice[0] || (i > 0 && slice[i] < slice[i - 1]) || slice[0] < 0)
      return absl::InternalError(absl::StrCat("offsets from the coordinator that decrease: ",
                                              slice[i], " at ", i));
    local[i] = int64_t{slice[i]} - slice[0];
  }
  return local;
}

void GrowPayload(std::vector<float>* payload, int64_t bytes) {
  const size_t floats = static_cast<size_t>((bytes + 3) / 4);
  if (payload->size() < floats) payload->resize(floats);
}

absl::StatusOr<ExpertWire> ExpertWire::Create(int64_t hidden, DType activation) {
  if (activation != DType::kF32 && activation != DType::kBF16)
    return absl::InvalidArgumentError(absl::StrCat("expert rows travel as F32 or BF16, not ",
                                                   DTypeName(activation)));
  if (hidden < 1) return absl::InvalidArgumentError(absl::StrCat("hidden size ", hidden));
  return ExpertWire(hidden, activation);
}

// The time follows rows of 2- or 4-byte elements, so it may sit off an 8-byte boundary.
void ExpertWire::SetComputeMicros(void* combine_payload, int64_t rows, double us) const {
  std::memcpy(static_cast<uint8_t*>(combine_payload) + RowBytes(rows), &us, sizeof(us));
}

double ExpertWire::ComputeMicros(const void* combine_payload, int64_t rows) const {
  double us = 0;
  std::memcpy(&us, static_cast<const uint8_t*>(combine_payload) + RowBytes(rows), sizeof(us));
  return us;
}

}  // namespace epx::comm
