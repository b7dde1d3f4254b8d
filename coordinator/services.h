// The gRPC front end of the coordinator: epx.v1.Generation, epx.v1.Admin and epx.v1.Cluster
// (proto/epx/v1/), the standard grpc.health.v1.Health service and server reflection. The
// services are thin adapters: requests become GenerationRequests for the Scheduler, control-plane
// calls go to the Membership; no model logic lives here.
//
// The server can start before the engine exists (a launcher-free coordinator listens for its
// workers first): generation calls are then UNAVAILABLE until SetScheduler().
//
// Who may call (security/auth.h): with TLS files, gRPC and HTTP serve TLS only (mTLS with a
// client CA); with keys, Generation and Admin calls need "authorization: Bearer KEY" and get
// UNAUTHENTICATED otherwise (logged with the peer, never the key); health and reflection stay
// open. Cluster calls need the job's cluster token (PERMISSION_DENIED, logged).
//
// Health: "" (liveness) is SERVING while the server runs; "epx.v1.Generation" (readiness) is
// SERVING only when every worker is registered and heard from, the data plane has not failed,
// and the server is neither draining nor shutting down. A monitor thread re-evaluates it every
// 100 ms and logs each change with its reason.
//
// Thread-safe: gRPC calls the handlers from its own threads.
#ifndef EPX_COORDINATOR_SERVICES_H_
#define EPX_COORDINATOR_SERVICES_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/key_value_store.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "common/tokenizer.h"
#include "coordinator/membership.h"
#include "coordinator/scheduler.h"
#include "security/auth.h"

namespace google::protobuf {
class Message;
}

namespace epx {

// The JSON the API prints (epx stats --json, the HTTP stats): the proto's field names and every
// field, zeros included (64-bit integers as strings, as proto3 JSON has them).
absl::StatusOr<std::string> MessageJson(const google::protobuf::Message& message);

struct ApiServerOptions {
  std::string listen = "127.0.0.1:50051";  // host:port; port 0 picks a free one
  int64_t max_request_bytes = 1 << 20;     // larger requests: INVALID_ARGUMENT
  // Control-plane callers must present it; empty in a launcher-free cluster started without one.
  std::string cluster_token;
  // Register's answer in a launcher-free cluster: the coordinator's --comm-timeout.
  absl::Duration comm_timeout = absl::Seconds(30);
  // What ModelInfo reports.
  std::string model_name;
  std::string build_id;
  std::string placement_name;  // "local", "round-robin" or a file
  int world_size = 1;
  // The OpenAI-compatible HTTP front end and /metrics (coordinator/http_server.h) on this
  // host:port as well; empty: none.
  std::string http_listen;
  int http_threads = 64;
  // TLS for gRPC and HTTP alike (security/auth.h), read at Start; none when empty.
  ServerTlsOptions tls;
  // Bearer keys of client and admin calls; none: open. The control plane checks the cluster
  // token instead.
  ApiKeys keys;
};

// What the services drive. All must outlive the server. Only the membership is required:
// without a scheduler (yet: SetScheduler) generation calls are UNAVAILABLE naming the reason;
// without a tokenizer the server is a batch job's control plane; placement is null in one
// process; the store is the data plane's rendezvous (launcher-free clusters).
struct ApiServerBackends {
  Scheduler* scheduler = nullptr;
  Membership* membership = nullptr;
  const Tokenizer* tokenizer = nullptr;
  const Placement* placement = nullptr;  // as started (a launcher-free cluster's may change:
                                         // the membership's epoch has the one in use)
  comm::KeyValueStore* store = nullptr;
  // Admin/Shutdown: called once, from a gRPC thread, after the reply is sent; it must not block.
  std::function<void()> on_shutdown;
  // Admin/SetPlacement and Admin/DrainWorker (Runtime::RequestPlacement, RequestDrain):
  // thread-safe, non-blocking. Unset: FAILED_PRECONDITION.
  std::function<absl::Status(const std::string& placement_json)> set_placement;
  std::function<absl::Status(int rank)> drain_worker;
};

class ApiServer {
 public:
  // Binds and starts serving. InvalidArgument for a malformed address or unusable TLS files,
  // Unavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<ApiServer>> Start(const ApiServerOptions& options,
                                                          const ApiServerBackends& backends);
  // Shutdown(), then joins the monitor.
  ~ApiServer();

  int port() const;
  // The HTTP front end's port; 0 without one.
  int http_port() const;
  // host:port as bound.
  std::string address() const;
  // Readiness NOT_SERVING from now on; in-flight calls get `grace` to finish before they are
  // cancelled. Blocks until the server stopped. Idempotent.
  void Shutdown(absl::Duration grace);
  // The scheduler generation calls go to from now on (the cluster has formed). Thread-safe.
  void SetScheduler(Scheduler* scheduler);

  class Impl;

 private:
  explicit ApiServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace epx

#endif  // EPX_COORDINATOR_SERVICES_H_
