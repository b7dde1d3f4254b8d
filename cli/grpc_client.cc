#include "cli/grpc_client.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "security/grpc_credentials.h"

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
  return LoadClientTls(options.tls).status();
}

std::shared_ptr<grpc::Channel> MakeClientChannel(const ClientOptions& options,
                                                 const ChannelOptions& channel) {
  grpc::ChannelArguments args;
  if (channel.max_reconnect_backoff_ms > 0) {
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, channel.max_reconnect_backoff_ms);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, channel.max_reconnect_backoff_ms);
  }
  if (channel.connection_index != 0) args.SetInt("epx.connection_index", channel.connection_index);
  absl::StatusOr<ClientTls> tls = LoadClientTls(options.tls);
  return grpc::CreateCustomChannel(
      options.server,
      tls.ok() ? GrpcChannelCredentials(*tls) : grpc::SslCredentials(grpc::SslCredentialsOptions()),
      args);
}

std::chrono::system_clock::time_point ClientDeadline(double timeout_s) {
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(
             std::chrono::duration<double>(timeout_s));
}

void PrepareContext(grpc::ClientContext& context, const ClientOptions& options, Access access) {
  context.set_deadline(ClientDeadline(options.timeout_s));
  const std::string& key = access == Access::kAdmin && !options.admin_key.empty()
                               ? options.admin_key
                               : (options.api_key.empty() ? options.admin_key : options.api_key);
  if (!key.empty()) context.AddMetadata("authorization", BearerHeader(key));
}

absl::Status FromGrpcStatus(const grpc::Status& status, const std::string& server,
                            const std::string& method) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(server, ": ", method, ": ", status.error_message()));
}

v1::GenerateRequest ToGenerateRequest(const GenerationParams& params) {
  v1::GenerateRequest request;
  if (params.chat.has_value()) {
    v1::Chat* chat = request.mutable_chat();
    for (const ChatMessage& m : *params.chat) {
      v1::ChatMessage* message = chat->add_messages();
      message->set_role(m.role);
      message->set_content(m.content);
    }
  } else if (params.token_ids.has_value()) {
    request.mutable_token_ids()->mutable_ids()->Add(params.token_ids->begin(),
                                                    params.token_ids->end());
  } else if (params.text.has_value()) {
    request.set_text(*params.text);
    request.set_add_bos(params.add_bos);
  }
  if (params.max_tokens.has_value())
    request.set_max_tokens(static_cast<uint32_t>(*params.max_tokens));
  if (params.temperature.has_value()) request.set_temperature(*params.temperature);
  if (params.top_k.has_value()) request.set_top_k(*params.top_k);
  if (params.top_p.has_value()) request.set_top_p(*params.top_p);
  if (params.repetition_penalty.has_value())
    request.set_repetition_penalty(*params.repetition_penalty);
  if (params.seed.has_value()) request.set_seed(*params.seed);
  for (const std::string& stop : params.stop) request.add_stop(stop);
  for (int32_t id : params.stop_token_ids) request.add_stop_token_ids(id);
  request.set_ignore_eos(params.ignore_eos);
  return request;
}

absl::StatusOr<Completion> GenerateToCompletion(v1::Generation::Stub& stub,
                                                const v1::GenerateRequest& request,
                                                const ClientOptions& client) {
  grpc::ClientContext context;
  PrepareContext(context, client);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub.Generate(&context, request);
  Completion c;
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    c.text += response.text();
    if (response.finish_reason() == v1::FINISH_REASON_UNSPECIFIED) continue;
    switch (response.finish_reason()) {
      case v1::FINISH_REASON_LENGTH:
        c.finish = FinishReason::kLength;
        break;
      case v1::FINISH_REASON_STOP:
        c.finish = FinishReason::kStop;
        break;
      case v1::FINISH_REASON_EOS:
        c.finish = FinishReason::kEos;
        break;
      default:
        c.finish = FinishReason::kCancelled;
        break;
    }
    c.matched_stop = response.matched_stop();
    c.prompt_tokens = response.usage().prompt_tokens();
    c.completion_tokens = response.usage().completion_tokens();
  }
  EPX_RETURN_IF_ERROR(
      FromGrpcStatus(reader->Finish(), client.server, "epx.v1.Generation/Generate"));
  return c;
}

}  // namespace epx
