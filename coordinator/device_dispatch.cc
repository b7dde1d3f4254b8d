#include "coordinator/device_dispatch.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/distributed_expert_executor.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"

namespace epx {
namespace {

using Transfer = comm::DeviceCommunicator::Transfer;

class NcclDispatch final : public DeviceDispatch {
 public:
  NcclDispatch(const ModelConfig& config, std::vector<int64_t> group_base,
               comm::DeviceCommunicator* comm, absl::Duration timeout)
      : config_(config), group_base_(std::move(group_base)), comm_(comm), timeout_(timeout) {
    for (int w = 1; w + 1 < static_cast<int>(group_base_.size()); ++w) workers_.push_back(w);
  }

  // The replica table from `placement`, the pinned offsets, the timing events.
  absl::Status Init(const Placement& placement) {
    const int64_t E = config_.num_local_experts;
    int64_t max_replicas = 1;
    for (int e = 0; e < E; ++e)
      max_replicas = std::max<int64_t>(max_replicas, placement.replicas(e).size());
    // Row e: the groups of expert e's replicas, padded with its first.
    table_host_.assign(E * max_replicas, 0);
    replicas_host_.assign(E, 0);
    for (int e = 0; e < E; ++e) {
      const std::vector<int>& replicas = placement.replicas(e);
      replicas_host_[e] = static_cast<int32_t>(replicas.size());
      for (int64_t r = 0; r < max_replicas; ++r) {
        const int w = replicas[r % replicas.size()];
        table_host_[e * max_replicas + r] =
            static_cast<int32_t>(group_base_[w] + placement.LocalIndex(w, e));
      }
    }
    max_replicas_ = max_replicas;
    EPX_ASSIGN_OR_RETURN(offsets_host_,
                         cuda::PinnedBuffer::Allocate((group_base_.back() + 1) * sizeof(int32_t)));
    for (Timing& t : timing_) {
      EPX_ASSIGN_OR_RETURN(t.start, cuda::Event::Create());
      EPX_ASSIGN_OR_RETURN(t.sent, cuda::Event::Create());
      EPX_ASSIGN_OR_RETURN(t.back, cuda::Event::Create());
    }
    return absl::OkStatus();
  }

  absl::StatusOr<ExpertOutput> Run(int layer, int64_t step, const ExpertBatch& batch,
                                   const std::vector<int>& members,
                                   ExpertParallelStats& stats) override {
    const TensorView& x = batch.x;
    cuda::StreamHandle s = batch.stream;
    if (x.dtype() != DType::kBF16 || s == nullptr)
      return absl::InternalError(absl::StrCat("layer ", layer,
                                              ": the NCCL data plane takes BF16 "
                                              "rows on the step's stream, got ",
                                              DTypeName(x.dtype())));
    const int64_t T = x.dim(0), K = config_.num_experts_per_tok, H = config_.hidden_size;
    const int64_t num_slots = T * K, num_groups = group_base_.back();
    const std::string what = absl::StrCat("layer ", layer);
    EPX_RETURN_IF_ERROR(Reserve(num_slots, s, what));

    Timing& timing = timing_[layer % 2];
    EPX_RETURN_IF_ERROR(timing.start.Record(s));
    const TensorView groups = groups_.Slice(0, num_slots).Reshape({T, K});
    const TensorView slots = slots_.Slice(0, num_slots);
    const TensorView row_of_slot = row_of_slot_.Slice(0, num_slots);
    const TensorView send = send_.Slice(0, num_slots), recv = recv_.Slice(0, num_slots);
    EPX_RETURN_IF_ERROR(
        cuda::AssignGroups(batch.topk_ids, table_, replicas_, step + layer, num_groups, groups, s));
    EPX_RETURN_IF_ERROR(
        cuda::ExpertPermutation(groups, num_groups, offsets_, slots, row_of_slot, scratch_, s));
    EPX_RETURN_IF_ERROR(cuda::PermuteRows(x, slots, K, send, s));
    int32_t* offsets_host = static_cast<int32_t*>(offsets_host_.data());
    EPX_RETURN_IF_ERROR(cuda::CopyToHost(offsets_host, offsets_.raw(), offsets_.nbytes(), s));
    // The sizes of the transfers: the layer's one wait (also on the previous layer's outputs).
    EPX_RETURN_IF_ERROR(comm_->Synchronize(s, timeout_, workers_, what + " routing"));
    ReadTimes(timing_[(layer + 1) % 2], stats);  // the previous layer's
    offsets64_.assign(offsets_host, offsets_host + num_groups + 1);
    const comm::DispatchPlan plan = comm::PlanDispatch(group_base_, offsets64_);

    const int64_t row_bytes = H * static_cast<int64_t>(sizeof(uint16_t));
    auto rows_at = [&](const TensorView& t, int w) {
      return static_cast<uint8_t*>(t.raw()) + plan.first[w] * row_bytes;
    };
    std::vector<Transfer>& counts = counts_tx_;
    std::vector<Transfer>& rows = rows_tx_;
    std::vector<Transfer>& outputs = outputs_tx_;
    counts.clear();
    rows.clear();
    outputs.clear();
    for (int w : workers_) {
      counts.push_back({.is_send = true,
                        .peer = w,
                        .data = offsets_.data<int32_t>() + group_base_[w],
                        .bytes = (group_base_[w + 1] - group_base_[w] + 1) *
                                 static_cast<int64_t>(sizeof(int32_t))});
      rows.push_back({.is_send = true,
                      .peer = w,
                      .data = rows_at(send, w),
                      .bytes = plan.rows[w] * row_bytes});
      outputs.push_back({.is_send = false,
                         .peer = w,
                         .data = rows_at(recv, w),
                         .bytes = plan.rows[w] * row_bytes});
      stats.worker_tokens[members[w]] += plan.rows[w];
    }
    EPX_RETURN_IF_ERROR(comm_->Post(counts, s, what + " counts"));
    EPX_RETURN_IF_ERROR(comm_->Post(rows, s, what + " dispatch"));
    EPX_RETURN_IF_ERROR(timing.sent.Record(s));
    EPX_RETURN_IF_ERROR(comm_->Post(outputs, s, what + " combine"));
    EPX_RETURN_IF_ERROR(timing.back.Record(s));
    timing.layer = layer;
    if (layer == config_.num_hidden_layers - 1) {
      EPX_RETURN_IF_ERROR(comm_->Synchronize(s, timeout_, workers_, what + " combine"));
      ReadTimes(timing, stats);
    }
    ExpertOutput out;
    out.rows = recv;
    out.row_of_slot = row_of_slot;
    return out;
  }

