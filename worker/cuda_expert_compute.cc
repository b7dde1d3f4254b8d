// The worker's experts on its GPU: device rows of BF16 (from a GPU coordinator) go straight
// through the same grouped SwiGLU as the coordinator's local experts into the caller's output;
// F32 rows (from a CPU coordinator) are rounded to BF16 first and the outputs widened back.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/device_weights.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "worker/expert_compute.h"

namespace epx {
namespace {

class CudaExpertCompute : public ExpertCompute {
 public:
  absl::Status Init(const ModelWeights& weights, const std::vector<int>& local,
                    const ExpertComputeOptions& options) {
    const absl::Status set = cuda::SetDevice(options.cuda_device);
    if (!set.ok())
      return absl::Status(set.code(), absl::StrCat("--device cuda on this worker: ", set.message()));
    name_ = cuda::DeviceLabel(options.cuda_device);
    EPX_ASSIGN_OR_RETURN(impl_, cuda::ParseGroupedGemmImpl(options.grouped_gemm));
    hidden_ = weights.config().hidden_size;
    intermediate_ = weights.config().intermediate_size;
    expert_dtype_ = options.expert_dtype;
    EPX_ASSIGN_OR_RETURN(stream_, cuda::Stream::Create());
    EPX_ASSIGN_OR_RETURN(cuda::Blas blas, cuda::Blas::Create(stream_.handle()));
    blas_ = std::make_unique<cuda::Blas>(std::move(blas));
    DeviceWeightOptions wo;
    wo.non_expert = false;
    wo.experts = local;
    wo.expert_dtype = options.expert_dtype;
    EPX_ASSIGN_OR_RETURN(weights_, DeviceModelWeights::Upload(weights, wo, stream_.handle()));
    // In the order rows arrive: group g is local expert local[g].
    experts_.resize(weights.config().num_hidden_layers);
    for (size_t l = 0; l < experts_.size(); ++l)
      for (int e : local) experts_[l].push_back(weights_->layer(l).experts[e]);
    return absl::OkStatus();
  }

  MemoryKind memory() const override { return MemoryKind::kDevice; }
  cuda::StreamHandle stream() const override { return stream_.handle(); }

  absl::Status Run(int64_t layer, const TensorView& rows, absl::Span<const int64_t> offsets,
                   const TensorView& out) override {
    const int64_t n = offsets.back(), groups = static_cast<int64_t>(offsets.size()) - 1;
    const bool f32 = rows.dtype() == DType::kF32;
    if ((!f32 && rows.dtype() != DType::kBF16) || out.dtype() != rows.dtype())
      return absl::InvalidArgumentError(absl::StrCat("expert rows and outputs must both be F32 or "
                                                     "BF16, not ", DTypeName(rows.dtype()),
                                                     " and ", DTypeName(out.dtype())));
    if (n == 0) return absl::OkStatus();
    cuda::StreamHandle s = stream_.handle();
    offsets32_.assign(offsets.begin(), offsets.end());
    EPX_ASSIGN_OR_RETURN(const TensorView offsets_dev,
                         offsets_.Upload(TensorView(offsets32_.data(), DType::kI32, {groups + 1}), s));
    EPX_ASSIGN_OR_RETURN(
        const TensorView scratch,
        scratch_.View(DType::kU8,
                      {static_cast<int64_t>(cuda::GroupedSwiGluScratchBytes(
                          n, hidden_, intermediate_, expert_dtype_))},
                      s));
    const cuda::GroupedGemmImpl impl = cuda::ResolveGroupedGemmImpl(impl_, n);
    if (!f32)
      return cuda::GroupedSwiGlu(rows, offsets_dev, offsets, experts_[layer], impl, scratch, out,
                                 *blas_);
    // F32 rows: the kernels take BF16, so round them first and widen the outputs.
    EPX_ASSIGN_OR_RETURN(const TensorView rows_bf16, rows_bf16_.View(DType::kBF16, {n, hidden_}, s));
    EPX_ASSIGN_OR_RETURN(const TensorView out_bf16, out_bf16_.View(DType::kBF16, {n, hidden_}, s));
    EPX_RETURN_IF_ERROR(cuda::Convert(rows, rows_bf16, s));
    EPX_RETURN_IF_ERROR(cuda::GroupedSwiGlu(rows_bf16, offsets_dev, offsets, experts_[layer],
                                            impl, scratch, out_bf16, *blas_));
    return cuda::Convert(out_bf16, out, s);
  }

  absl::Status Reserve(int64_t rows, int64_t groups) override {
    cuda::StreamHandle s = stream_.handle();
    EPX_RETURN_IF_ERROR(offsets_.View(DType::kI32, {groups + 1}, s).status());
    EPX_RETURN_IF_ERROR(
        scratch_
            .View(DType::kU8,
                  {static_cast<int64_t>(cuda::GroupedSwiGluScratchBytes(
                      rows, hidden_, intermediate_, expert_dtype_))},
                  s)
            .status());
    return absl::OkStatus();
  }

  std::string device() const override { return name_; }

 private:
  std::string name_;
  cuda::GroupedGemmImpl impl_ = cuda::GroupedGemmImpl::kAuto;
  int64_t hidden_ = 0, intermediate_ = 0;
  DType expert_dtype_ = DType::kBF16;
  cuda::Stream stream_;
  std::unique_ptr<cuda::Blas> blas_;
  std::unique_ptr<DeviceModelWeights> weights_;
  std::vector<std::vector<cuda::DeviceExpert>> experts_;  // [layer][local expert]
  // Each grows as needed (waiting for the stream first); the BF16 copies only for F32 rows.
  cuda::DeviceStaging offsets_, scratch_, rows_bf16_, out_bf16_;
  // The call's offsets as the device takes them; the copy from it has finished by the next Run
  // (the worker waits for every layer's outputs).
  std::vector<int32_t> offsets32_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ExpertCompute>> NewCudaExpertCompute(
    const ModelWeights& weights, const std::vector<int>& local_experts,
    const ExpertComputeOptions& options) {
  auto compute = std::make_unique<CudaExpertCompute>();
  EPX_RETURN_IF_ERROR(compute->Init(weights, local_experts, options));
  return std::unique_ptr<ExpertCompute>(std::move(compute));
}

}  // namespace epx
