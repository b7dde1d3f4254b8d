// The CUDA backend of ModelForward (`--device cuda`): the whole forward pass of a step on one GPU
// with the kernels of kernels/cuda, BF16 weights and KV cache, fp32 residual stream and
// accumulation. The experts run on the same GPU (grouped SwiGLU over the device weights) unless
// an ExpertExecutor is given, which gets each layer's BF16 rows: in device memory on the step's
// stream if it takes device memory, else staged through pinned host memory (expert workers over
// MPI or gloo).
//
// A build without CUDA links cuda_forward_unavailable.cc: NewCudaForward is FailedPrecondition.
#ifndef EPX_COORDINATOR_CUDA_FORWARD_H_
#define EPX_COORDINATOR_CUDA_FORWARD_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "common/model_config.h"
#include "common/model_weights.h"
#include "coordinator/expert_executor.h"
#include "coordinator/model_forward.h"

namespace epx {

struct CudaForwardOptions {
  int device = 0;                     // CUDA device ordinal
  DType expert_dtype = DType::kBF16;  // kBF16, or kF8E4M3 (row-wise scaled) experts
  // "auto", "skinny", "cublas-loop" or "cublas-grouped" (kernels/cuda/ops.h GroupedGemmImpl).
  std::string grouped_gemm = "auto";
  uint64_t dummy_seed = 0;            // synthetic weights (no host weights given)
};

// `weights`: the host checkpoint, whose non-expert tensors (and, with local experts, every
// expert) are uploaded; nullptr: synthetic weights at `config`'s shapes, generated on the GPU.
// `experts`: remote experts (not owned; host or device memory), or nullptr to compute them on
// this GPU. Errors: no CUDA
// device or build (FailedPrecondition), bad options (InvalidArgument), weights that do not fit
// (ResourceExhausted naming the tensor).
absl::StatusOr<std::unique_ptr<ModelForward>> NewCudaForward(const ModelConfig& config,
                                                             const ModelWeights* weights,
                                                             ExpertExecutor* experts,
                                                             const CudaForwardOptions& options);

}  // namespace epx

#endif  // EPX_COORDINATOR_CUDA_FORWARD_H_
