// The coordinator's view of its expert workers, fed by the control plane (proto/epx/v1/
// cluster.proto). Registration is the cluster's rendezvous: a worker that presents the
// coordinator's build, model config and data plane is admitted and given its rank (the one it
// asked for, or the lowest free one); the coordinator trusts no claimed rank it did not check.
//
// The cluster has W worker slots (the placement's workers). Each formation of the data plane is
// an epoch the runtime publishes: the workers in it (its members, renumbered 0..n in rank
// order), the store prefix of its rendezvous and its placement. Epoch 1 has every slot; a worker
// lost (MarkLost) frees its slot, and the next epoch leaves it out; a new worker may then take the
// slot and be a member of the epoch after. A worker learns its epoch through AwaitEpoch, and the
// coordinator learns from the same calls which workers wait for the next one (AwaitWaiting).
//
// Readiness of the generation service derives from it: every member of the current epoch
// registered, none silent for longer than the heartbeat timeout, no reason set by the runtime
// (SetNotServing: an expert without a live worker, a data plane re-forming), and the data plane
// not failed for good.
//
// Thread-safe: the control-plane handlers, the health monitor, the stats handler and the
// runtime waiting for its workers call it concurrently.
#ifndef EPX_COORDINATOR_MEMBERSHIP_H_
#define EPX_COORDINATOR_MEMBERSHIP_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/placement.h"
#include "common/worker_info.h"

namespace epx {

struct WorkerState {
  WorkerInfo info;
  bool registered = false;
  bool alive = false;  // heartbeat within the timeout
  bool member = false;  // in the current epoch's data plane
  absl::Duration heartbeat_age = absl::InfiniteDuration();
};

// One formation of the data plane.
struct ClusterEpoch {
  int64_t number = 0;          // 1: the first formation
  std::vector<int> members;    // [data-plane rank] -> worker rank; members[0] = 0 (coordinator)
  std::string store_prefix;    // its keys in the rendezvous store
  std::string placement_json;  // the placement in data-plane ranks (a placement file)
  std::string placement_text;  // the same in worker ranks, for people ("expert 0 -> [1, 2]; ...")
  std::vector<std::vector<int>> experts;  // [data-plane rank] -> its experts

  // The data-plane rank of worker `rank`, or -1 when it is not a member.
  int DataPlaneRank(int rank) const;
};

// The experts a worker should hold (the placement the coordinator moves to), with its version.
struct ExpertTarget {
  int64_t version = 0;
  std::vector<int> experts;
};

// What happened to the cluster, for Stats and the logs.
struct ClusterEvent {
  absl::Time time;
  std::string kind;  // "lost", "left", "joined", "re-formed", "re-placement", "not serving"
  int rank = 0;      // the worker it concerns; 0: the cluster
  std::string message;
};

struct MembershipOptions {
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  absl::Duration heartbeat_timeout = absl::Seconds(3);
};

// What every worker must share with the coordinator.
struct ClusterIdentity {
  std::string build_id;
  uint64_t config_hash = 0;
  std::string data_plane;  // resolved
};

class Membership {
 public:
  // Expects workers 1..placement.num_workers() (none when `placement` is null: a single
  // process, always ready unless the data plane failed). `placement` must outlive this.
  Membership(const Placement* placement, ClusterIdentity identity,
             const MembershipOptions& options);

