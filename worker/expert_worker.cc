#include "worker/expert_worker.h"

#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/protocol.h"
#include "common/status.h"
#include "common/stopwatch.h"

namespace epx {

absl::Status RunExpertWorker(comm::Communicator* comm, const ModelWeights& weights,
                             const Placement& placement, const ExpertWorkerOptions& options) {
  const ModelConfig& c = weights.config();
  const int rank = comm->rank(), world = comm->world_size();
  const std::vector<int>& local = placement.experts_of(rank);
  EPX_ASSIGN_OR_RETURN(std::unique_ptr<ExpertCompute> compute,
                       NewExpertCompute(weights, local, options.compute));
  const int64_t hidden = c.hidden_size;
  std::vector<int64_t> counts(local.size()), offsets(local.size() + 1, 0);
  std::vector<int64_t> count_bytes(world, 0), row_bytes(world, 0), back_bytes(world, 0),
      none(world, 0);
  count_bytes[0] = static_cast<int64_t>(local.size() * sizeof(int64_t));
  std::vector<float> rows, out;

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
      for (size_t i = 0; i < counts.size(); ++i) offsets[i + 1] = offsets[i] + counts[i];
      const int64_t n = offsets.back();
      row_bytes[0] = n * hidden * static_cast<int64_t>(sizeof(float));
      rows.resize(n * hidden);
      EPX_RETURN_IF_ERROR(comm->AllToAllV(nullptr, none, rows.data(), row_bytes,
                                          comm::Tag::kDispatch, options.timeout,
                                          absl::StrCat("layer ", layer, " dispatch")));
      const Stopwatch watch;
      // The outputs, then the compute time, in one buffer.
      out.resize(n * hidden + (sizeof(double) + sizeof(float) - 1) / sizeof(float));
      EPX_RETURN_IF_ERROR(compute->Run(layer, TensorView(rows.data(), DType::kF32, {n, hidden}),
                                       offsets, TensorView(out.data(), DType::kF32, {n, hidden})));
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
