// The expert worker's step loop (comm/protocol.h): wait for a step header; for a forward step,
// for every layer receive the row counts and rows of this worker's experts, run the SwiGLU FFN of
// each local expert over its rows, and send the outputs back in the same order. A loop over one
// data plane ends on a shutdown or re-form header, or at the first communication error (naming
// the layer).
//
// A worker computes the experts it loaded; each data plane's placement gives it those or fewer
// (a re-formed cluster keeps every survivor's experts, and uses the replicas that are left).
//
// Blocks for the life of the job; one thread.
#ifndef EPX_WORKER_EXPERT_WORKER_H_
#define EPX_WORKER_EXPERT_WORKER_H_

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/communicator.h"
#include "common/model_weights.h"
#include "common/placement.h"
#include "worker/expert_compute.h"

namespace epx {

struct ExpertWorkerOptions {
  // Limit on each wait of a worker. None by default: within a step a worker waits on the
  // coordinator's attention and the other workers' experts, which a long prefill makes
  // arbitrarily slow, and between steps it idles. The coordinator applies the timeouts (it
  // reports a silent worker and aborts the job); a dead coordinator ends the job via the launcher.
  absl::Duration timeout = absl::InfiniteDuration();
  // Where the FFNs run (CPU, or this rank's GPU).
  ExpertComputeOptions compute;
};

// How the loop over one data plane ended.
enum class WorkerLoopEnd { kShutdown, kReform };

class ExpertWorker {
 public:
  // Computes `loaded` (ascending) of `weights`, which must hold them and outlive the worker.
  static absl::StatusOr<std::unique_ptr<ExpertWorker>> Create(const ModelWeights& weights,
                                                              std::vector<int> loaded,
                                                              const ExpertWorkerOptions& options);
  ~ExpertWorker();

  // Serves the steps of `comm`, where this worker holds `experts` (ascending; FailedPrecondition
  // naming one that was not loaded), until the coordinator ends the job or re-forms the data
  // plane. Errors: the data plane failed (the communicator is then unusable).
  absl::StatusOr<WorkerLoopEnd> Serve(comm::Communicator* comm, const std::vector<int>& experts);
  const std::vector<int>& loaded() const { return loaded_; }

  class DeviceStepLoop;

 private:
  ExpertWorker(const ModelWeights& weights, std::vector<int> loaded,
               const ExpertWorkerOptions& options, std::unique_ptr<ExpertCompute> compute);

  const ModelWeights& weights_;
  const std::vector<int> loaded_;
  const ExpertWorkerOptions options_;
  std::unique_ptr<ExpertCompute> compute_;
  std::unique_ptr<DeviceStepLoop> device_loop_;
};

// One data plane: ExpertWorker over placement.experts_of(comm->rank()), served until the
// coordinator ends the job (OK) or the first error. REQUIRES: `weights` holds those experts.
absl::Status RunExpertWorker(comm::Communicator* comm, const ModelWeights& weights,
                             const Placement& placement, const ExpertWorkerOptions& options);

}  // namespace epx

#endif  // EPX_WORKER_EXPERT_WORKER_H_
