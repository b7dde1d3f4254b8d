// The Prometheus exposition of a coordinator (GET /metrics): the names vLLM users chart, under
// the "epx:" prefix (requests running and waiting, KV cache use, latency histograms, token and
// request counters), and what only an expert-parallel runtime has: tokens routed per layer and
// expert, time per layer and phase, and the workers' liveness. The counters are those of
// Admin/Stats, read at the same instant.
#ifndef EPX_COORDINATOR_SERVING_METRICS_H_
#define EPX_COORDINATOR_SERVING_METRICS_H_

#include <string>

#include "coordinator/membership.h"
#include "coordinator/scheduler.h"

namespace epx {

// `scheduler` may be null (the cluster is forming): then only the workers are reported.
std::string ServingMetricsText(const Scheduler* scheduler, const Membership& membership,
                               const std::string& model_name);

}  // namespace epx

#endif  // EPX_COORDINATOR_SERVING_METRICS_H_
