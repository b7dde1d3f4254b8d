#include "common/placement_planner.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace epx {

absl::StatusOr<Placement> DrainPlacement(const Placement& base, int rank,
                                         const std::vector<int>& workers) {
  std::vector<int> others;
  for (int w : workers)
    if (w != rank && w <= base.num_workers()) others.push_back(w);
  if (others.empty())
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", rank, " is the last worker: there is nowhere to move its experts"));
  std::vector<int> held(base.num_workers() + 1, 0);
  for (int w : others) held[w] = static_cast<int>(base.experts_of(w).size());
  std::vector<std::vector<int>> replicas(base.num_experts());
  for (int e = 0; e < base.num_experts(); ++e) {
    for (int w : base.replicas(e))
      if (w != rank) replicas[e].push_back(w);
    if (!replicas[e].empty()) continue;
    int to = others[0];
    for (int w : others)
      if (held[w] < held[to]) to = w;
    replicas[e].push_back(to);
    ++held[to];
  }
  return Placement::FromReplicas(std::move(replicas), base.num_workers(), "the drained placement");
}

absl::StatusOr<Placement> GrowPlacement(const Placement& base, int rank, int num_workers,
                                        const std::vector<int>& workers) {
  std::vector<std::vector<int>> replicas(base.num_experts());
  int64_t copies = 0;
  for (int e = 0; e < base.num_experts(); ++e) {
    replicas[e] = base.replicas(e);
    copies += static_cast<int64_t>(replicas[e].size());
  }
  const int64_t share =
      std::max<int64_t>(1, copies / std::max<int64_t>(1, static_cast<int64_t>(workers.size())));
  std::vector<int> order(base.num_experts());
  for (int e = 0; e < base.num_experts(); ++e) order[e] = e;
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return replicas[a].size() < replicas[b].size(); });
  for (int64_t i = 0; i < share && i < static_cast<int64_t>(order.size()); ++i)
    replicas[order[i]].push_back(rank);
  return Placement::FromReplicas(std::move(replicas), num_workers, "the grown placement");
}

absl::StatusOr<Placement> RebalancePlacement(const Placement& base,
                                             const std::vector<int64_t>& load,
                                             const std::vector<int>& workers) {
  const int E = base.num_experts();
  const int W = static_cast<int>(workers.size());
  // As many copies as now, and at least one spare per worker for the hot experts (as vLLM's
  // EPLB keeps redundant experts).
  int64_t copies = E + W;
  int64_t now = 0;
  for (int e = 0; e < E; ++e) now += static_cast<int64_t>(base.replicas(e).size());
  copies = std::max(copies, now);
  std::vector<int> count(E, 1);
  for (int64_t c = E; c < copies; ++c) {
    int best = -1;
    for (int e = 0; e < E; ++e) {
      if (count[e] >= W) continue;
      if (best < 0 || load[e] * count[best] > load[best] * count[e]) best = e;
    }
    if (best < 0) break;
    ++count[best];
  }
  std::vector<int> order(E);
  for (int e = 0; e < E; ++e) order[e] = e;
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return load[a] * count[b] > load[b] * count[a]; });
  std::vector<double> worker_load(base.num_workers() + 1, 0);
  std::vector<int> worker_experts(base.num_workers() + 1, 0);
  std::vector<std::vector<int>> replicas(E);
  for (int e : order) {
    const double share = static_cast<double>(load[e]) / count[e];
    for (int c = 0; c < count[e]; ++c) {
      int to = -1;
      bool to_held = false;
      for (int w : workers) {
        if (std::find(replicas[e].begin(), replicas[e].end(), w) != replicas[e].end()) continue;
        const bool held = base.LocalIndex(w, e) >= 0;
        if (to < 0 || (held && !to_held) ||
            (held == to_held &&
             (worker_load[w] < worker_load[to] ||
              (worker_load[w] == worker_load[to] && worker_experts[w] < worker_experts[to])))) {
          to = w;
          to_held = held;
        }
      }
      replicas[e].push_back(to);
      worker_load[to] += share;
      ++worker_experts[to];
    }
  }
  return Placement::FromReplicas(std::move(replicas), base.num_workers(),
                                 "the rebalanced placement");
}

double BusiestWorkerLoad(const Placement& placement, const std::vector<int64_t>& load) {
  std::vector<double> per(placement.num_workers() + 1, 0);
  for (int e = 0; e < placement.num_experts(); ++e)
    for (int w : placement.replicas(e))
      per[w] += static_cast<double>(load[e]) / placement.replicas(e).size();
  return *std::max_element(per.begin(), per.end());
}

}  // namespace epx
