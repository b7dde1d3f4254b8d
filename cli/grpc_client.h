// gRPC plumbing shared by the client commands (client.cc, bench_serve.cc): channels, deadlines and
// the conversion of gRPC statuses. Kept out of client.h so that main.cc and the tests of the
// commands need no gRPC headers. Thread-safe (stateless).
#ifndef EPX_CLI_GRPC_CLIENT_H_
#define EPX_CLI_GRPC_CLIENT_H_

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/support/status.h>

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cli/client.h"
#include "coordinator/generation_params.h"
#include "epx/v1/generation.grpc.pb.h"

namespace epx {

// InvalidArgument for an empty server, a timeout outside (0, 1e8] seconds (beyond that the
// deadline would overflow the clock) or TLS files that cannot be used.
absl::Status ValidateClientOptions(const ClientOptions& options);

struct ChannelOptions {
  // Reconnect attempts this far apart (ms; 0: gRPC's default, which backs off from one second up
  // to two minutes). Pollers that wait for a server to come up set it low to notice it promptly.
  int max_reconnect_backoff_ms = 0;
  // Channels with different indices get connections of their own (gRPC shares one between
  // channels of equal arguments).
  int connection_index = 0;
};
// A channel to options.server, over TLS with options.tls; it connects lazily, on the first call.
// Never fails: a bad address shows up as UNAVAILABLE on the first call. REQUIRES:
// ValidateClientOptions passed (TLS files that became unreadable since give a TLS channel that
// trusts only the system's CAs, never a plain-text one).
std::shared_ptr<grpc::Channel> MakeClientChannel(const ClientOptions& options,
                                                 const ChannelOptions& channel = {});

// now + timeout_s, for ClientContext::set_deadline. REQUIRES: ValidateClientOptions passed.
std::chrono::system_clock::time_point ClientDeadline(double timeout_s);

// Sets the call's deadline (options.timeout_s) and its bearer key for `access`.
void PrepareContext(grpc::ClientContext& context, const ClientOptions& options,
                    Access access = Access::kClient);

// OK stays OK; otherwise the same code (gRPC's codes are absl's) and the message
// "<server>: <method>: <message>".
absl::Status FromGrpcStatus(const grpc::Status& status, const std::string& server,
                            const std::string& method);

// The gRPC request of `params` (unset fields stay unset: the server applies the defaults).
v1::GenerateRequest ToGenerateRequest(const GenerationParams& params);

// Runs one Generate to its end and collects the text, finish reason and usage. The call's error
// (FromGrpcStatus), with a deadline of client.timeout_s. A request the server cut short at shut
// down comes back OK with finish kCancelled.
absl::StatusOr<Completion> GenerateToCompletion(v1::Generation::Stub& stub,
                                                const v1::GenerateRequest& request,
                                                const ClientOptions& client);

}  // namespace epx

#endif  // EPX_CLI_GRPC_CLIENT_H_
