// A worker's side of the cluster control plane (proto/epx/v1/cluster.proto).
//
// Launcher-free (`epx worker --coordinator HOST:PORT`): Register() blocks until the coordinator
// answers, retrying with a bounded back-off while it cannot be reached (a worker may start
// first), and returns the worker's Assignment: rank, world size, placement and data plane. The
// data plane then bootstraps through store(), the coordinator's rendezvous store.
// Under mpirun: Start() registers in the background with the launcher's rank.
// Either way StartHeartbeats() keeps the coordinator informed, re-registering if it does not
// know the worker; those errors are logged and retried, never fatal: the data plane, not the
// control plane, decides whether the job lives.
//
// Thread-safe: construct and destroy from one thread; heartbeats run on an internal thread;
// store() may be used from any thread.
#ifndef EPX_WORKER_CONTROL_CLIENT_H_
#define EPX_WORKER_CONTROL_CLIENT_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "comm/key_value_store.h"
#include "common/worker_info.h"
#include "security/auth.h"

namespace epx {

// What the coordinator answers a registration with.
struct Assignment {
  int rank = 0;
  int world_size = 0;
  std::string placement_json;  // a placement file (common/placement.h)
  std::string data_plane;
  std::string store_prefix;
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  absl::Duration comm_timeout = absl::Seconds(30);
};

// A formation of the data plane the worker is a member of (Cluster.AwaitEpoch).
struct EpochAssignment {
  int64_t epoch = 0;
  int data_plane_rank = 0;
  int world_size = 0;
  std::string placement_json;  // in data-plane ranks
  std::string store_prefix;
  std::vector<int> members;  // [data-plane rank] -> worker rank
};

class ControlClient {
 public:
  // A client of the control plane at `address` (HOST:PORT) presenting `token`, over TLS when
  // `tls` is enabled (security/auth.h). Connects lazily.
  static std::unique_ptr<ControlClient> Create(const std::string& address, const std::string& token,
                                               const ClientTls& tls = {});
  // Under mpirun: `endpoint` is "HOST:PORT TOKEN" as the coordinator shares it (InvalidArgument
  // if malformed); registers `self` (its launcher rank and experts) in the background and sends
  // heartbeats.
  static absl::StatusOr<std::unique_ptr<ControlClient>> Start(const std::string& endpoint,
                                                              const WorkerInfo& self,
                                                              const ClientTls& tls = {});
  // What Start() expects, from the address workers reach the control plane at and the token.
  static std::string Endpoint(const std::string& address, const std::string& token);

  // Stops the heartbeats and joins the thread (at most one call's deadline).
  ~ControlClient();

  // Registers `self` (self.rank: the rank asked for, 0 for any). While the coordinator cannot
  // be reached (UNAVAILABLE), retries after 100 ms, doubling up to 2 s, for at most `patience`,
  // logging each new error once. Errors: the coordinator's refusal with its code and message
  // (FailedPrecondition, AlreadyExists, ResourceExhausted, InvalidArgument, PermissionDenied),
  // prefixed with "the coordinator at HOST:PORT refused this worker"; DeadlineExceeded when no
  // coordinator answered within `patience`.
  absl::StatusOr<Assignment> Register(const WorkerInfo& self, absl::Duration patience);
  // The next data plane worker `self` (registered) is a member of, after epoch `after`: waits
  // for the coordinator to form it, asking again while it has not (or cannot be reached), for
  // at most `patience`. Errors: the coordinator's refusal (FailedPrecondition once this worker
  // was removed from the cluster), DeadlineExceeded past `patience`, Cancelled on destruction.
  absl::StatusOr<EpochAssignment> AwaitEpoch(const WorkerInfo& self, int64_t after,
                                             absl::Duration patience);
  // From now on sends a heartbeat every `interval` (self.rank: the assigned rank), registering
  // `self` again whenever the coordinator does not know it. If the coordinator answers nothing
  // for `lost_after`, calls `on_lost` once from the heartbeat thread. Call once.
  void StartHeartbeats(const WorkerInfo& self, absl::Duration interval,
                       absl::Duration lost_after = absl::InfiniteDuration(),
                       std::function<void()> on_lost = nullptr);
  // Launcher-free: the heartbeats from now on report `experts` as loaded. Thread-safe.
  void SetLoaded(std::vector<int> experts);
  // Called from the heartbeat thread whenever the coordinator answers a newer target version:
  // the experts this worker should hold. Set before StartHeartbeats.
  void OnTarget(std::function<void(int64_t version, std::vector<int> experts)> on_target) {
    on_target_ = std::move(on_target);
  }

  // Called from the heartbeat thread whenever the coordinator answers a newer left epoch: it left
  // that epoch's data plane after a failure (a worker still waiting on it should stop). Set
  // before StartHeartbeats.
  void OnLeftEpoch(std::function<void(int64_t epoch)> on_left) { on_left_ = std::move(on_left); }

  // The coordinator's rendezvous store (StoreSet/StoreGet). Owned by this client.
  comm::KeyValueStore* store();
  const std::string& address() const;

  class Stub;

 private:
  explicit ControlClient(std::unique_ptr<Stub> stub);
  void Loop(WorkerInfo self, absl::Duration interval, bool registered, absl::Duration lost_after,
            std::function<void()> on_lost);

  std::unique_ptr<Stub> stub_;
  std::function<void(int64_t, std::vector<int>)> on_target_;
  std::function<void(int64_t)> on_left_;
  absl::Mutex loaded_mu_;
  std::optional<std::vector<int>> loaded_ ABSL_GUARDED_BY(loaded_mu_);
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace epx

#endif  // EPX_WORKER_CONTROL_CLIENT_H_
