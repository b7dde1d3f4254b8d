#include "coordinator/expert_executor.h"

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

  absl::Status Run(int layer, const TensorView& x, const TensorView& topk_ids,
                   const TensorView& slot_out) override {
    const ModelConfig& c = weights_->config();
    const int64_t num_slots = topk_ids.numel(), hidden = c.hidden_size;
    const int64_t num_topk = topk_ids.dim(1);
    offsets_.resize(c.num_local_experts + 1);
    slots_.resize(num_slots);
    EPX_RETURN_IF_ERROR(cpu::ExpertPermutation(topk_ids, c.num_local_experts,
                                               absl::MakeSpan(offsets_), absl::MakeSpan(slots_)));
    EnsureSize(&permuted_, num_slots * hidden);
    EnsureSize(&expert_out_, num_slots * hidden);
    EnsureSize(&scratch_, cpu::GroupedSwiGluScratchFloats(offsets_, c.intermediate_size));
    TensorView permuted(permuted_.data(), DType::kF32, {num_slots, hidden});
    TensorView expert_out(expert_out_.data(), DType::kF32, {num_slots, hidden});
    EPX_RETURN_IF_ERROR(cpu::PermuteRows(x, slots_, num_topk, permuted));
    const absl::Status computed = cpu::GroupedSwiGlu(permuted, offsets_, experts_[layer],
                                                     absl::MakeSpan(scratch_), expert_out);
    if (!computed.ok())
      return absl::Status(computed.code(), absl::StrCat("layer ", layer, ": ", computed.message()));
    return cpu::UnpermuteRows(expert_out, slots_, slot_out);
  }

 private:
  static void EnsureSize(std::vector<float>* v, int64_t n) {
    if (static_cast<int64_t>(v->size()) < n) v->resize(n);
  }
  const ModelWeights* weights_;
  std::vector<std::vector<cpu::SwiGluWeights>> experts_;  // [layer][expert]; unloaded: empty
  std::vector<int64_t> offsets_;
  std::vector<int64_t> slots_;
  std::vector<float> permuted_;
  std::vector<float> expert_out_;
  std::vector<float> scratch_;
};

}  // namespace

std::unique_ptr<ExpertExecutor> NewLocalExpertExecutor(const ModelWeights* weights) {
  return std::make_unique<LocalExpertExecutor>(weights);
}

}  // namespace epx
