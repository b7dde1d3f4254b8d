// New placements for a cluster that changes while serving (runtime/runtime.h): a worker that
// drains, a worker that joins, and rebalancing for the router's load. Every result is a
// placement over the same worker slots (worker ranks), in which a worker may be idle.
// Deterministic: the same inputs give the same placement (ties go to the lower index).
#ifndef EPX_COMMON_PLACEMENT_PLANNER_H_
#define EPX_COMMON_PLACEMENT_PLANNER_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/placement.h"

namespace epx {

// `base` with worker `rank` idle: an expert it alone held moves to the worker of `workers`
// (those in the cluster) holding the fewest experts; the others just lose that copy.
// FailedPrecondition when no other worker is left.
absl::StatusOr<Placement> DrainPlacement(const Placement& base, int rank,
                                         const std::vector<int>& workers);

// `base` over `num_workers` slots with worker `rank` (idle in it) given a copy of each of the
// experts with the fewest replicas, as many as an average worker of `workers` holds (at least
// one).
absl::StatusOr<Placement> GrowPlacement(const Placement& base, int rank, int num_workers,
                                        const std::vector<int>& workers);

// The placement over `workers` that serves `load` (tokens routed per expert) best with as many
// copies as `base` has, and at least one spare per worker (as vLLM's EPLB keeps redundant
// experts): copies go one by one to the expert with the most load per copy, and each copy to the
// worker with the least load that does not hold the expert yet, preferring one that holds it in
// `base` (so that little moves).
absl::StatusOr<Placement> RebalancePlacement(const Placement& base,
                                             const std::vector<int64_t>& load,
                                             const std::vector<int>& workers);

// The most load any worker of `placement` serves, each expert's load split evenly over its
// replicas.
double BusiestWorkerLoad(const Placement& placement, const std::vector<int64_t>& load);

}  // namespace epx

#endif  // EPX_COMMON_PLACEMENT_PLANNER_H_