 private:
  // A layer's timing events, two sets used in turn: a layer's are read once the stream has
  // passed them (at the next layer's wait, or the step's last).
  struct Timing {
    cuda::Event start, sent, back;
    int layer = -1;
  };
  static void ReadTimes(Timing& t, ExpertParallelStats& stats) {
    if (t.layer < 0) return;
    const absl::StatusOr<float> dispatch = cuda::Event::ElapsedMs(t.start, t.sent);
    const absl::StatusOr<float> combine = cuda::Event::ElapsedMs(t.sent, t.back);
    if (dispatch.ok()) stats.dispatch_us[t.layer] += 1e3 * *dispatch;
    // The workers' compute is inside the combine here: NCCL's outputs carry no compute time.
    if (combine.ok()) stats.combine_us[t.layer] += 1e3 * *combine;
    t.layer = -1;
  }

  // Buffers for `num_slots` slots; growing first waits for the stream (under the watchdog: the
  // stream may hold the previous layer's transfers).
  absl::Status Reserve(int64_t num_slots, cuda::StreamHandle s, const std::string& what) {
    if (num_slots <= capacity_ && uploaded_) return absl::OkStatus();
    EPX_RETURN_IF_ERROR(comm_->Synchronize(s, timeout_, workers_, what + " (growing buffers)"));
    const int64_t want = std::max(num_slots, 2 * capacity_);
    const int64_t H = config_.hidden_size, G = group_base_.back();
    EPX_ASSIGN_OR_RETURN(groups_, groups_buf_.View(DType::kI32, {want}, s));
    EPX_ASSIGN_OR_RETURN(slots_, slots_buf_.View(DType::kI32, {want}, s));
    EPX_ASSIGN_OR_RETURN(row_of_slot_, row_of_slot_buf_.View(DType::kI32, {want}, s));
    EPX_ASSIGN_OR_RETURN(send_, send_buf_.View(DType::kBF16, {want, H}, s));
    EPX_ASSIGN_OR_RETURN(recv_, recv_buf_.View(DType::kBF16, {want, H}, s));
    const int64_t scratch = static_cast<int64_t>(cuda::ExpertPermutationScratchBytes(want, 1, G));
    EPX_ASSIGN_OR_RETURN(scratch_, scratch_buf_.View(DType::kU8, {scratch}, s));
    if (!uploaded_) {
      const int64_t E = config_.num_local_experts;
      EPX_ASSIGN_OR_RETURN(offsets_, offsets_buf_.View(DType::kI32, {G + 1}, s));
      EPX_ASSIGN_OR_RETURN(
          table_,
          table_buf_.Upload(TensorView(table_host_.data(), DType::kI32, {E, max_replicas_}), s));
      EPX_ASSIGN_OR_RETURN(
          replicas_, replicas_buf_.Upload(TensorView(replicas_host_.data(), DType::kI32, {E}), s));
      uploaded_ = true;
    }
    capacity_ = want;
    return absl::OkStatus();
  }

  const ModelConfig config_;
  const std::vector<int64_t> group_base_;
  comm::DeviceCommunicator* comm_;
  const absl::Duration timeout_;
  std::vector<int> workers_;
  int64_t max_replicas_ = 1;
  std::vector<int32_t> table_host_, replicas_host_;  // uploaded once, kept for the copies
  bool uploaded_ = false;
  int64_t capacity_ = 0;  // slots
  cuda::DeviceStaging groups_buf_, slots_buf_, row_of_slot_buf_, send_buf_, recv_buf_, scratch_buf_,
      offsets_buf_, table_buf_, replicas_buf_;
  TensorView groups_, slots_, row_of_slot_, send_, recv_, scratch_, offsets_, table_, replicas_;
  cuda::PinnedBuffer offsets_host_;  // [groups + 1]
  Timing timing_[2];
  // The layer's offsets and transfers, reused from layer to layer.
  std::vector<int64_t> offsets64_;
  std::vector<Transfer> counts_tx_, rows_tx_, outputs_tx_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceDispatch>> NewDeviceDispatch(const ModelConfig& config,
                                                                  const Placement& placement,
                                                                  std::vector<int64_t> group_base,
                                                                  comm::DeviceCommunicator* comm,
                                                                  absl::Duration timeout) {
  auto dispatch = std::make_unique<NcclDispatch>(config, std::move(group_base), comm, timeout);
  EPX_RETURN_IF_ERROR(dispatch->Init(placement));
  return std::unique_ptr<DeviceDispatch>(std::move(dispatch));
}

}  // namespace epx
