// The FFN compute of an expert worker: rows grouped by local expert in, outputs in the same rows.
// The CPU version runs kernels/cpu on the host; the CUDA version (`--device cuda` on a worker)
// keeps the worker's experts on its GPU and runs the same grouped SwiGLU kernels as the
// coordinator's local experts, on device rows and its own stream. Either takes the rows in the
// dtype the coordinator sends (F32 from a CPU coordinator, BF16 from a GPU one) and writes the
// outputs in that dtype where the caller says (for a host compute, the combine payload itself).
//
// Used from the worker's one thread.
#ifndef EPX_WORKER_EXPERT_COMPUTE_H_
#define EPX_WORKER_EXPERT_COMPUTE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/model_weights.h"
#include "common/tensor.h"
#include "kernels/cuda/runtime.h"

namespace epx {

class ExpertCompute {
 public:
  virtual ~ExpertCompute() = default;
  // Where Run() takes and returns rows, and the stream a device compute queues its work on.
  virtual MemoryKind memory() const { return MemoryKind::kHost; }
  virtual cuda::StreamHandle stream() const { return nullptr; }
  // Group g (local expert local_experts[g]) owns rows [offsets[g], offsets[g + 1]) of `rows`;
  // the outputs go to the same rows of `out`. rows, out: [offsets.back(), hidden], both F32 or
  // both BF16, in memory(); offsets on the host. A device compute returns once the work is
  // queued on stream().
  virtual absl::Status Run(int64_t layer, const TensorView& rows,
                           absl::Span<const int64_t> offsets, const TensorView& out) = 0;
  // Makes room for `rows` rows in `groups` groups before they arrive, so that Run() grows no
  // buffer (a device compute's growth waits on its stream, which may then hold the transfer of
  // those rows from a peer). A host compute needs nothing.
  virtual absl::Status Reserve(int64_t rows, int64_t groups) { return absl::OkStatus(); }
  // "cpu" or the GPU's name.
  virtual std::string device() const = 0;
};

struct ExpertComputeOptions {
  std::string device = "cpu";         // or "cuda"
  int cuda_device = 0;
  DType expert_dtype = DType::kBF16;  // cuda: kBF16 or kF8E4M3
  std::string grouped_gemm = "auto";  // cuda: kernels/cuda/ops.h GroupedGemmImpl name
};

// `weights` must hold `local_experts` (FailedPrecondition naming a missing one) and outlive the
// result. The CUDA version uploads them (FailedPrecondition without a device or CUDA build).
absl::StatusOr<std::unique_ptr<ExpertCompute>> NewExpertCompute(
    const ModelWeights& weights, const std::vector<int>& local_experts,
    const ExpertComputeOptions& options);

}  // namespace epx

#endif  // EPX_WORKER_EXPERT_COMPUTE_H_
