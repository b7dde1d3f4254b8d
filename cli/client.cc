#include "cli/client.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/client_context.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>

#include <algorithm>
#include <chrono>
#include <future>
#include <limits>
#include <numeric>
#include <optional>
#include <string_view>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "cli/grpc_client.h"
#include "common/json.h"
#include "common/status.h"
#include "coordinator/services.h"
#include "epx/v1/admin.grpc.pb.h"
#include "epx/v1/generation.grpc.pb.h"

namespace epx {

namespace {

// The JSON the commands print: the proto's own field names (what scripts grep for), and zeros
// spelled out, since a field that is absent reads as "not reported".
absl::Status PrintJson(const google::protobuf::Message& message, std::ostream& out) {
  EPX_ASSIGN_OR_RETURN(const std::string json, MessageJson(message));
  out << json;
  if (json.empty() || json.back() != '\n') out << "\n";
  return absl::OkStatus();
}

// "stop" for FINISH_REASON_STOP: the short name the usage line uses.
std::string FinishReasonName(v1::FinishReason reason) {
  std::string name = v1::FinishReason_Name(reason);
  constexpr std::string_view kPrefix = "FINISH_REASON_";
  if (name.rfind(kPrefix, 0) == 0) name.erase(0, kPrefix.size());
  if (name.empty()) name = absl::StrCat(static_cast<int>(reason));
  return absl::AsciiStrToLower(name);
}

}  // namespace

absl::StatusOr<GenerationParams> ToParams(const GenerateFlags& flags) {
  if (flags.prompt.empty()) return absl::InvalidArgumentError("--prompt is empty");
  // The gRPC field is uint32; the server checks the context limit.
  if (flags.max_tokens <= 0 || flags.max_tokens > std::numeric_limits<uint32_t>::max())
    return absl::InvalidArgumentError(
        absl::StrCat("--max-tokens must be in [1, 2^32), got ", flags.max_tokens));
  if (flags.system.has_value() && !flags.chat)
    return absl::InvalidArgumentError("--system needs --chat");
  GenerationParams p;
  if (flags.chat) {
    p.chat.emplace();
    if (flags.system.has_value()) p.chat->push_back({"system", *flags.system});
    p.chat->push_back({"user", flags.prompt});
  } else {
    p.text = flags.prompt;
  }
  p.max_tokens = flags.max_tokens;
  p.temperature = flags.temperature;
  p.top_k = flags.top_k;
  p.top_p = flags.top_p;
  p.repetition_penalty = flags.repetition_penalty;
  p.seed = flags.seed;
  p.stop = flags.stop;
  p.stop_token_ids = flags.stop_token_ids;
  p.ignore_eos = flags.ignore_eos;
  return p;
}

std::string UsageLine(const std::string& finish_reason, int64_t prompt_tokens,
                      int64_t completion_tokens, const std::string& matched_stop) {
  std::string line = absl::StrCat("finish_reason=", finish_reason, " prompt_tokens=", prompt_tokens,
                                  " completion_tokens=", completion_tokens);
  if (!matched_stop.empty())
    absl::StrAppend(&line, " matched_stop=\"", absl::CEscape(matched_stop), "\"");
  return line;
}

namespace {

// --- grpc.health.v1 by hand: Debian's libgrpc++-dev ships no header for its messages, and two
// fields do not justify a proto of our own. HealthCheckRequest{string service = 1;},
// HealthCheckResponse{ServingStatus status = 1;}.

constexpr char kHealthCheckMethod[] = "/grpc.health.v1.Health/Check";

grpc::ByteBuffer EncodeHealthCheckRequest(const std::string& service) {
  std::string bytes;
  {
    google::protobuf::io::StringOutputStream stream(&bytes);
    google::protobuf::io::CodedOutputStream coded(&stream);
    // proto3 leaves a default (empty) string out.
    if (!service.empty()) {
      coded.WriteTag(google::protobuf::internal::WireFormatLite::MakeTag(
          1, google::protobuf::internal::WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
      coded.WriteVarint32(static_cast<uint32_t>(service.size()));
      coded.WriteString(service);
    }
  }  // the coded stream flushes into `bytes` here
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

absl::StatusOr<int> DecodeHealthCheckResponse(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) return absl::InternalError("cannot read the health reply");
  std::string bytes;
  for (const grpc::Slice& slice : slices)
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(bytes.data()),
                                            static_cast<int>(bytes.size()));
  int status = 0;  // proto3: absent is UNKNOWN
  using google::protobuf::internal::WireFormatLite;
  while (uint32_t tag = in.ReadTag()) {
    if (tag == WireFormatLite::MakeTag(1, WireFormatLite::WIRETYPE_VARINT)) {
      uint32_t value = 0;
      if (!in.ReadVarint32(&value)) return absl::DataLossError("malformed health reply");
      status = static_cast<int>(value);
    } else if (!WireFormatLite::SkipField(&in, tag)) {
      return absl::DataLossError("malformed health reply");
    }
  }
  return status;
}

std::string ServingStatusName(int status) {
  switch (status) {
    case 0:
      return "UNKNOWN";
    case 1:
      return "SERVING";
    case 2:
      return "NOT_SERVING";
    case 3:
      return "SERVICE_UNKNOWN";
  }
  return absl::StrCat("UNKNOWN(", status, ")");
}
constexpr int kServing = 1;

// One Check: the serving status, or the call's error (NOT_FOUND: the service is unknown).
absl::StatusOr<int> CheckHealthOnce(grpc::GenericStub& stub, const std::string& service,
                                    std::chrono::system_clock::time_point deadline,
                                    const std::string& server) {
  grpc::ClientContext context;
  context.set_deadline(deadline);
  const grpc::ByteBuffer request = EncodeHealthCheckRequest(service);
  grpc::ByteBuffer reply;
  // The generic stub has no blocking unary call; wait for the callback.
  std::promise<grpc::Status> done;
  std::future<grpc::Status> finished = done.get_future();
  stub.UnaryCall(&context, kHealthCheckMethod, grpc::StubOptions(), &request, &reply,
                 [&done](grpc::Status status) { done.set_value(std::move(status)); });
  const grpc::Status status = finished.get();
  if (!status.ok()) return FromGrpcStatus(status, server, "grpc.health.v1.Health/Check");
  return DecodeHealthCheckResponse(reply);
}

// Errors a server that is still starting gives: not listening yet, or not yet reporting the
// service.
bool RetryWhileWaiting(const absl::Status& status) {
  return absl::IsUnavailable(status) || absl::IsNotFound(status) ||
         absl::IsDeadlineExceeded(status);
}

// --- Stats report.

// "0-3,6,9-10": a worker's experts on one line.
std::string ExpertRanges(const google::protobuf::RepeatedField<int32_t>& experts) {
  std::vector<int32_t> sorted(experts.begin(), experts.end());
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::string> parts;
  for (size_t i = 0; i < sorted.size();) {
    size_t j = i;
    while (j + 1 < sorted.size() && sorted[j + 1] == sorted[j] + 1) ++j;
    parts.push_back(j == i ? absl::StrCat(sorted[i]) : absl::StrCat(sorted[i], "-", sorted[j]));
    i = j + 1;
  }
  return parts.empty() ? "-" : absl::StrJoin(parts, ",");
}

void PrintExpertLoad(const v1::StatsResponse& stats, std::ostream& out) {
  // Older or partial reports may carry only the per-layer counts.
  std::vector<uint64_t> tokens(stats.expert_tokens().begin(), stats.expert_tokens().end());
  if (tokens.empty()) {
    for (const v1::LayerStats& layer : stats.layers()) {
      if (tokens.size() < static_cast<size_t>(layer.expert_tokens_size()))
        tokens.resize(layer.expert_tokens_size(), 0);
      for (int e = 0; e < layer.expert_tokens_size(); ++e) tokens[e] += layer.expert_tokens(e);
    }
  }
  const uint64_t total = std::accumulate(tokens.begin(), tokens.end(), uint64_t{0});
  out << "\nexpert load (rows routed, all layers)\n";
  if (tokens.empty() || total == 0) {
    out << "  none yet\n";
    return;
  }
  out << absl::StrFormat("  %6s %14s %7s\n", "expert", "tokens", "share");
  for (size_t e = 0; e < tokens.size(); ++e)
    out << absl::StrFormat("  %6d %14d %6.2f%%\n", e, tokens[e], 100.0 * tokens[e] / total);
  // The slowest expert sets the step time under expert parallelism: max over mean is the cost.
  const uint64_t max = *std::max_element(tokens.begin(), tokens.end());
  const double mean = static_cast<double>(total) / tokens.size();
  out << absl::StrFormat("  imbalance (max / mean): %.3f\n", max / mean);
}

void PrintLayerTimes(const v1::StatsResponse& stats, std::ostream& out) {
  out << "\nper-layer time (ms, summed over " << stats.steps() << " steps)\n";
  if (stats.layers().empty()) {
    out << "  none yet\n";
    return;
  }
  out << absl::StrFormat("  %5s %12s %12s %12s %12s %12s\n", "layer", "attention", "moe",
                         "dispatch", "expert", "combine");
  double sum[5] = {0, 0, 0, 0, 0};
  for (const v1::LayerStats& layer : stats.layers()) {
    const double us[5] = {layer.attention_us(), layer.moe_us(), layer.dispatch_us(),
                          layer.expert_us(), layer.combine_us()};
    for (int i = 0; i < 5; ++i) sum[i] += us[i];
    out << absl::StrFormat("  %5d %12.3f %12.3f %12.3f %12.3f %12.3f\n", layer.layer(), us[0] / 1e3,
                           us[1] / 1e3, us[2] / 1e3, us[3] / 1e3, us[4] / 1e3);
  }
  out << absl::StrFormat("  %5s %12.3f %12.3f %12.3f %12.3f %12.3f\n", "total", sum[0] / 1e3,
                         sum[1] / 1e3, sum[2] / 1e3, sum[3] / 1e3, sum[4] / 1e3);
}

void PrintWorkers(const v1::StatsResponse& stats, std::ostream& out) {
  out << "\nworkers\n";
  if (stats.workers().empty()) {
    out << "  none (experts run in the server process)\n";
    return;
  }
  out << absl::StrFormat("  %4s %-20s %-24s %-5s %9s %-16s %14s\n", "rank", "host", "device",
                         "alive", "heartbeat", "experts", "rows");
  for (const v1::WorkerStatus& worker : stats.workers()) {
    const std::string alive = !worker.registered() ? "vacant"
                              : !worker.alive()    ? "LOST"
                              : worker.member()    ? "yes"
                                                   : "joins";
    const std::string age = worker.registered()
                                ? absl::StrFormat("%.1f s", worker.last_heartbeat_age_s())
                                : std::string("-");
    out << absl::StrFormat("  %4d %-20s %-24s %-5s %9s %-16s %14d\n", worker.rank(), worker.host(),
                           worker.device(), alive, age, ExpertRanges(worker.experts()),
                           worker.rows_received());
  }
}

// The data plane's epoch, its placement, and what happened to the cluster.
void PrintCluster(const v1::StatsResponse& stats, std::ostream& out) {
  if (stats.epoch() == 0) return;
  out << "\ncluster     epoch " << stats.epoch() << " of the data plane\n";
  out << "placement   " << stats.placement() << "\n";
  for (const v1::ClusterEvent& e : stats.events())
    out << "  "
        << absl::FormatTime("%Y-%m-%d %H:%M:%E3S",
                            absl::FromUnixMicros(static_cast<int64_t>(e.time_unix_s() * 1e6)),
                            absl::UTCTimeZone())
        << "  " << e.kind() << ": " << e.message() << "\n";
}

void PrintStats(const v1::StatsResponse& stats, const std::string& server, std::ostream& out) {
  std::string state = stats.ready() ? "ready" : "NOT READY";
  if (!stats.ready() && !stats.not_ready_reason().empty())
    absl::StrAppend(&state, " (", stats.not_ready_reason(), ")");
  if (stats.draining()) absl::StrAppend(&state, ", draining");
  out << absl::StrFormat("server      %s, up %.1f s\n", server, stats.uptime_s());
  out << "state       " << state << "\n";
  out << absl::StrFormat("requests    %d running, %d queued\n", stats.running_requests(),
                         stats.queue_length());
  const double used_pct =
      stats.kv_blocks_total() > 0 ? 100.0 * stats.kv_blocks_used() / stats.kv_blocks_total() : 0;
  out << absl::StrFormat(
      "kv cache    %d used, %d free, %d total blocks (%.1f%% used, %d tokens "
      "per block)\n",
      stats.kv_blocks_used(), stats.kv_blocks_free(), stats.kv_blocks_total(), used_pct,
      stats.kv_block_size());
  out << absl::StrFormat(
      "counters    %d accepted, %d finished, %d failed, %d rejected, %d cancelled\n",
      stats.requests_accepted(), stats.requests_finished(), stats.requests_failed(),
      stats.requests_rejected(), stats.requests_cancelled());
  out << absl::StrFormat("tokens      %d prompt, %d generated, %d through the layers in %d steps\n",
                         stats.prompt_tokens(), stats.generated_tokens(), stats.tokens_computed(),
                         stats.steps());
  PrintExpertLoad(stats, out);
  PrintLayerTimes(stats, out);
  PrintWorkers(stats, out);
  PrintCluster(stats, out);
}

}  // namespace

absl::Status RunRemoteGenerate(const RemoteGenerateOptions& options, std::ostream& out,
                               std::ostream& log) {
  EPX_RETURN_IF_ERROR(ValidateClientOptions(options.client));
  EPX_ASSIGN_OR_RETURN(GenerationParams params, ToParams(options.request));
  const v1::GenerateRequest request = ToGenerateRequest(params);
  std::unique_ptr<v1::Generation::Stub> stub =
      v1::Generation::NewStub(MakeClientChannel(options.client));
  grpc::ClientContext context;
  PrepareContext(context, options.client);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub->Generate(&context, request);
  v1::GenerateResponse response;
  v1::GenerateResponse last;  // the one with finish_reason and usage
  while (reader->Read(&response)) {
    if (!response.text().empty()) out << response.text() << std::flush;
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) last = response;
  }
  const grpc::Status status = reader->Finish();
  // Also after an error, so that the message starts on a line of its own.
  out << std::endl;
  EPX_RETURN_IF_ERROR(FromGrpcStatus(status, options.client.server, "epx.v1.Generation/Generate"));
  if (options.request.usage)
    log << UsageLine(FinishReasonName(last.finish_reason()), last.usage().prompt_tokens(),
                     last.usage().completion_tokens(), last.matched_stop())
        << "\n";
  // A cut-short completion must not pass for a whole one in scripts.
  if (last.finish_reason() == v1::FINISH_REASON_CANCELLED)
    return absl::UnavailableError(absl::StrCat(options.client.server,
                                               ": the server shut down before the request "
                                               "finished; the output above is partial"));
  return absl::OkStatus();
}

absl::Status RunHealth(const ClientOptions& options, const std::string& service, bool wait,
                       std::ostream& out) {
  EPX_RETURN_IF_ERROR(ValidateClientOptions(options));
  ChannelOptions channel_options;
  // A waiting poll should see a server that just came up at its next poll, not after gRPC's
  // reconnect backoff (which grows to minutes).
  if (wait) channel_options.max_reconnect_backoff_ms = 500;
  grpc::GenericStub stub(MakeClientChannel(options, channel_options));
  const auto deadline = ClientDeadline(options.timeout_s);
  const std::string what =
      service.empty() ? "the server" : absl::StrCat("service \"", service, "\"");

  std::optional<int> last_status;  // the last status the server reported
  absl::Status last_error;         // the last failed call
  while (true) {
    absl::StatusOr<int> result = CheckHealthOnce(stub, service, deadline, options.server);
    if (result.ok()) {
      last_status = *result;
      last_error = absl::OkStatus();
      if (*result == kServing) break;
    } else if (absl::IsNotFound(result.status())) {
      // The standard health service answers NOT_FOUND for a service it has never heard of.
      last_status = 3;
      last_error = result.status();
    } else {
      last_status.reset();
      last_error = result.status();
      if (!wait || !RetryWhileWaiting(last_error)) return last_error;
    }
    if (!wait) break;
    const auto next = std::chrono::system_clock::now() + std::chrono::milliseconds(200);
    if (next >= deadline) break;
    std::this_thread::sleep_until(next);
  }

  if (!last_status.has_value())
    return absl::Status(last_error.code(), absl::StrCat("no answer after ", options.timeout_s,
                                                        " s; last try: ", last_error.message()));
  out << ServingStatusName(*last_status) << std::endl;
  if (*last_status == kServing) return absl::OkStatus();
  const std::string after = wait ? absl::StrCat(" after ", options.timeout_s, " s") : "";
  if (*last_status == 3 && absl::IsNotFound(last_error))
    return absl::NotFoundError(
        absl::StrCat(options.server, ": health: unknown service \"", service, "\"", after));
  return absl::UnavailableError(
      absl::StrCat(options.server, ": ", what, " is ", ServingStatusName(*last_status), after));
}

absl::Status RunStats(const ClientOptions& options, bool json, std::ostream& out) {
  EPX_RETURN_IF_ERROR(ValidateClientOptions(options));
  std::unique_ptr<v1::Admin::Stub> stub = v1::Admin::NewStub(MakeClientChannel(options));
  grpc::ClientContext context;
  PrepareContext(context, options);
  v1::StatsResponse stats;
  EPX_RETURN_IF_ERROR(FromGrpcStatus(stub->Stats(&context, v1::StatsRequest(), &stats),
                                     options.server, "epx.v1.Admin/Stats"));
  if (json) return PrintJson(stats, out);
  PrintStats(stats, options.server, out);
  return absl::OkStatus();
}

absl::Status RunDrain(const ClientOptions& options, bool wait, std::ostream& out) {
  EPX_RETURN_IF_ERROR(ValidateClientOptions(options));
  std::unique_ptr<v1::Admin::Stub> stub = v1::Admin::NewStub(MakeClientChannel(options));
  grpc::ClientContext context;
  PrepareContext(context, options, Access::kAdmin);
  v1::DrainRequest request;
  request.set_wait(wait);
  v1::DrainResponse response;
  EPX_RETURN_IF_ERROR(FromGrpcStatus(stub->Drain(&context, request, &response), options.server,
                                     "epx.v1.Admin/Drain"));
  const bool empty = response.running_requests() == 0 && response.queue_length() == 0;
  if (empty) {
    out << (wait ? "drained" : "draining: nothing running or queued") << std::endl;
    return absl::OkStatus();
  }
  const std::string left =
      absl::StrCat(response.running_requests(), " running, ", response.queue_length(), " queued");
  out << "draining: " << left << std::endl;
  if (wait)
    return absl::DeadlineExceededError(
        absl::StrCat(options.server, ": drain: still ", left, " at the deadline"));
  return absl::OkStatus();
}

namespace {

void PrintPlacement(const v1::PlacementResponse& p, std::ostream& out) {
  out << "epoch       " << p.epoch() << " (workers " << absl::StrJoin(p.workers(), ", ") << ")\n";
  out << "placement   " << p.placement() << "\n";
  if (p.target() != p.placement())
    out << "moving to   " << p.target() << " (version " << p.target_version()
        << ", loading in the background)\n";
}

}  // namespace

absl::Status RunDrainWorker(const ClientOptions& options, int rank, bool wait, std::ostream& out) {
  EPX_RETURN_IF_ERROR(ValidateClientOptions(options));
  std::unique_ptr<v1::Admin::Stub> stub = v1::Admin::NewStub(MakeClientChannel(options));
  grpc::ClientContext context;
  PrepareContext(context, options, Access::kAdmin);
  v1::DrainWorkerRequest request;
  request.set_rank(rank);
  request.set_wait(wait);
  v1::PlacementResponse response;
  EPX_RETURN_IF_ERROR(FromGrpcStatus(stub->DrainWorker(&context, request, &response),
                                     options.server, "epx.v1.Admin/DrainWorker"));
  out << "worker " << rank << (wait ? " left" : " is draining") << "\n";
  PrintPlacement(response, out);
  return absl::OkStatus();
}

absl::Status RunPlacement(const ClientOptions& options, const std::string& set_file, bool wait,
                          std::ostream& out) {
  EPX_RETURN_IF_ERROR(ValidateClientOptions(options));
  std::unique_ptr<v1::Admin::Stub> stub = v1::Admin::NewStub(MakeClientChannel(options));
  grpc::ClientContext context;
  PrepareContext(context, options, Access::kAdmin);
  v1::PlacementResponse response;
  if (set_file.empty()) {
    EPX_RETURN_IF_ERROR(
        FromGrpcStatus(stub->GetPlacement(&context, v1::GetPlacementRequest(), &response),
                       options.server, "epx.v1.Admin/GetPlacement"));
  } else {
    EPX_ASSIGN_OR_RETURN(std::string json, ReadTextFile(set_file));
    v1::SetPlacementRequest request;
    request.set_placement_json(json);
    request.set_wait(wait);
    EPX_RETURN_IF_ERROR(FromGrpcStatus(stub->SetPlacement(&context, request, &response),
                                       options.server, "epx.v1.Admin/SetPlacement"));
  }
  PrintPlacement(response, out);
  return absl::OkStatus();
}

absl::Status RunShutdown(const ClientOptions& options, bool drain, std::ostream& out) {
  EPX_RETURN_IF_ERROR(ValidateClientOptions(options));
  std::unique_ptr<v1::Admin::Stub> stub = v1::Admin::NewStub(MakeClientChannel(options));
  grpc::ClientContext context;
  PrepareContext(context, options, Access::kAdmin);
  v1::ShutdownRequest request;
  request.set_drain(drain);
  v1::ShutdownResponse response;
  EPX_RETURN_IF_ERROR(FromGrpcStatus(stub->Shutdown(&context, request, &response), options.server,
                                     "epx.v1.Admin/Shutdown"));
  out << (drain ? "drained; shutting down" : "shutting down") << std::endl;
  return absl::OkStatus();
}

absl::Status RunModelInfo(const ClientOptions& options, std::ostream& out) {
  EPX_RETURN_IF_ERROR(ValidateClientOptions(options));
  std::unique_ptr<v1::Generation::Stub> stub = v1::Generation::NewStub(MakeClientChannel(options));
  grpc::ClientContext context;
  PrepareContext(context, options);
  v1::ModelInfoResponse info;
  EPX_RETURN_IF_ERROR(FromGrpcStatus(stub->ModelInfo(&context, v1::ModelInfoRequest(), &info),
                                     options.server, "epx.v1.Generation/ModelInfo"));
  return PrintJson(info, out);
}

}  // namespace epx
