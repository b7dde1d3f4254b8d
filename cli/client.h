// The client side of `epx`: commands that talk to a running `epx serve` over gRPC (generate with
// --server, health, stats, drain, shutdown, model-info). main.cc parses flags into these option
// structs and calls one Run...() function; output goes to the given streams.
//
// Every call carries a deadline of ClientOptions::timeout_s. A non-OK gRPC status comes back as an
// absl::Status with the same code and a message that starts with the server address and the
// method. Each function blocks until its calls end and is thread-safe as long as the streams are
// not shared between threads (each call makes its own channel).
#ifndef EPX_CLI_CLIENT_H_
#define EPX_CLI_CLIENT_H_

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/generation_params.h"
#include "security/auth.h"

namespace epx {

struct ClientOptions {
  std::string server = "127.0.0.1:50051";  // HOST:PORT (any gRPC target string)
  double timeout_s = 600;                  // deadline of every call; must be in (0, 1e8]
  ClientTlsOptions tls;                    // --tls-ca / --tls-cert / --tls-key; none: plain text
  // Sent as "authorization: Bearer KEY": the API key on client calls, the admin key (when given,
  // else the API key) on admin calls.
  std::string api_key;
  std::string admin_key;
};

// The prompt and sampling flags of `epx generate`, the same here (--model) and on a server
// (--server). The command's defaults (greedy, 64 tokens) are its own; a server applies
// GenerationParams' defaults only to what a client leaves unset, and these are always set.
struct GenerateFlags {
  std::string prompt;
  bool chat = false;                  // prompt is one user message of a chat (the template)
  std::optional<std::string> system;  // chat only: the system message
  int64_t max_tokens = 64;
  float temperature = 0;
  int32_t top_k = 0;
  float top_p = 1;
  float repetition_penalty = 1;
  std::optional<uint64_t> seed;  // unset: one is drawn
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  bool usage = false;  // print finish reason and token counts to the log
};
// The request the flags make. InvalidArgument for an empty --prompt, --system without --chat,
// --max-tokens outside [1, 2^32).
absl::StatusOr<GenerationParams> ToParams(const GenerateFlags& flags);
// "finish_reason=... prompt_tokens=N completion_tokens=M [matched_stop=...]".
std::string UsageLine(const std::string& finish_reason, int64_t prompt_tokens,
                      int64_t completion_tokens, const std::string& matched_stop);

struct RemoteGenerateOptions {
  ClientOptions client;
  GenerateFlags request;
};
// Streams epx.v1.Generation/Generate: prints each text delta to `out` as it arrives (flushed),
// then a newline. With `usage`, prints `finish_reason=... prompt_tokens=N completion_tokens=M` to
// `log`. Errors: InvalidArgument for options the request cannot carry (the server checks the
// rest); the server's status; Unavailable when the server shut down before the request finished
// (the partial output has been printed).
absl::Status RunRemoteGenerate(const RemoteGenerateOptions& options, std::ostream& out,
                               std::ostream& log);

// grpc.health.v1.Health/Check of `service` ("": the process is up; "epx.v1.Generation": it can
// take requests). Prints the serving status (SERVING, NOT_SERVING, SERVICE_UNKNOWN, UNKNOWN) to
// `out`; OK only for SERVING, Unavailable for the others, NotFound when the server does not know
// the service, and the call's error when there is no answer. With `wait`, polls every 200 ms until
// SERVING or until timeout_s has passed, retrying connection failures and unknown services, and
// prints the last status once.
absl::Status RunHealth(const ClientOptions& options, const std::string& service, bool wait,
                       std::ostream& out);

// epx.v1.Admin/Stats: a readable report (state, queue, KV cache, counters, expert load, per-layer
// times, workers), or with `json` the message as JSON (proto field names, zeros included).
absl::Status RunStats(const ClientOptions& options, bool json, std::ostream& out);

// epx.v1.Admin/Drain: the server stops admitting requests. With `wait`, returns when the running
// and queued requests have finished; DeadlineExceeded if some are still left at the deadline.
absl::Status RunDrain(const ClientOptions& options, bool wait, std::ostream& out);

// epx.v1.Admin/Shutdown, after draining when `drain` is set.
// Admin/DrainWorker: worker `rank` hands its experts to the others and leaves.
absl::Status RunDrainWorker(const ClientOptions& options, int rank, bool wait, std::ostream& out);
// Admin/GetPlacement, or with `set_file` Admin/SetPlacement.
absl::Status RunPlacement(const ClientOptions& options, const std::string& set_file, bool wait,
                          std::ostream& out);
absl::Status RunShutdown(const ClientOptions& options, bool drain, std::ostream& out);

// epx.v1.Generation/ModelInfo printed as JSON.
absl::Status RunModelInfo(const ClientOptions& options, std::ostream& out);

}  // namespace epx

#endif  // EPX_CLI_CLIENT_H_
