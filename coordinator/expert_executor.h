// Where the expert FFNs of a MoE layer run. The engine computes routing and hands the layer's
// normalised rows to an ExpertExecutor, which returns one output row per (token, choice) slot.
// Executors take their tensors in their own memory (memory()): the CPU executors and the
// distributed one (whose data plane carries host rows) on the host, the CUDA backend's local
// experts on the device, on the step's stream. A host executor behind a GPU backend is wrapped
// by NewHostStagedExpertExecutor, which carries the rows across.
//
// The rows travel in the backend's activation dtype: F32 on the CPU, BF16 on a GPU.
// Implementations are used from one thread; Run() of a host executor blocks until the outputs are
// written, of a device executor until they are queued on the batch's stream.
#ifndef EPX_COORDINATOR_EXPERT_EXECUTOR_H_
#define EPX_COORDINATOR_EXPERT_EXECUTOR_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_weights.h"
#include "common/tensor.h"
#include "kernels/cuda/runtime.h"

namespace epx {

struct ExpertBatch {
  TensorView x;         // [num_tokens, hidden] F32 or BF16, the normalised hidden states
  TensorView topk_ids;  // [num_tokens, num_topk] I32
  // The backend's stream (device executors queue their work on it); null on the host.
  cuda::StreamHandle stream = nullptr;
};

// Where Run() left the outputs: views into the executor's own buffers, in its memory, valid
// until its next Run().
struct ExpertOutput {
  // [num_rows, hidden], x's dtype: slot t * num_topk + j (expert topk_ids[t, j] applied to x[t])
  // is row row_of_slot[slot], or row `slot` when row_of_slot is empty.
  TensorView rows;
  TensorView row_of_slot;  // [num_tokens * num_topk] I32, or empty (slot order)
  // The layer's tokens per expert as offsets [num_experts + 1] on the host, readable once the
  // stream has synchronised; null when the executor does not count them (the CPU engine does).
  const int32_t* expert_offsets = nullptr;
};

class ExpertExecutor {
 public:
  virtual ~ExpertExecutor() = default;
  virtual MemoryKind memory() const { return MemoryKind::kHost; }
  // Called once at the start of every engine step, before the layers' Run() calls.
  virtual absl::Status BeginStep() { return absl::OkStatus(); }
  virtual absl::StatusOr<ExpertOutput> Run(int layer, const ExpertBatch& batch) = 0;
};

// Runs the experts held by `weights` in this process, on the CPU. Every routed expert must be
// loaded (FailedPrecondition otherwise).
std::unique_ptr<ExpertExecutor> NewLocalExpertExecutor(const ModelWeights* weights);

// A device-memory executor over the host executor `host` (not owned): copies each layer's rows
// and routing to pinned host memory, runs `host` and copies its outputs back, all on the batch's
// stream, and counts the tokens per expert on the host.
std::unique_ptr<ExpertExecutor> NewHostStagedExpertExecutor(ExpertExecutor* host,
                                                            int64_t num_layers,
                                                            int64_t num_experts);

}  // namespace epx

#endif  // EPX_COORDINATOR_EXPERT_EXECUTOR_H_
