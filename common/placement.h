// Which expert workers hold which experts. Ranks: 0 is the coordinator, 1..num_workers the
// workers. An expert may sit on several workers (replicas); its routed rows are then split among
// them deterministically (row i of the expert's group goes to replica i mod num_replicas), so
// results never depend on the placement.
//
// Immutable after construction; thread-safe to share.
#ifndef EPX_COMMON_PLACEMENT_H_
#define EPX_COMMON_PLACEMENT_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace epx {

class Placement {
 public:
  // `replicas` copies of every expert (--replicas R): replica j of expert e on worker
  // 1 + (e * R + j) % W, so the copies of an expert sit on distinct workers and every worker
  // holds about E * R / W experts. When W >= E * R, worker w holds expert (w - 1) % E instead, so
  // that every worker works (experts then get W / E replicas or more). With R = 1: expert e on
  // worker 1 + e % W. InvalidArgument for W < 1, E < 1, R < 1 or R > W.
  static absl::StatusOr<Placement> RoundRobin(int num_experts, int num_workers, int replicas = 1);

  // `base` among the workers still in the cluster: members[i] is the base rank that becomes
  // rank i (members[0] = 0, the coordinator; the others ascending), and each expert keeps the
  // replicas that are members. FailedPrecondition naming the first expert left without one.
  static absl::StatusOr<Placement> Among(const Placement& base, const std::vector<int>& members);

  // Parses a placement file: JSON {"experts": {"0": [1, 2], "1": [3], ...}} mapping every expert
  // to the worker ranks holding it. Errors name the file and the offending entry: an expert
  // missing or unknown, a rank outside 1..num_workers, a repeated rank, a worker with no expert.
  static absl::StatusOr<Placement> FromFile(const std::string& path, int num_experts,
                                            int num_workers);
  // `allow_idle`: a worker may hold no expert (a placement the cluster moves to, where a
  // draining worker holds none).
  static absl::StatusOr<Placement> FromJson(const std::string& text, int num_experts,
                                            int num_workers, const std::string& source,
                                            bool allow_idle = false);
  // replicas[e]: the worker ranks holding expert e (none empty); workers may be idle.
  static absl::StatusOr<Placement> FromReplicas(std::vector<std::vector<int>> replicas,
                                                int num_workers, const std::string& source);

  int num_experts() const { return static_cast<int>(replicas_.size()); }
  int num_workers() const { return num_workers_; }
  // Worker ranks holding `expert`, ascending.
  const std::vector<int>& replicas(int expert) const { return replicas_[expert]; }
  // Experts held by worker `rank`, ascending (its local expert order).
  const std::vector<int>& experts_of(int rank) const { return experts_of_[rank]; }
  // Index of `expert` among experts_of(rank), or -1.
  int LocalIndex(int rank, int expert) const;
  // "expert 0 -> [1, 2]; expert 1 -> [3]; ..."
  std::string ToString() const;
  // The placement file FromJson() reads back to an equal placement (how a launcher-free
  // coordinator hands a worker the placement).
  std::string ToJson() const;

 private:
  static absl::StatusOr<Placement> Build(std::vector<std::vector<int>> replicas, int num_workers,
                                         const std::string& source, bool allow_idle = false);
  int num_workers_ = 0;
  std::vector<std::vector<int>> replicas_;    // [expert] -> ranks
  std::vector<std::vector<int>> experts_of_;  // [rank] -> experts (index 0 unused)
};

}  // namespace epx

#endif  // EPX_COMMON_PLACEMENT_H_
