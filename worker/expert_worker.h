// The expert worker's step loop (comm/protocol.h): wait for a step header; for a forward step,
// for every layer receive the row counts and rows of this worker's experts, run the SwiGLU FFN of
// each local expert over its rows, and send the outputs back in the same order. Returns OK on a
// shutdown header, or the first communication error (naming the layer).
//
// Blocks for the life of the job; one thread.
#ifndef EPX_WORKER_EXPERT_WORKER_H_
#define EPX_WORKER_EXPERT_WORKER_H_

#include "absl/status/status.h"
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

// REQUIRES: `weights` holds the experts placement.experts_of(comm->rank()).
absl::Status RunExpertWorker(comm::Communicator* comm, const ModelWeights& weights,
                             const Placement& placement, const ExpertWorkerOptions& options);

}  // namespace epx

#endif  // EPX_WORKER_EXPERT_WORKER_H_
