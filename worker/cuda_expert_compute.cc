// The worker's experts on its GPU: device rows of BF16 (from a GPU coordinator) go straight
// through the same grouped SwiGLU as the coordinator's local experts; F32 rows (from a CPU
// coordinator) are rounded to BF16 first and the outputs widened back.
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

  absl::StatusOr<TensorView> Run(int64_t layer, const TensorView& rows,
                                 absl::Span<const int64_t> offsets) override {
    const int64_t n = offsets.back(), groups = static_cast<int64_t>(offsets.size()) - 1;
    const bool f32 = rows.dtype() == DType::kF32;
    if (!f32 && rows.dtype() != DType::kBF16)
      return absl::InvalidArgumentError(
          absl::StrCat("expert rows must be F32 or BF16, not ", DTypeName(rows.dtype())));
    if (n == 0) return TensorView(nullptr, rows.dtype(), {0, hidden_});
    EPX_RETURN_IF_ERROR(Reserve(n, groups, f32));
    cuda::StreamHandle s = stream_.handle();
    offsets32_.assign(offsets.begin(), offsets.end());
    const TensorView offsets_dev = offsets_.view(DType::kI32, {groups + 1});
    const TensorView rows_bf16 = f32 ? rows_bf16_.view(DType::kBF16, {n, hidden_}) : rows;
    const TensorView out_bf16 = out_bf16_.view(DType::kBF16, {n, hidden_});
    EPX_RETURN_IF_ERROR(
        cuda::CopyToDevice(offsets_.data(), offsets32_.data(), offsets32_.size() * 4, s));
    if (f32) EPX_RETURN_IF_ERROR(cuda::Convert(rows, rows_bf16, s));
    EPX_RETURN_IF_ERROR(cuda::GroupedSwiGlu(rows_bf16, offsets_dev, offsets, experts_[layer],
                                            cuda::ResolveGroupedGemmImpl(impl_, n),
                                            scratch_.view(DType::kU8, {scratch_bytes_}),
                                            out_bf16, *blas_));
    if (!f32) return out_bf16;
    const TensorView out_f32 = out_f32_.view(DType::kF32, {n, hidden_});
    EPX_RETURN_IF_ERROR(cuda::Convert(out_bf16, out_f32, s));
    return out_f32;
  }

  std::string device() const override { return name_; }

 private:
  // Buffers for n rows in `groups` groups; the F32 ones only once F32 rows come (a CPU
  // coordinator's).
  absl::Status Reserve(int64_t n, int64_t groups, bool f32) {
    if (n <= rows_capacity_ && groups + 1 <= offsets_capacity_ && (!f32 || n <= f32_capacity_))
      return absl::OkStatus();
    EPX_RETURN_IF_ERROR(stream_.Synchronize());
    const int64_t rows_capacity = std::max(n, 2 * rows_capacity_);
    const int64_t offsets_capacity = std::max(groups + 1, offsets_capacity_);
    const bool with_f32 = f32 || f32_capacity_ > 0;
    // The old buffers go first (the new ones may need their memory), and the capacities say
    // nothing fits until every new buffer exists: a failed growth leaves no buffer smaller than
    // the capacities claim.
    rows_capacity_ = offsets_capacity_ = f32_capacity_ = scratch_bytes_ = 0;
    for (cuda::DeviceBuffer* b : {&out_f32_, &rows_bf16_, &out_bf16_, &offsets_, &scratch_})
      *b = cuda::DeviceBuffer();
    const size_t rows = static_cast<size_t>(rows_capacity * hidden_);
    const int64_t scratch_bytes = static_cast<int64_t>(
        cuda::GroupedSwiGluScratchBytes(rows_capacity, hidden_, intermediate_, expert_dtype_));
    if (with_f32) {
      EPX_ASSIGN_OR_RETURN(out_f32_, cuda::DeviceBuffer::Allocate(rows * 4));
      EPX_ASSIGN_OR_RETURN(rows_bf16_, cuda::DeviceBuffer::Allocate(rows * 2));
    }
    EPX_ASSIGN_OR_RETURN(out_bf16_, cuda::DeviceBuffer::Allocate(rows * 2));
    EPX_ASSIGN_OR_RETURN(offsets_, cuda::DeviceBuffer::Allocate(offsets_capacity * 4));
    EPX_ASSIGN_OR_RETURN(scratch_, cuda::DeviceBuffer::Allocate(scratch_bytes));
    rows_capacity_ = rows_capacity;
    offsets_capacity_ = offsets_capacity;
    f32_capacity_ = with_f32 ? rows_capacity : 0;
    scratch_bytes_ = scratch_bytes;
    return absl::OkStatus();
  }

  std::string name_;
  cuda::GroupedGemmImpl impl_ = cuda::GroupedGemmImpl::kAuto;
  int64_t hidden_ = 0, intermediate_ = 0;
  DType expert_dtype_ = DType::kBF16;
  cuda::Stream stream_;
  std::unique_ptr<cuda::Blas> blas_;
  std::unique_ptr<DeviceModelWeights> weights_;
  std::vector<std::vector<cuda::DeviceExpert>> experts_;  // [layer][local expert]
  int64_t rows_capacity_ = 0, offsets_capacity_ = 0, f32_capacity_ = 0, scratch_bytes_ = 0;
  cuda::DeviceBuffer out_f32_, rows_bf16_, out_bf16_, offsets_, scratch_;
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