  // Admits a worker and returns its rank. FailedPrecondition, naming the worker and both
  // values, for a build, config hash, data plane or (when it lists them) expert set other than
  // the coordinator's, or for a process that was removed from the cluster (MarkLost);
  // InvalidArgument for a requested rank outside 1..W; AlreadyExists for a rank another process
  // holds; ResourceExhausted when all W ranks are taken. The same process (its instance id;
  // without one, host and pid) registering again gets its rank back.
  absl::StatusOr<int> Register(const WorkerInfo& info, absl::Time now);
  // Blocks until an epoch after `after` has worker `rank` (the process `instance`) as a member,
  // and returns it. Unavailable when `timeout` passes first (ask again), NotFound for a rank
  // `instance` does not hold, FailedPrecondition (with the reason) once it was removed. Also
  // tells AwaitWaiting that the worker waits for the next epoch.
  absl::StatusOr<ClusterEpoch> AwaitEpoch(int rank, const std::string& instance, int64_t after,
                                          absl::Duration timeout);
  // Of `ranks`, those waiting for the next epoch (a member of the current one asked for an
  // epoch after it; a worker in none asked at all), once all are or `timeout` passed; a rank
  // silent for longer than the heartbeat timeout, or not registered, is not waited for.
  std::vector<int> AwaitWaiting(const std::vector<int>& ranks, absl::Duration timeout) const;
  // The worker is out of the cluster: its slot is free for a new worker, and its process is
  // refused from now on.
  void MarkLost(int rank, const std::string& reason, absl::Time now);
  // The same for a worker that leaves in good order (drained): its AwaitEpoch answers
  // Cancelled with `reason`, and it exits cleanly.
  void Release(int rank, const std::string& reason, absl::Time now);
  // The data plane forms as `epoch` (numbers ascending, members registered): its members'
  // processes are in it, and AwaitEpoch hands it to them.
  void PublishEpoch(ClusterEpoch epoch, absl::Time now);
  ClusterEpoch epoch() const;
  // The coordinator left the data plane of epoch `number` after a failure: heartbeats tell the
  // workers (left_epoch()), so that one still waiting on it stops (NCCL).
  void LeftEpoch(int64_t number);
  int64_t left_epoch() const;
  // Registered workers whose process is in no epoch yet (they wait to join the next).
  std::vector<int> Joiners() const;
  // Registered workers, ascending.
  std::vector<int> Registered() const;
  // Why the cluster cannot serve now (empty: it can); part of NotReadyReason and an event.
  void SetNotServing(const std::string& reason, absl::Time now);
  // Adds `event` to the history (the last 256 are kept) and logs it.
  void Record(ClusterEvent event);
  std::vector<ClusterEvent> events() const;
  // NotFound for a rank that has not registered, or that another process holds (the caller
  // should register again). `instance`: the caller's (WorkerInfo::instance; empty: not checked).
  absl::Status Heartbeat(int rank, const std::string& instance, absl::Time now);
  // A heartbeat that also reports the experts the worker has loaded, answered with the experts
  // it should hold (a worker loads those in the background; the coordinator moves to a new
  // placement once every worker it needs has them).
  absl::StatusOr<ExpertTarget> Heartbeat(int rank, const std::string& instance,
                                         const std::vector<int>& loaded, absl::Time now);
  // The experts each worker slot should hold ([rank], index 0 unused; slots beyond its size:
  // none), as version `version`. Slots it names beyond the current ones are added.
  void SetTargets(int64_t version, const std::vector<std::vector<int>>& experts_of,
                  const std::string& text = "");
  // The target's version and text (SetTargets).
  std::pair<int64_t, std::string> target() const;
  // The experts worker `rank` last reported loaded; none before its first report.
  std::optional<std::vector<int>> Loaded(int rank) const;
  // After the first formation: a worker registering when every slot is held gets a new one, up
  // to `max_workers` slots (scale up).
  void AllowGrowth(int max_workers);
  // The data plane failed: not ready from now on, with `cause` as the reason.
  void MarkFailed(const absl::Status& cause);

  // Blocks until every worker slot is registered (true) or `timeout` passed (false).
  bool AwaitAllRegistered(absl::Duration timeout) const;
  int num_workers() const;  // worker slots
  int num_registered() const;

  // Empty when ready; else why not (the first worker missing or silent, or the failure).
  std::string NotReadyReason(absl::Time now) const;
  std::vector<WorkerState> Workers(absl::Time now) const;
  const MembershipOptions& options() const { return options_; }
  const ClusterIdentity& identity() const { return identity_; }

 private:
  struct Entry {
    WorkerInfo info;
    bool registered = false;
    absl::Time last_heartbeat = absl::InfinitePast();
    int64_t back_after = -1;  // the process asked for an epoch after this one (AwaitEpoch)
    int64_t joined = 0;       // the epoch this process is a member of (0: none yet)
    std::vector<int> target;  // the experts the slot should hold
    std::vector<int> loaded;  // the experts its process reported loaded
    bool reported = false;
  };
  // The process in slot `rank` waits for the next epoch.
  bool WaitingLocked(int rank) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RecordLocked(ClusterEvent event) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The identity checks, before any rank is looked at.
  absl::Status CheckIdentity(const WorkerInfo& info) const;

  const Placement* const placement_;
  const ClusterIdentity identity_;
  const MembershipOptions options_;

  mutable absl::Mutex mu_;
  std::vector<Entry> workers_ ABSL_GUARDED_BY(mu_);  // [rank], index 0 unused; grows (scale up)
  int max_workers_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t target_version_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t left_epoch_ ABSL_GUARDED_BY(mu_) = 0;
  std::string target_text_ ABSL_GUARDED_BY(mu_);
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
  ClusterEpoch epoch_ ABSL_GUARDED_BY(mu_);
  std::string not_serving_ ABSL_GUARDED_BY(mu_);
  // Processes removed from the cluster (instance, or host:pid), why, and whether they left in
  // good order.
  struct Removed {
    std::string key, why;
    bool released = false;
  };
  std::vector<Removed> removed_ ABSL_GUARDED_BY(mu_);
  void RemoveLocked(int rank, const std::string& reason, bool released, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<ClusterEvent> events_ ABSL_GUARDED_BY(mu_);
};

}  // namespace epx

#endif  // EPX_COORDINATOR_MEMBERSHIP_H_
