#include "coordinator/distributed_expert_executor.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "comm/protocol.h"
#include "common/status.h"
#include "common/stopwatch.h"
#include "kernels/cpu/ops.h"

namespace epx {
namespace {

comm::ExpertWire Wire(const ModelConfig& config, DType activation) {
  absl::StatusOr<comm::ExpertWire> wire = comm::ExpertWire::Create(config.hidden_size, activation);
  EPX_CHECK(wire.ok());
  return *wire;
}

}  // namespace

DistributedExpertExecutor::DistributedExpertExecutor(const ModelConfig& config,
                                                     const Placement& placement,
                                                     comm::Communicator* comm,
                                                     absl::Duration timeout, DType activation)
    : config_(config),
      placement_(placement),
      comm_(comm),
      timeout_(timeout),
      wire_(Wire(config, activation)),
      layers_done_(config.num_hidden_layers) {
  EPX_CHECK(comm_->rank() == 0 && placement_.num_workers() == comm_->world_size() - 1);
  const int64_t layers = config_.num_hidden_layers;
  stats_.dispatch_us.assign(layers, 0);
  stats_.expert_us.assign(layers, 0);
  stats_.combine_us.assign(layers, 0);
  stats_.worker_tokens.assign(comm_->world_size(), 0);
  for (int r = 0; r < comm_->world_size(); ++r) members_.push_back(r);
  Layout();
}

void DistributedExpertExecutor::Layout() {
  // Groups (worker, local expert) in send order: worker w's are [group_base_[w],
  // group_base_[w + 1]); each worker receives one count per local expert.
  group_base_.assign(comm_->world_size() + 1, 0);
  count_bytes_.assign(comm_->world_size(), 0);
  for (int w = 1; w < comm_->world_size(); ++w) {
    const int64_t local = static_cast<int64_t>(placement_.experts_of(w).size());
    group_base_[w + 1] = group_base_[w] + local;
    count_bytes_[w] = wire_.CountBytes(local);
  }
}

absl::Status DistributedExpertExecutor::BeginStep() {
  if (shut_down_) return absl::FailedPreconditionError("the expert workers were shut down");
  if (in_step()) return absl::FailedPreconditionError("the previous step did not finish");
  layers_done_ = 0;
  comm::StepHeader header{.kind = comm::StepKind::kForward, .activation = wire_.activation(),
                          .step = step_++};
  return comm_->Broadcast(&header, sizeof(header), 0, comm::Tag::kStepHeader, timeout_,
                          absl::StrCat("step ", header.step, " header"));
}

absl::Status DistributedExpertExecutor::Shutdown() {
  if (shut_down_) return absl::OkStatus();
  shut_down_ = true;
  comm::StepHeader header{.kind = comm::StepKind::kShutdown, .step = step_};
  return comm_->Broadcast(&header, sizeof(header), 0, comm::Tag::kStepHeader, timeout_, "shutdown");
}

absl::Status DistributedExpertExecutor::Reform() {
  if (in_step()) return absl::FailedPreconditionError("a step is in progress");
  comm::StepHeader header{.kind = comm::StepKind::kReform, .step = step_};
  return comm_->Broadcast(&header, sizeof(header), 0, comm::Tag::kStepHeader, timeout_,
                          "re-forming the data plane");
}

absl::Status DistributedExpertExecutor::Rebind(comm::Communicator* comm, const Placement& placement,
                                               std::vector<int> members) {
  if (comm->rank() != 0 || placement.num_workers() != comm->world_size() - 1 ||
      static_cast<int>(members.size()) != comm->world_size() || members[0] != 0)
    return absl::InternalError(absl::StrCat("re-formed data plane of ", comm->world_size(),
                                            " ranks for a placement of ", placement.num_workers(),
                                            " workers"));
  comm_ = comm;
  placement_ = placement;
  members_ = std::move(members);
  for (int w : members_)
    if (w >= static_cast<int>(stats_.worker_tokens.size())) stats_.worker_tokens.resize(w + 1, 0);
  layers_done_ = config_.num_hidden_layers;
  Layout();
  // NCCL: a dispatch for the new communicator and placement (its tables live on the GPU).
  if (device_ != nullptr) {
    comm::DeviceCommunicator* device = comm->device();
    if (device == nullptr)
      return absl::InternalError("the re-formed data plane does not carry device rows");
    device_.reset();
    EPX_ASSIGN_OR_RETURN(device_,
                         NewDeviceDispatch(config_, placement_, group_base_, device, timeout_));
  }
  return absl::OkStatus();
}

absl::Status DistributedExpertExecutor::UseDeviceExchange(comm::DeviceCommunicator* comm) {
  if (wire_.activation() != DType::kBF16)
    return absl::InvalidArgumentError("device rows on the data plane are BF16 (--device cuda)");
  EPX_ASSIGN_OR_RETURN(device_,
                       NewDeviceDispatch(config_, placement_, group_base_, comm, timeout_));
  return absl::OkStatus();
}

absl::StatusOr<ExpertOutput> DistributedExpertExecutor::Run(int layer, const ExpertBatch& batch) {
  if (device_ != nullptr) {
    EPX_ASSIGN_OR_RETURN(ExpertOutput out, device_->Run(layer, step_, batch, members_, stats_));
    ++layers_done_;
    return out;
  }
  const TensorView& x = batch.x;
  const TensorView& topk_ids = batch.topk_ids;
  if (x.dtype() != wire_.activation())
    return absl::InternalError(absl::StrCat("layer ", layer, ": rows of ", DTypeName(x.dtype()),
                                            " for a data plane carrying ",
                                            DTypeName(wire_.activation())));
  const int world = comm_->world_size();
  const int64_t num_experts = config_.num_local_experts;
  const int64_t num_slots = topk_ids.numel(), num_topk = topk_ids.dim(1);
  const int64_t num_groups = group_base_.back();
  const int32_t* ids = topk_ids.data<const int32_t>();

  // Group of every slot: (worker, local expert), numbered in send order. A replicated expert's
  // slots are dealt to its replicas in turn, starting at a replica that rotates with the step
  // and layer so that even one-row decode steps reach every replica; any deterministic choice
  // gives the same results.
  std::vector<int64_t> seen(num_experts, 0), group_of(num_slots);
  group_offsets_.assign(num_groups + 1, 0);
  for (int64_t s = 0; s < num_slots; ++s) {
    const int32_t e = ids[s];
    if (e < 0 || e >= num_experts)
      return absl::InternalError(absl::StrCat("layer ", layer, ": routed to expert ", e));
    const std::vector<int>& replicas = placement_.replicas(e);
    const int w = replicas[(seen[e]++ + step_ + layer) % replicas.size()];
    group_of[s] = group_base_[w] + placement_.LocalIndex(w, e);
    ++group_offsets_[group_of[s] + 1];
  }
  for (int64_t g = 0; g < num_groups; ++g) group_offsets_[g + 1] += group_offsets_[g];
  // Slots in send order: a stable counting sort by group, slots ascending within each.
  order_.resize(num_slots);
  std::vector<int64_t> cursor(group_offsets_.begin(), group_offsets_.end() - 1);
  for (int64_t s = 0; s < num_slots; ++s) order_[cursor[group_of[s]]++] = s;

  // Counts: each worker's groups are contiguous, so its counts are a run of the group sizes.
  std::vector<int64_t> counts(num_groups), no_bytes(world, 0);
  for (int64_t g = 0; g < num_groups; ++g) counts[g] = group_offsets_[g + 1] - group_offsets_[g];
  Stopwatch watch;
  EPX_RETURN_IF_ERROR(comm_->AllToAllV(counts.data(), count_bytes_, nullptr, no_bytes,
                                       comm::Tag::kCounts, timeout_,
                                       absl::StrCat("layer ", layer, " counts")));

  // Rows out, in send order.
  const comm::DispatchPlan plan = comm::PlanDispatch(group_base_, group_offsets_);
  std::vector<int64_t> row_bytes(world, 0), back_bytes(world, 0);
  for (int w = 1; w < world; ++w) {
    row_bytes[w] = wire_.RowBytes(plan.rows[w]);
    back_bytes[w] = wire_.CombineBytes(plan.rows[w]);
    stats_.worker_tokens[members_[w]] += plan.rows[w];
  }
  comm::GrowPayload(&send_, wire_.RowBytes(num_slots));
  EPX_RETURN_IF_ERROR(cpu::PermuteRows(x, order_, num_topk, wire_.Rows(send_.data(), num_slots)));
  EPX_RETURN_IF_ERROR(comm_->AllToAllV(send_.data(), row_bytes, nullptr, no_bytes,
                                       comm::Tag::kDispatch, timeout_,
                                       absl::StrCat("layer ", layer, " dispatch")));
  stats_.dispatch_us[layer] += watch.Micros();

  // Outputs back: each worker's rows followed by its compute time (a double; row blocks keep
  // float alignment).
  watch.Restart();
  int64_t total_back = 0;
  for (int w = 0; w < world; ++w) total_back += back_bytes[w];
  comm::GrowPayload(&recv_, total_back);
  EPX_RETURN_IF_ERROR(comm_->AllToAllV(nullptr, no_bytes, recv_.data(), back_bytes,
                                       comm::Tag::kCombine, timeout_,
                                       absl::StrCat("layer ", layer, " combine")));
  const double wall_us = watch.Micros();
  double slowest_us = 0;
  comm::GrowPayload(&slot_out_, wire_.RowBytes(num_slots));
  const TensorView slot_out = wire_.Rows(slot_out_.data(), num_slots);
  const uint8_t* block = reinterpret_cast<const uint8_t*>(recv_.data());
  for (int w = 1; w < world; ++w) {
    const int64_t first = plan.first[w], n = plan.rows[w];
    EPX_RETURN_IF_ERROR(cpu::UnpermuteRows(wire_.Rows(block, n),
                                           absl::MakeConstSpan(order_).subspan(first, n),
                                           slot_out));
    slowest_us = std::max(slowest_us, wire_.ComputeMicros(block, n));
    block += back_bytes[w];
  }
  stats_.expert_us[layer] += slowest_us;
  stats_.combine_us[layer] += std::max(0.0, wall_us - slowest_us);
  ++layers_done_;
  // Member by member: GCC 12 misreads the designated initialiser's empty views as uninitialised.
  ExpertOutput out;
  out.rows = slot_out;
  return out;
}

}  // namespace epx
