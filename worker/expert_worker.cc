#include "worker/expert_worker.h"

#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/protocol.h"
#include "common/status.h"
#include "common/stopwatch.h"
#include "kernels/cpu/ops.h"

namespace epx {

absl::Status RunExpertWorker(comm::Communicator* comm, const ModelWeights& weights,
                             const Placement& placement, const ExpertWorkerOptions& options) {
  const ModelConfig& c = weights.config();
  const int rank = comm->rank(), world = comm->world_size();
  const std::vector<int>& local = placement.experts_of(rank);
  for (int e : local) {
    if (!weights.layer(0).experts[e].loaded())
      return absl::FailedPreconditionError(
          absl::StrCat("worker rank ", rank, " does not hold expert ", e, " of its placement"));
  }
  const int64_t hidden = c.hidden_size;
  std::vector<int64_t> counts(local.size());
  std::vector<int64_t> count_bytes(world, 0), row_bytes(world, 0), back_bytes(world, 0),
      none(world, 0);
  count_bytes[0] = static_cast<int64_t>(local.size() * sizeof(int64_t));
  std::vector<float> rows, out, scratch;

  while (true) {
    comm::StepHeader header;
    EPX_RETURN_IF_ERROR(comm->Broadcast(&header, sizeof(header), 0, comm::Tag::kStepHeader,
                                        options.timeout, "waiting for the next step"));
    if (header.kind == comm::StepKind::kShutdown) return absl::OkStatus();
    if (header.kind != comm::StepKind::kForward)
      return absl::InternalError(absl::StrCat("unknown step kind ", static_cast<int>(header.kind)));
    for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
      EPX_RETURN_IF_ERROR(comm->AllToAllV(nullptr, none, counts.data(), count_bytes,
                                          comm::Tag::kCounts, options.timeout,
                                          absl::StrCat("layer ", layer, " counts")));
      int64_t n = 0;
      for (int64_t k : counts) n += k;
      row_bytes[0] = n * hidden * static_cast<int64_t>(sizeof(float));
      rows.resize(n * hidden);
      EPX_RETURN_IF_ERROR(comm->AllToAllV(nullptr, none, rows.data(), row_bytes,
                                          comm::Tag::kDispatch, options.timeout,
                                          absl::StrCat("layer ", layer, " dispatch")));
      const Stopwatch watch;
      // The outputs, then the compute time, in one buffer.
      out.resize(n * hidden + (sizeof(double) + sizeof(float) - 1) / sizeof(float));
      int64_t begin = 0;
      for (size_t i = 0; i < local.size(); ++i) {
        const int64_t m = counts[i];
        if (m == 0) continue;
        const ExpertWeights& ew = weights.layer(static_cast<int>(layer)).experts[local[i]];
        if (static_cast<int64_t>(scratch.size()) < cpu::SwiGluScratchFloats(m, c.intermediate_size))
          scratch.resize(cpu::SwiGluScratchFloats(m, c.intermediate_size));
        EPX_RETURN_IF_ERROR(
            cpu::SwiGluExpert(TensorView(rows.data() + begin * hidden, DType::kF32, {m, hidden}),
                              ew.w1, ew.w2, ew.w3, absl::MakeSpan(scratch),
                              TensorView(out.data() + begin * hidden, DType::kF32, {m, hidden})));
        begin += m;
      }
      const double compute_us = watch.Micros();
      std::memcpy(out.data() + n * hidden, &compute_us, sizeof(double));
      back_bytes[0] = row_bytes[0] + static_cast<int64_t>(sizeof(double));
      EPX_RETURN_IF_ERROR(comm->AllToAllV(out.data(), back_bytes, nullptr, none,
                                          comm::Tag::kCombine, options.timeout,
                                          absl::StrCat("layer ", layer, " combine")));
    }
  }
}

}  // namespace epx
