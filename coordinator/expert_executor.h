// Where the expert FFNs of a MoE layer run. The engine computes routing and hands the routed
// rows to an ExpertExecutor; the executor returns one output row per (token, choice) slot. The
// local executor computes every expert in this process; a distributed executor sends the rows to
// the workers holding each expert over a comm::Communicator and brings them back.
//
// Run() blocks until all slot outputs are written. Implementations are used from one thread.
#ifndef EPX_COORDINATOR_EXPERT_EXECUTOR_H_
#define EPX_COORDINATOR_EXPERT_EXECUTOR_H_

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "common/model_weights.h"
#include "common/tensor.h"

namespace epx {

class ExpertExecutor {
 public:
  virtual ~ExpertExecutor() = default;
  // Called once at the start of every engine step, before the layers' Run() calls.
  virtual absl::Status BeginStep() { return absl::OkStatus(); }
  // x: [num_tokens, hidden] F32, the normalised hidden states; topk_ids: [num_tokens, num_topk]
  // I32; slot_out: [num_tokens * num_topk, hidden] F32, row t * num_topk + j gets expert
  // topk_ids[t, j] applied to x[t].
  virtual absl::Status Run(int layer, const TensorView& x, const TensorView& topk_ids,
                           const TensorView& slot_out) = 0;
};

// Runs the experts held by `weights` in this process. Every routed expert must be loaded
// (FailedPrecondition otherwise).
std::unique_ptr<ExpertExecutor> NewLocalExpertExecutor(const ModelWeights* weights);

}  // namespace epx

#endif  // EPX_COORDINATOR_EXPERT_EXECUTOR_H_
