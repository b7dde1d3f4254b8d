#include "coordinator/expert_executor.h"

#include "absl/strings/str_cat.h"
#include "kernels/cpu/ops.h"

namespace epx {
namespace {

class LocalExpertExecutor : public ExpertExecutor {
 public:
  explicit LocalExpertExecutor(const ModelWeights* weights) : weights_(weights) {}

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
    TensorView permuted(permuted_.data(), DType::kF32, {num_slots, hidden});
    TensorView expert_out(expert_out_.data(), DType::kF32, {num_slots, hidden});
    EPX_RETURN_IF_ERROR(cpu::PermuteRows(x, slots_, num_topk, permuted));
    const LayerWeights& lw = weights_->layer(layer);
    for (int64_t e = 0; e < c.num_local_experts; ++e) {
      const int64_t begin = offsets_[e], end = offsets_[e + 1];
      if (begin == end) continue;
      const ExpertWeights& ew = lw.experts[e];
      if (!ew.loaded())
        return absl::FailedPreconditionError(
            absl::StrCat("expert ", e, " of layer ", layer, " is not loaded in this process"));
      EnsureSize(&scratch_, cpu::SwiGluScratchFloats(end - begin, c.intermediate_size));
      EPX_RETURN_IF_ERROR(cpu::SwiGluExpert(permuted.Slice(begin, end), ew.w1, ew.w2, ew.w3,
                                            absl::MakeSpan(scratch_),
                                            expert_out.Slice(begin, end)));
    }
    return cpu::UnpermuteRows(expert_out, slots_, slot_out);
  }

 private:
  static void EnsureSize(std::vector<float>* v, int64_t n) {
    if (static_cast<int64_t>(v->size()) < n) v->resize(n);
  }
  const ModelWeights* weights_;
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
