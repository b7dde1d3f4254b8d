// The coordinator's view of its expert workers, fed by the control plane (proto/epx/v1/
// cluster.proto). Registration is the cluster's rendezvous: a worker that presents the
// coordinator's build, model config and data plane is admitted and given its rank (the one it
// asked for, or the lowest free one); the coordinator trusts no claimed rank it did not check.
// Readiness of the generation service derives from it: every worker registered, none silent for
// longer than the heartbeat timeout, and the data plane not failed.
//
// Thread-safe: the control-plane handlers, the health monitor, the stats handler and the
// runtime waiting for its workers call it concurrently.
#ifndef EPX_COORDINATOR_MEMBERSHIP_H_
#define EPX_COORDINATOR_MEMBERSHIP_H_

#include <cstdint>
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
  absl::Duration heartbeat_age = absl::InfiniteDuration();
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
  // the coordinator's; InvalidArgument for a requested rank outside 1..W; AlreadyExists for a
  // rank another process holds; ResourceExhausted when all W ranks are taken. The same process
  // (its instance id; without one, host and pid) registering again gets its rank back.
  absl::StatusOr<int> Register(const WorkerInfo& info, absl::Time now);
  // NotFound for a rank that has not registered, or that another process holds (the caller
  // should register again). `instance`: the caller's (WorkerInfo::instance; empty: not checked).
  absl::Status Heartbeat(int rank, const std::string& instance, absl::Time now);
  // The data plane failed: not ready from now on, with `cause` as the reason.
  void MarkFailed(const absl::Status& cause);

  // Blocks until every worker has registered (true) or `timeout` passed (false).
  bool AwaitAllRegistered(absl::Duration timeout) const;
  int num_workers() const { return static_cast<int>(workers_.size()) - 1; }
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
  };
  // The identity checks, before any rank is looked at.
  absl::Status CheckIdentity(const WorkerInfo& info) const;

  const Placement* const placement_;
  const ClusterIdentity identity_;
  const MembershipOptions options_;

  mutable absl::Mutex mu_;
  std::vector<Entry> workers_ ABSL_GUARDED_BY(mu_);  // [rank], index 0 unused; size fixed
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
};

}  // namespace epx

#endif  // EPX_COORDINATOR_MEMBERSHIP_H_
