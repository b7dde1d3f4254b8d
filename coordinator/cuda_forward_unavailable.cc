// NewCudaForward for builds without CUDA.
#include "coordinator/cuda_forward.h"

namespace epx {

absl::StatusOr<std::unique_ptr<ModelForward>> NewCudaForward(const ModelConfig&,
                                                             const ModelWeights*, ExpertExecutor*,
                                                             const CudaForwardOptions&) {
  return absl::FailedPreconditionError(
      "--device cuda: this epx was built without CUDA (nvcc not found, or "
      "-DEPX_ENABLE_CUDA=OFF); rebuild on a machine with the CUDA toolkit");
}

}  // namespace epx
