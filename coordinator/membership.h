// The coordinator's view of its expert workers, fed by the control plane (proto/epx/v1/
// cluster.proto): which workers registered, with what, and whether each is still heard from.
// Readiness of the generation service derives from it: every worker registered, none silent for
// longer than the heartbeat timeout, and the data plane not failed.
//
// Thread-safe: the control-plane handlers, the health monitor and the stats handler call it
// concurrently.
#ifndef EPX_COORDINATOR_MEMBERSHIP_H_
#define EPX_COORDINATOR_MEMBERSHIP_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
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

class Membership {
 public:
  // Expects workers 1..placement.num_workers() (none when `placement` is null: a single
  // process, always ready unless the data plane failed).
  Membership(const Placement* placement, std::string build_id, uint64_t config_hash,
             const MembershipOptions& options);

  // Records a worker. InvalidArgument for a rank outside 1..W; FailedPrecondition, naming both
  // values, for a build, config hash or expert set other than the coordinator's. A worker may
  // register again (after a restart of its control-plane client); the last one counts.
  absl::Status Register(const WorkerInfo& info, absl::Time now);
  // NotFound for a rank that has not registered (it should register again).
  absl::Status Heartbeat(int rank, absl::Time now);
  // The data plane failed: not ready from now on, with `cause` as the reason.
  void MarkFailed(const absl::Status& cause);

  // Empty when ready; else why not (the first worker missing or silent, or the failure).
  std::string NotReadyReason(absl::Time now) const;
  std::vector<WorkerState> Workers(absl::Time now) const;
  const MembershipOptions& options() const { return options_; }

 private:
  struct Entry {
    WorkerInfo info;
    bool registered = false;
    absl::Time last_heartbeat = absl::InfinitePast();
  };
  const Placement* const placement_;
  const std::string build_id_;
  const uint64_t config_hash_;
  const MembershipOptions options_;

  mutable absl::Mutex mu_;
  std::vector<Entry> workers_ ABSL_GUARDED_BY(mu_);  // [rank], index 0 unused
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
};

}  // namespace epx

#endif  // EPX_COORDINATOR_MEMBERSHIP_H_
