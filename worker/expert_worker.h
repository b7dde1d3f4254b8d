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

namespace epx {

struct ExpertWorkerOptions {
  // Limit on each per-layer exchange once a step has begun. Waiting for the next step header
  // has no limit (an idle server).
  absl::Duration timeout = absl::Seconds(30);
};

// REQUIRES: `weights` holds the experts placement.experts_of(comm->rank()).
absl::Status RunExpertWorker(comm::Communicator* comm, const ModelWeights& weights,
                             const Placement& placement, const ExpertWorkerOptions& options);

}  // namespace epx

#endif  // EPX_WORKER_EXPERT_WORKER_H_
