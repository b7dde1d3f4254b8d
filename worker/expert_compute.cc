#include "worker/expert_compute.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cpu/ops.h"

namespace epx {

// The CUDA version, in cuda_expert_compute.cc (or its stand-in without CUDA).
absl::StatusOr<std::unique_ptr<ExpertCompute>> NewCudaExpertCompute(
    const ModelWeights& weights, const std::vector<int>& local_experts,
    const ExpertComputeOptions& options);

namespace {

class CpuExpertCompute : public ExpertCompute {
 public:
  explicit CpuExpertCompute(std::vector<std::vector<cpu::SwiGluWeights>> experts,
                            int64_t intermediate)
      : experts_(std::move(experts)), intermediate_(intermediate) {}

  absl::Status Run(int64_t layer, const TensorView& rows, absl::Span<const int64_t> offsets,
                   const TensorView& out) override {
    const int64_t need = cpu::GroupedSwiGluScratchFloats(offsets, intermediate_);
    if (static_cast<int64_t>(scratch_.size()) < need) scratch_.resize(need);
    return cpu::GroupedSwiGlu(rows, offsets, experts_[layer], absl::MakeSpan(scratch_), out);
  }
  std::string device() const override { return "cpu"; }

 private:
  std::vector<std::vector<cpu::SwiGluWeights>> experts_;  // [layer][local expert]
  int64_t intermediate_;
  std::vector<float> scratch_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ExpertCompute>> NewExpertCompute(
    const ModelWeights& weights, const std::vector<int>& local_experts,
    const ExpertComputeOptions& options) {
  const ModelConfig& c = weights.config();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (int e : local_experts) {
      const bool held = e >= 0 && e < c.num_local_experts &&
                        weights.layer(static_cast<int>(l)).experts[e].loaded();
      if (!held)
        return absl::FailedPreconditionError(
            absl::StrCat("this worker does not hold expert ", e, " of its placement (layer ", l,
                         ")"));
    }
  }
  if (options.device == "cuda") return NewCudaExpertCompute(weights, local_experts, options);
  if (options.device != "cpu")
    return absl::InvalidArgumentError(
        absl::StrCat("--device must be cpu or cuda, got \"", options.device, "\""));
  std::vector<std::vector<cpu::SwiGluWeights>> experts(c.num_hidden_layers);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (int e : local_experts) {
      const ExpertWeights& w = weights.layer(static_cast<int>(l)).experts[e];
      experts[l].push_back({w.w1, w.w2, w.w3});
    }
  }
  return std::unique_ptr<ExpertCompute>(
      new CpuExpertCompute(std::move(experts), c.intermediate_size));
}

}  // namespace epx
