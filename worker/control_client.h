// A worker's side of the cluster control plane (proto/epx/v1/cluster.proto): registers with the
// coordinator (rank, host, device, build, config hash, experts held), then sends a heartbeat
// every interval the coordinator asked for, re-registering if the coordinator does not know it.
// Runs on its own thread next to the worker's step loop; errors are logged and retried, never
// fatal: the data plane, not the control plane, decides whether the job lives.
//
// Thread-safe: construct and destroy from one thread; the work happens on an internal thread.
#ifndef EPX_WORKER_CONTROL_CLIENT_H_
#define EPX_WORKER_CONTROL_CLIENT_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "common/worker_info.h"

namespace epx {

class ControlClient {
 public:
  // `endpoint` is "HOST:PORT TOKEN" as the coordinator shares it. InvalidArgument if malformed.
  static absl::StatusOr<std::unique_ptr<ControlClient>> Start(const std::string& endpoint,
                                                              const WorkerInfo& self);
  // Stops the heartbeats and joins the thread (at most one call's deadline).
  ~ControlClient();

  // What Start() expects, from the address workers reach the control plane at and the token.
  static std::string Endpoint(const std::string& address, const std::string& token);

 private:
  ControlClient() = default;
  void Loop(std::string address, std::string token, WorkerInfo self);

  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace epx

#endif  // EPX_WORKER_CONTROL_CLIENT_H_
