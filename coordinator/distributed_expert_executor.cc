#include "coordinator/distributed_expert_executor.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "comm/protocol.h"
#include "common/status.h"
#include "common/stopwatch.h"

namespace epx {
DistributedExpertExecutor::DistributedExpertExecutor(const ModelConfig& config,
                                                     const Placement& placement,
                                                     comm::Communicator* comm,
                                                     absl::Duration timeout)
    : config_(config),
      placement_(placement),
      comm_(comm),
      timeout_(timeout),
      layers_done_(config.num_hidden_layers) {
  EPX_CHECK(comm_->rank() == 0 && placement_.num_workers() == comm_->world_size() - 1);
  const int64_t layers = config_.num_hidden_layers;
  stats_.dispatch_us.assign(layers, 0);
  stats_.expert_us.assign(layers, 0);
  stats_.combine_us.assign(layers, 0);
  stats_.worker_tokens.assign(comm_->world_size(), 0);
}

absl::Status DistributedExpertExecutor::BeginStep() {
  if (shut_down_) return absl::FailedPreconditionError("the expert workers were shut down");
  if (in_step()) return absl::FailedPreconditionError("the previous step did not finish");
  layers_done_ = 0;
  comm::StepHeader header{comm::StepKind::kForward, 0, step_++};
  return comm_->Broadcast(&header, sizeof(header), 0, comm::Tag::kStepHeader, timeout_,
                          absl::StrCat("step ", header.step, " header"));
}

absl::Status DistributedExpertExecutor::Shutdown() {
  if (shut_down_) return absl::OkStatus();
  shut_down_ = true;
  comm::StepHeader header{comm::StepKind::kShutdown, 0, step_};
  return comm_->Broadcast(&header, sizeof(header), 0, comm::Tag::kStepHeader, timeout_, "shutdown");
}

absl::Status DistributedExpertExecutor::Run(int layer, const TensorView& x,
                                            const TensorView& topk_ids,
                                            const TensorView& slot_out) {
  const int world = comm_->world_size();
  const int64_t hidden = config_.hidden_size, num_experts = config_.num_local_experts;
  const int64_t num_slots = topk_ids.numel(), num_topk = topk_ids.dim(1);
  const int32_t* ids = topk_ids.data<const int32_t>();

  // Destination of every slot: the expert's replica chosen by the slot's index within the
  // expert's group (slots ascend), then (worker, local expert, slot) order in the send buffer.
  std::vector<int64_t> seen(num_experts, 0);
  std::vector<std::vector<std::vector<int64_t>>> rows(world);  // [rank][local expert] -> slots
  for (int w = 1; w < world; ++w) rows[w].resize(placement_.experts_of(w).size());
  for (int64_t s = 0; s < num_slots; ++s) {
    const int32_t e = ids[s];
    if (e < 0 || e >= num_experts)
      return absl::InternalError(absl::StrCat("layer ", layer, ": routed to expert ", e));
    // Rotating the first replica with the step and layer spreads even one-row decode steps over
    // all replicas; any deterministic choice gives the same results.
    const std::vector<int>& replicas = placement_.replicas(e);
    const int w = replicas[(seen[e]++ + step_ + layer) % replicas.size()];
    rows[w][placement_.LocalIndex(w, e)].push_back(s);
  }

  // Counts.
  std::vector<int64_t> counts_send, count_bytes(world, 0), no_bytes(world, 0);
  for (int w = 1; w < world; ++w) {
    for (const auto& local : rows[w]) counts_send.push_back(static_cast<int64_t>(local.size()));
    count_bytes[w] = static_cast<int64_t>(rows[w].size() * sizeof(int64_t));
  }
  Stopwatch watch;
  EPX_RETURN_IF_ERROR(comm_->AllToAllV(counts_send.data(), count_bytes, nullptr, no_bytes,
                                       comm::Tag::kCounts, timeout_,
                                       absl::StrCat("layer ", layer, " counts")));

  // Rows out, in (worker, local expert, slot) order.
  order_.clear();
  std::vector<int64_t> row_bytes(world, 0), back_bytes(world, 0);
  for (int w = 1; w < world; ++w) {
    int64_t n = 0;
    for (const auto& local : rows[w]) {
      order_.insert(order_.end(), local.begin(), local.end());
      n += static_cast<int64_t>(local.size());
    }
    row_bytes[w] = n * hidden * static_cast<int64_t>(sizeof(float));
    back_bytes[w] = row_bytes[w] + static_cast<int64_t>(sizeof(double));
    stats_.worker_tokens[w] += n;
  }
  send_.resize(order_.size() * hidden);
  for (size_t r = 0; r < order_.size(); ++r)
    std::memcpy(send_.data() + r * hidden, x.data<const float>() + (order_[r] / num_topk) * hidden,
                hidden * sizeof(float));
  EPX_RETURN_IF_ERROR(comm_->AllToAllV(send_.data(), row_bytes, nullptr, no_bytes,
                                       comm::Tag::kDispatch, timeout_,
                                       absl::StrCat("layer ", layer, " dispatch")));
  stats_.dispatch_us[layer] += watch.Micros();

  // Outputs back, each worker's block followed by its compute time.
  watch.Restart();
  int64_t total_back = 0;
  for (int w = 0; w < world; ++w) total_back += back_bytes[w];
  recv_.resize((total_back + sizeof(float) - 1) / sizeof(float));
  EPX_RETURN_IF_ERROR(comm_->AllToAllV(nullptr, no_bytes, recv_.data(), back_bytes,
                                       comm::Tag::kCombine, timeout_,
                                       absl::StrCat("layer ", layer, " combine")));
  const double wall_us = watch.Micros();
  double slowest_us = 0;
  const auto* bytes = reinterpret_cast<const uint8_t*>(recv_.data());
  size_t r = 0;
  int64_t offset = 0;
  for (int w = 1; w < world; ++w) {
    const int64_t n = row_bytes[w] / static_cast<int64_t>(hidden * sizeof(float));
    for (int64_t i = 0; i < n; ++i, ++r)
      std::memcpy(slot_out.data<float>() + order_[r] * hidden,
                  bytes + offset + i * hidden * sizeof(float), hidden * sizeof(float));
    double worker_us = 0;
    std::memcpy(&worker_us, bytes + offset + row_bytes[w], sizeof(double));
    slowest_us = std::max(slowest_us, worker_us);
    offset += back_bytes[w];
  }
  stats_.expert_us[layer] += slowest_us;
  stats_.combine_us[layer] += std::max(0.0, wall_us - slowest_us);
  ++layers_done_;
  return absl::OkStatus();
}

}  // namespace epx
