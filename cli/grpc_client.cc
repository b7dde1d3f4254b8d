#include "cli/grpc_client.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <cmath>

#include "absl/strings/str_cat.h"

namespace epx {

namespace {

// A deadline beyond this is no deadline, and would overflow system_clock's nanoseconds.
constexpr double kMaxTimeoutS = 1e8;

}  // namespace

absl::Status ValidateClientOptions(const ClientOptions& options) {
  if (options.server.empty()) return absl::InvalidArgumentError("--server is empty");
  if (!(options.timeout_s > 0 && options.timeout_s <= kMaxTimeoutS))
    return absl::InvalidArgumentError(absl::StrCat("--timeout must be in (0, ", kMaxTimeoutS,
                                                   "] seconds, got ", options.timeout_s));
  return absl::OkStatus();
}

std::shared_ptr<grpc::Channel> MakeClientChannel(const ClientOptions& options,
                                                 const ChannelOptions& channel) {
  grpc::ChannelArguments args;
  if (channel.max_reconnect_backoff_ms > 0) {
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, channel.max_reconnect_backoff_ms);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, channel.max_reconnect_backoff_ms);
  }
  return grpc::CreateCustomChannel(options.server, grpc::InsecureChannelCredentials(), args);
}

std::chrono::system_clock::time_point ClientDeadline(double timeout_s) {
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(
             std::chrono::duration<double>(timeout_s));
}

absl::Status FromGrpcStatus(const grpc::Status& status, const std::string& server,
                            const std::string& method) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(server, ": ", method, ": ", status.error_message()));
}

}  // namespace epx
