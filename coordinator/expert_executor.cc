#include "coordinator/expert_executor.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/ops.h"

namespace epx {
namespace {

class LocalExpertExecutor : public ExpertExecutor {
 public:
  explicit LocalExpertExecutor(const ModelWeights* weights) : weights_(weights) {
    const ModelConfig& c = weights->config();
    experts_.resize(c.num_hidden_layers);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      for (const ExpertWeights& e : weights->layer(static_cast<int>(l)).experts)
        experts_[l].push_back({e.w1, e.w2, e.w3});
  }

  absl::StatusOr<ExpertOutput> Run(int layer, const ExpertBatch& batch) override {
    const ModelConfig& c = weights_->config();
    const TensorView& x = batch.x;
    const int64_t num_slots = batch.topk_ids.numel(), hidden = c.hidden_size;
    const int64_t num_topk = batch.topk_ids.dim(1);
    const size_t row_bytes = hidden * DTypeSize(x.dtype());
    offsets_.resize(c.num_local_experts + 1);
    slots_.resize(num_slots);
    EPX_RETURN_IF_ERROR(cpu::ExpertPermutation(batch.topk_ids, c.num_local_experts,
                                               absl::MakeSpan(offsets_), absl::MakeSpan(slots_)));
    EnsureSize(&permuted_, num_slots * row_bytes);
    EnsureSize(&expert_out_, num_slots * row_bytes);
    EnsureSize(&slot_out_, num_slots * row_bytes);
    scratch_.resize(std::max<size_t>(
        scratch_.size(), cpu::GroupedSwiGluScratchFloats(offsets_, c.intermediate_size)));
    const TensorView permuted(permuted_.data(), x.dtype(), {num_slots, hidden});
    const TensorView expert_out(expert_out_.data(), x.dtype(), {num_slots, hidden});
    const TensorView slot_out(slot_out_.data(), x.dtype(), {num_slots, hidden});
    EPX_RETURN_IF_ERROR(cpu::PermuteRows(x, slots_, num_topk, permuted));
    const absl::Status computed = cpu::GroupedSwiGlu(permuted, offsets_, experts_[layer],
                                                     absl::MakeSpan(scratch_), expert_out);
    if (!computed.ok())
      return absl::Status(computed.code(), absl::StrCat("layer ", layer, ": ", computed.message()));
    EPX_RETURN_IF_ERROR(cpu::UnpermuteRows(expert_out, slots_, slot_out));
    // Member by member: GCC 12 misreads the designated initialiser's empty views as uninitialised.
    ExpertOutput out;
    out.rows = slot_out;
    return out;
  }

 private:
  static void EnsureSize(std::vector<float>* v, size_t bytes) {
    const size_t floats = (bytes + sizeof(float) - 1) / sizeof(float);
    if (v->size() < floats) v->resize(floats);
  }
  const ModelWeights* weights_;
  std::vector<std::vector<cpu::SwiGluWeights>> experts_;  // [layer][expert]; unloaded: empty
  std::vector<int64_t> offsets_;
  std::vector<int64_t> slots_;
  // Rows of F32 or BF16, kept in float vectors for alignment.
  std::vector<float> permuted_;
  std::vector<float> expert_out_;
  std::vector<float> slot_out_;
  std::vector<float> scratch_;
};

class HostStagedExpertExecutor : public ExpertExecutor {
 public:
  HostStagedExpertExecutor(ExpertExecutor* host, int64_t num_layers, int64_t num_experts)
      : host_(host), num_experts_(num_experts), offsets_(num_layers * (num_experts + 1)) {}

  MemoryKind memory() const override { return MemoryKind::kDevice; }
  absl::Status BeginStep() override { return host_->BeginStep(); }

  absl::StatusOr<ExpertOutput> Run(int layer, const ExpertBatch& batch) override {
    EPX_ASSIGN_OR_RETURN(const TensorView x, x_.Download(batch.x, batch.stream));
    EPX_ASSIGN_OR_RETURN(const TensorView ids, ids_.Download(batch.topk_ids, batch.stream));
    EPX_RETURN_IF_ERROR(cuda::SynchronizeStream(batch.stream));
    int32_t* offsets = offsets_.data() + layer * (num_experts_ + 1);
    std::fill(offsets, offsets + num_experts_ + 1, 0);
    const int32_t* routed = ids.data<const int32_t>();
    for (int64_t i = 0; i < ids.numel(); ++i) {
      if (routed[i] < 0 || routed[i] >= num_experts_)
        return absl::InternalError(absl::StrCat("layer ", layer, ": routed to expert ", routed[i]));
      ++offsets[routed[i] + 1];
    }
    for (int64_t e = 0; e < num_experts_; ++e) offsets[e + 1] += offsets[e];
    EPX_ASSIGN_OR_RETURN(ExpertOutput out, host_->Run(layer, {.x = x, .topk_ids = ids}));
    EPX_ASSIGN_OR_RETURN(const TensorView rows, rows_.Upload(out.rows, batch.stream));
    ExpertOutput staged{.rows = rows, .expert_offsets = offsets};
    if (!out.row_of_slot.empty()) {
      EPX_ASSIGN_OR_RETURN(staged.row_of_slot, row_of_slot_.Upload(out.row_of_slot, batch.stream));
    }
    // No wait here: the host executor writes its buffers again only in the next layer's Run,
    // after that layer's synchronisation, which comes after these uploads on the stream.
    return staged;
  }

 private:
  ExpertExecutor* host_;
  const int64_t num_experts_;
  std::vector<int32_t> offsets_;  // [layer][num_experts + 1], the step's loads
  cuda::HostStaging x_, ids_;
  cuda::DeviceStaging rows_, row_of_slot_;
};

}  // namespace

std::unique_ptr<ExpertExecutor> NewLocalExpertExecutor(const ModelWeights* weights) {
  return std::make_unique<LocalExpertExecutor>(weights);
}

std::unique_ptr<ExpertExecutor> NewHostStagedExpertExecutor(ExpertExecutor* host,
                                                            int64_t num_layers,
                                                            int64_t num_experts) {
  return std::make_unique<HostStagedExpertExecutor>(host, num_layers, num_experts);
}

}  // namespace epx
