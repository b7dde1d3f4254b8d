// The OpenAI-compatible HTTP front end (cpp-httplib): POST /v1/completions and
// /v1/chat/completions (JSON, or server-sent events with "stream": true), GET /v1/models,
// GET /health (liveness), GET /ready (the readiness of gRPC's epx.v1.Generation) and
// GET /metrics (Prometheus text); also the dashboard (coordinator/dashboard/: GET /,
// /dashboard.js, /dashboard.css, embedded in the binary) and the Admin/Stats JSON it reads,
// GET /v1/epx/stats. Requests are read into GenerationParams and go to the same scheduler as
// gRPC's, so the same request with the same seed gives the same tokens on both.
//
// A field the server does not implement gets a 400 naming it, in OpenAI's error JSON
// ({"error": {"message", "type", "param", "code"}}); so does a bad value. A full queue is 429,
// not serving (yet) 503.
//
// With keys, every /v1/ route needs "Authorization: Bearer KEY" (401 in OpenAI's error JSON
// otherwise, with WWW-Authenticate); /health, /ready and /metrics stay open.
//
// Connections are served by a fixed pool of `threads` (each streaming response holds one until
// it ends; further connections wait for one), so threads do not grow with clients.
//
// Thread-safe.
#ifndef EPX_COORDINATOR_HTTP_SERVER_H_
#define EPX_COORDINATOR_HTTP_SERVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/tokenizer.h"
#include "coordinator/generation_params.h"
#include "coordinator/scheduler.h"
#include "nlohmann/json.hpp"
#include "security/auth.h"

namespace epx {

struct HttpServerOptions {
  std::string listen = "127.0.0.1:8000";  // host:port; port 0 picks a free one
  int threads = 64;
  int64_t max_request_bytes = 1 << 20;
  std::string model_name;  // the id /v1/models lists and requests must name (or leave out)
  ServerTlsOptions tls;    // HTTPS (and client certificates) when set; files checked by the caller
  ApiKeys keys;            // /v1/*: "Authorization: Bearer KEY" (401 otherwise)
};

struct HttpBackends {
  // The scheduler, or null with the reason in `*why_not` (the cluster is forming).
  std::function<Scheduler*(std::string* why_not)> scheduler;
  // Empty when ready.
  std::function<std::string()> not_ready_reason;
  std::function<std::string()> metrics_text;
  // Admin/Stats as JSON (MessageJson), for the dashboard: GET /v1/epx/stats.
  std::function<absl::StatusOr<std::string>()> stats_json;
  const Tokenizer* tokenizer = nullptr;
};

// The parts of the API that do not need a socket, for tests and `epx batch`.
namespace openai {

// A request body read into GenerationParams; InvalidArgument naming the field (status payload
// "param" is not used: the message starts with the field's name in quotes). `chat` picks the
// chat completions body.
struct ParsedRequest {
  GenerationParams params;
  bool stream = false;
  bool include_usage = false;
  std::string model;
};
absl::StatusOr<ParsedRequest> ParseRequest(const nlohmann::json& body, bool chat);

// OpenAI's error JSON, and the HTTP status of an absl code.
nlohmann::json ErrorBody(const absl::Status& status);
int HttpStatus(const absl::Status& status);

// A finished request's response body (completion or chat.completion).
nlohmann::json CompletionBody(bool chat, const std::string& id, const std::string& model,
                              int64_t created, const std::string& text, FinishReason finish,
                              int64_t prompt_tokens, int64_t completion_tokens);
const char* FinishReasonText(FinishReason finish);  // "stop" or "length"

// NotFound unless `asked` (a request's "model") is empty or `served`.
absl::Status CheckModel(const std::string& asked, const std::string& served);

// JSON text; text that is not valid UTF-8 (a cut byte sequence) is replaced, never refused.
std::string Dump(const nlohmann::json& j);

// The model id of a checkpoint directory (its name, "mixtral-8x7b" for /models/mixtral-8x7b/).
std::string ModelName(const std::string& model_dir);

}  // namespace openai

// "HOST:PORT" (an IPv6 host in brackets, which are taken off); the port in [0, 65535].
// InvalidArgument naming `flag` otherwise.
struct HttpAddress {
  std::string host;
  int port = 0;
};
absl::StatusOr<HttpAddress> ParseHttpAddress(const std::string& address, absl::string_view flag);

class HttpServer {
 public:
  // InvalidArgument for a malformed address, Unavailable when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const HttpServerOptions& options,
                                                           const HttpBackends& backends);
  ~HttpServer();
  int port() const;
  // Stops accepting, ends open streams (their requests are cancelled) and joins. Idempotent.
  void Shutdown();

  class Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace epx

#endif  // EPX_COORDINATOR_HTTP_SERVER_H_
