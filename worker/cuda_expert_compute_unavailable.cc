// NewCudaExpertCompute for builds without CUDA.
#include "worker/expert_compute.h"

namespace epx {

absl::StatusOr<std::unique_ptr<ExpertCompute>> NewCudaExpertCompute(const ModelWeights&,
                                                                    const std::vector<int>&,
                                                                    const ExpertComputeOptions&) {
  return absl::FailedPreconditionError(
      "--device cuda: this epx was built without CUDA (nvcc not found, or "
      "-DEPX_ENABLE_CUDA=OFF); rebuild on a machine with the CUDA toolkit");
}

}  // namespace epx
