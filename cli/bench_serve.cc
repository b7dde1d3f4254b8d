#include "cli/bench_serve.h"

#include <grpcpp/client_context.h>
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/grpc_client.h"
#include "common/status.h"
#include "coordinator/http_server.h"
#include "epx/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace epx {

namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// Llama/Mixtral vocabularies start with <unk>, <s>, </s>: random prompts of ordinary text tokens
// start above them (and also skip the model's own BOS/EOS wherever they are).
constexpr int32_t kFirstOrdinaryToken = 3;

struct RequestResult {
  absl::Status status;  // OK, the call's status, or Unavailable for a shutdown-cancelled one
  double latency_ms = 0;
  std::optional<double> ttft_ms;  // none when no token came back
  std::optional<double> tpot_ms;  // (last token - first token) / (tokens - 1), with 2+ tokens
  std::vector<double> itl_ms;     // gaps between messages carrying tokens
  int64_t output_tokens = 0;
  int64_t prompt_tokens = 0;  // as the server counted them (usage)
};

// When a stream's tokens arrived, and the timings of its result made from them.
struct TokenTimes {
  Clock::time_point start = Clock::now();
  std::optional<Clock::time_point> first;
  Clock::time_point last;

  // A message with new tokens arrived now: the time to the first, or one more gap.
  void Arrived(RequestResult& r) {
    const Clock::time_point now = Clock::now();
    if (!first.has_value()) {
      first = now;
      r.ttft_ms = Ms(now - start);
    } else {
      r.itl_ms.push_back(Ms(now - last));
    }
    last = now;
  }
  // The stream ended now (r.output_tokens final): its latency and time per output token.
  void Ended(RequestResult& r) const {
    r.latency_ms = Ms(Clock::now() - start);
    if (r.output_tokens > 1 && first.has_value())
      r.tpot_ms = Ms(last - *first) / static_cast<double>(r.output_tokens - 1);
  }
};

struct Summary {
  size_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};

// Percentiles by linear interpolation between the closest ranks (numpy's default), so that small
// samples do not jump from one request to the next.
Summary Summarize(std::vector<double> values) {
  Summary s;
  s.count = values.size();
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  double sum = 0;
  for (double v : values) sum += v;
  s.mean = sum / values.size();
  auto at = [&values](double p) {
    const double pos = p / 100.0 * (values.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(pos));
    const size_t hi = std::min(lo + 1, values.size() - 1);
    return values[lo] + (pos - lo) * (values[hi] - values[lo]);
  };
  s.p50 = at(50);
  s.p90 = at(90);
  s.p99 = at(99);
  s.max = values.back();
  return s;
}

v1::GenerateRequest MakeRequest(const BenchServeOptions& options, int64_t index,
                                const v1::ModelConfig& config) {
  v1::GenerateRequest request;
  request.set_request_id(absl::StrCat("bench-", index));
  if (options.prompt_tokens > 0) {
    // Seeded by (seed, index), not by thread, so every run sends the same prompts.
    std::seed_seq seq{static_cast<uint32_t>(options.seed),
                      static_cast<uint32_t>(options.seed >> 32), static_cast<uint32_t>(index),
                      static_cast<uint32_t>(index >> 32)};
    std::mt19937_64 rng(seq);
    std::uniform_int_distribution<int32_t> token(kFirstOrdinaryToken,
                                                 static_cast<int32_t>(config.vocab_size()) - 1);
    v1::TokenIds* ids = request.mutable_token_ids();
    for (int64_t i = 0; i < options.prompt_tokens; ++i) {
      int32_t id = token(rng);
      while (id == config.bos_token_id() || id == config.eos_token_id()) id = token(rng);
      ids->add_ids(id);
    }
  } else {
    request.set_text(options.prompt);
  }
  request.set_max_tokens(static_cast<uint32_t>(options.max_tokens));
  request.set_temperature(options.temperature);
  request.set_seed(options.seed + static_cast<uint64_t>(index));
  request.set_ignore_eos(options.ignore_eos);
  return request;
}

// One gRPC stream on the callback API: no client thread waits for it, so 10,000 can be open.
// `done` runs once, from OnDone, after `result` is complete.
class GrpcStream final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  GrpcStream(v1::Generation::Stub& stub, v1::GenerateRequest request, const ClientOptions& client,
             RequestResult* result, std::function<void()> done)
      : client_(client), request_(std::move(request)), result_(result), done_(std::move(done)) {
    PrepareContext(context_, client);
    stub.async()->Generate(&context_, &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    if (response_.token_ids_size() > 0) {
      times_.Arrived(*result_);
      result_->output_tokens += response_.token_ids_size();
    }
    if (response_.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      result_->prompt_tokens = response_.usage().prompt_tokens();
      cancelled_ = response_.finish_reason() == v1::FINISH_REASON_CANCELLED;
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    result_->status = FromGrpcStatus(status, client_.server, "epx.v1.Generation/Generate");
    times_.Ended(*result_);
    if (result_->status.ok() && cancelled_)
      result_->status = absl::UnavailableError("finished as cancelled: the server shut down");
    done_();
  }

 private:
  const ClientOptions& client_;
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateResponse response_;
  RequestResult* result_;
  std::function<void()> done_;
  TokenTimes times_;
  bool cancelled_ = false;
};

// Runs every request with `concurrency` streams open at once over `connections` channels.
void RunGrpc(const BenchServeOptions& options, const v1::ModelConfig& config, int64_t concurrency,
             int64_t connections, std::vector<RequestResult>& results) {
  std::vector<std::unique_ptr<v1::Generation::Stub>> stubs;
  for (int64_t c = 0; c < connections; ++c) {
    ChannelOptions channel;
    channel.connection_index = static_cast<int>(c);  // a connection of its own
    stubs.push_back(v1::Generation::NewStub(MakeClientChannel(options.client, channel)));
  }
  std::mutex mu;
  std::condition_variable cv;
  int64_t in_flight = 0, finished = 0;  // guarded by mu
  std::vector<std::unique_ptr<GrpcStream>> streams(results.size());
  const auto done = [&] {
    std::lock_guard<std::mutex> lock(mu);
    --in_flight;
    ++finished;
    cv.notify_all();
  };
  for (size_t i = 0; i < results.size(); ++i) {
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return in_flight < concurrency; });
      ++in_flight;
    }
    streams[i] =
        std::make_unique<GrpcStream>(*stubs[i % stubs.size()], MakeRequest(options, i, config),
                                     options.client, &results[i], done);
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return finished == static_cast<int64_t>(results.size()); });
}

// The OpenAI body of request `index`: the same prompt, seed and limits as the gRPC one.
nlohmann::json OpenAiBody(const v1::GenerateRequest& request, const std::string& model) {
  nlohmann::json body = {{"model", model},
                         {"max_tokens", request.max_tokens()},
                         {"temperature", request.temperature()},
                         {"seed", request.seed()},
                         {"ignore_eos", request.ignore_eos()},
                         {"stream", true},
                         {"stream_options", {{"include_usage", true}}}};
  if (request.has_token_ids()) {
    body["prompt"] = nlohmann::json(
        std::vector<int32_t>(request.token_ids().ids().begin(), request.token_ids().ids().end()));
  } else {
    body["prompt"] = request.text();
  }
  return body;
}

// An HTTP(S) client of host:port with the client's TLS files and bearer key.
std::unique_ptr<httplib::Client> HttpClient(const std::string& host, int port,
                                            const ClientOptions& client) {
  const ClientTlsOptions& tls = client.tls;
  auto http = tls.enabled()
                  ? std::make_unique<httplib::Client>(absl::StrCat("https://", host, ":", port),
                                                      tls.cert_file, tls.key_file)
                  : std::make_unique<httplib::Client>(host, port);
  if (!tls.ca_file.empty()) http->set_ca_cert_path(tls.ca_file.c_str());
  if (!client.api_key.empty()) http->set_bearer_token_auth(client.api_key.c_str());
  return http;
}

// One streaming POST /v1/completions, read as server-sent events. Blocks its thread.
RequestResult RunOpenAiOne(const std::string& host, int port, const nlohmann::json& body,
                           const ClientOptions& client) {
  RequestResult result;
  std::unique_ptr<httplib::Client> client_ptr = HttpClient(host, port, client);
  httplib::Client& http = *client_ptr;
  const auto timeout = std::chrono::duration<double>(client.timeout_s);
  http.set_read_timeout(std::chrono::duration_cast<std::chrono::microseconds>(timeout));
  http.set_write_timeout(std::chrono::duration_cast<std::chrono::microseconds>(timeout));
  TokenTimes times;
  std::string pending, error_body;
  bool finished = false;
  httplib::Request request;
  request.method = "POST";
  request.path = "/v1/completions";
  request.body = body.dump();
  request.set_header("Content-Type", "application/json");
  request.content_receiver = [&](const char* data, size_t size, uint64_t, uint64_t) {
    pending.append(data, size);
    size_t end;
    while ((end = pending.find("\n\n")) != std::string::npos) {
      const std::string event = pending.substr(0, end);
      pending.erase(0, end + 2);
      if (event.rfind("data: ", 0) != 0) continue;
      const std::string data_text = event.substr(6);
      if (data_text == "[DONE]") continue;
      const nlohmann::json chunk = nlohmann::json::parse(data_text, nullptr, false);
      if (chunk.is_discarded() || chunk.contains("error")) {
        error_body = data_text;
        continue;
      }
      if (chunk.contains("usage") && chunk["usage"].is_object()) {
        result.prompt_tokens = chunk["usage"].value("prompt_tokens", 0);
        result.output_tokens = chunk["usage"].value("completion_tokens", 0);
      }
      if (!chunk.contains("choices") || chunk["choices"].empty()) continue;
      const nlohmann::json& choice = chunk["choices"][0];
      if (!choice.value("text", std::string()).empty()) times.Arrived(result);
      if (choice.contains("finish_reason") && !choice["finish_reason"].is_null()) finished = true;
    }
    return true;
  };
  httplib::Response response;
  httplib::Error error = httplib::Error::Success;
  const bool sent = http.send(request, response, error);
  times.Ended(result);
  if (!sent) {
    result.status = absl::UnavailableError(
        absl::StrCat(host, ":", port, ": POST /v1/completions: ", httplib::to_string(error)));
  } else if (response.status != 200) {
    result.status = absl::UnavailableError(absl::StrCat(
        host, ":", port, ": POST /v1/completions: HTTP ", response.status, " ", response.body));
  } else if (!error_body.empty() || !finished) {
    result.status = absl::UnavailableError(
        absl::StrCat(host, ":", port, ": POST /v1/completions: the stream ended without finishing ",
                     error_body));
  }
  return result;
}

// GET /v1/models: the model id, and the vocabulary and context epx adds to it.
absl::StatusOr<v1::ModelInfoResponse> OpenAiModelInfo(const std::string& host, int port,
                                                      const ClientOptions& client) {
  std::unique_ptr<httplib::Client> client_ptr = HttpClient(host, port, client);
  httplib::Client& http = *client_ptr;
  http.set_read_timeout(std::chrono::seconds(static_cast<int64_t>(std::ceil(client.timeout_s))));
  httplib::Result r = http.Get("/v1/models");
  if (!r)
    return absl::UnavailableError(
        absl::StrCat(host, ":", port, ": GET /v1/models: ", httplib::to_string(r.error())));
  const nlohmann::json j = nlohmann::json::parse(r->body, nullptr, false);
  if (r->status != 200 || j.is_discarded() || !j.contains("data") || j["data"].empty())
    return absl::UnavailableError(
        absl::StrCat(host, ":", port, ": GET /v1/models: HTTP ", r->status, " ", r->body));
  const nlohmann::json& model = j["data"][0];
  v1::ModelInfoResponse info;
  info.set_model(model.value("id", std::string()));
  info.set_world_size(1);
  info.mutable_config()->set_vocab_size(model.value("vocab_size", 0));
  info.mutable_config()->set_bos_token_id(model.value("bos_token_id", -1));
  info.mutable_config()->set_eos_token_id(model.value("eos_token_id", -1));
  info.mutable_limits()->set_max_context(model.value("max_model_len", 0));
  return info;
}

void RunOpenAi(const BenchServeOptions& options, const v1::ModelInfoResponse& info,
               const std::string& host, int port, int64_t concurrency,
               std::vector<RequestResult>& results) {
  std::atomic<int64_t> next{0};
  std::vector<std::jthread> threads;
  threads.reserve(concurrency);
  for (int64_t t = 0; t < concurrency; ++t) {
    threads.emplace_back([&] {
      for (int64_t i = next++; i < static_cast<int64_t>(results.size()); i = next++)
        results[i] = RunOpenAiOne(host, port,
                                  OpenAiBody(MakeRequest(options, i, info.config()), info.model()),
                                  options.client);
    });
  }
}

absl::Status ValidateBenchOptions(const BenchServeOptions& options) {
  EPX_RETURN_IF_ERROR(ValidateClientOptions(options.client));
  if (options.concurrency <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--concurrency must be positive, got ", options.concurrency));
  if (options.requests <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--requests must be positive, got ", options.requests));
  if (options.max_tokens <= 0 || options.max_tokens > std::numeric_limits<uint32_t>::max())
    return absl::InvalidArgumentError(
        absl::StrCat("--max-tokens must be in [1, 2^32), got ", options.max_tokens));
  if (options.prompt_tokens < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--prompt-tokens must not be negative, got ", options.prompt_tokens));
  if (options.prompt_tokens == 0 && options.prompt.empty())
    return absl::InvalidArgumentError("--prompt is empty");
  if (options.api != "grpc" && options.api != "openai")
    return absl::InvalidArgumentError(
        absl::StrCat("--api must be grpc or openai, got \"", options.api, "\""));
  if (options.connections < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--connections must not be negative, got ", options.connections));
  return absl::OkStatus();
}

absl::StatusOr<v1::ModelInfoResponse> GetModelInfo(v1::Generation::Stub& stub,
                                                   const ClientOptions& client) {
  grpc::ClientContext context;
  PrepareContext(context, client);
  v1::ModelInfoResponse info;
  EPX_RETURN_IF_ERROR(FromGrpcStatus(stub.ModelInfo(&context, v1::ModelInfoRequest(), &info),
                                     client.server, "epx.v1.Generation/ModelInfo"));
  return info;
}

void PrintRow(const char* name, const Summary& s, std::ostream& out) {
  if (s.count == 0) {
    out << absl::StrFormat("  %-14s %7d %10s %10s %10s %10s %10s\n", name, 0, "-", "-", "-", "-",
                           "-");
    return;
  }
  out << absl::StrFormat("  %-14s %7d %10.2f %10.2f %10.2f %10.2f %10.2f\n", name, s.count, s.mean,
                         s.p50, s.p90, s.p99, s.max);
}

absl::Status AppendCsv(const std::string& path, const std::string& header,
                       const std::string& line) {
  std::error_code ec;
  const bool fresh =
      !std::filesystem::exists(path, ec) || std::filesystem::file_size(path, ec) == 0;
  std::ofstream file(path, std::ios::app);
  if (!file) return absl::NotFoundError(absl::StrCat(path, ": cannot open for appending"));
  if (fresh) file << header << "\n";
  file << line << "\n";
  file.flush();
  if (!file) return absl::DataLossError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

}  // namespace

absl::Status RunBenchServe(const BenchServeOptions& options, std::ostream& out) {
  EPX_RETURN_IF_ERROR(ValidateBenchOptions(options));
  const bool openai = options.api == "openai";
  std::string host;
  int port = 0;
  std::unique_ptr<v1::Generation::Stub> stub;
  v1::ModelInfoResponse info;
  if (openai) {
    EPX_ASSIGN_OR_RETURN(HttpAddress address, ParseHttpAddress(options.client.server, "--server"));
    if (address.port == 0)
      return absl::InvalidArgumentError(
          absl::StrCat("--server \"", options.client.server, "\" needs a port (--api openai)"));
    host = address.host;
    port = address.port;
    EPX_ASSIGN_OR_RETURN(info, OpenAiModelInfo(host, port, options.client));
  } else {
    stub = v1::Generation::NewStub(MakeClientChannel(options.client));
    EPX_ASSIGN_OR_RETURN(info, GetModelInfo(*stub, options.client));
  }
  if (options.prompt_tokens > 0) {
    if (info.config().vocab_size() <= kFirstOrdinaryToken + 2)
      return absl::FailedPreconditionError(
          absl::StrCat(options.client.server, ": vocab_size ", info.config().vocab_size(),
                       " leaves no ordinary tokens for random prompts"));
    const uint32_t max_context = info.limits().max_context();
    if (max_context > 0 && options.prompt_tokens + options.max_tokens > max_context)
      return absl::InvalidArgumentError(absl::StrCat(
          "--prompt-tokens ", options.prompt_tokens, " + --max-tokens ", options.max_tokens,
          " exceed the server's context of ", max_context, " tokens"));
  }

  // Each slot is written by the one stream or thread that took its index, read after all end.
  std::vector<RequestResult> results(options.requests);
  const int64_t num_threads = std::min(options.concurrency, options.requests);
  // gRPC: a connection per 500 open streams unless --connections says (HTTP/2 multiplexes them).
  const int64_t connections =
      options.connections > 0 ? options.connections : std::max<int64_t>(1, num_threads / 500);
  const Clock::time_point start = Clock::now();
  try {
    if (openai) {
      RunOpenAi(options, info, host, port, num_threads, results);
    } else {
      RunGrpc(options, info.config(), num_threads, connections, results);
    }
  } catch (const std::system_error& e) {
    // The threads already started have joined (jthread); their requests are lost with the run.
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot start ", num_threads, " client threads: ", e.what()));
  }
  const double wall_s = std::chrono::duration<double>(Clock::now() - start).count();

  std::vector<double> ttft, tpot, itl, latency;
  int64_t ok = 0, output_tokens = 0, prompt_tokens = 0, min_tokens = -1, max_tokens = 0;
  std::map<std::string, int64_t> failures;  // status code -> requests
  std::map<std::string, std::string> first_message;
  absl::Status first_failure;
  for (const RequestResult& r : results) {
    if (!r.status.ok()) {
      const std::string code = absl::StatusCodeToString(r.status.code());
      ++failures[code];
      first_message.emplace(code, std::string(r.status.message()));
      if (first_failure.ok()) first_failure = r.status;
      continue;
    }
    ++ok;
    output_tokens += r.output_tokens;
    prompt_tokens += r.prompt_tokens;
    min_tokens = min_tokens < 0 ? r.output_tokens : std::min(min_tokens, r.output_tokens);
    max_tokens = std::max(max_tokens, r.output_tokens);
    if (r.ttft_ms.has_value()) ttft.push_back(*r.ttft_ms);
    if (r.tpot_ms.has_value()) tpot.push_back(*r.tpot_ms);
    itl.insert(itl.end(), r.itl_ms.begin(), r.itl_ms.end());
    latency.push_back(r.latency_ms);
  }
  const int64_t failed = options.requests - ok;
  const Summary ttft_s = Summarize(ttft), tpot_s = Summarize(tpot), itl_s = Summarize(itl),
                latency_s = Summarize(latency);
  const double output_tps = wall_s > 0 ? output_tokens / wall_s : 0;
  const double total_tps = wall_s > 0 ? (output_tokens + prompt_tokens) / wall_s : 0;
  const double rps = wall_s > 0 ? ok / wall_s : 0;
  const double mean_prompt = ok > 0 ? static_cast<double>(prompt_tokens) / ok : 0;

  const std::string prompt_kind = options.prompt_tokens > 0
                                      ? absl::StrCat(options.prompt_tokens, " random tokens")
                                      : absl::StrCat("text of ", options.prompt.size(), " bytes");
  out << absl::StrFormat("server        %s (%s, %s", options.client.server, info.model(),
                         openai ? "OpenAI HTTP /v1/completions, a client thread per stream)\n"
                                : absl::StrFormat("gRPC, world size %d, %d connections)\n",
                                                  info.world_size(), connections));
  out << absl::StrFormat(
      "load          %d requests, concurrency %d, max_tokens %d, prompt %s, temperature %g%s\n",
      options.requests, num_threads, options.max_tokens, prompt_kind, options.temperature,
      options.ignore_eos ? ", ignore_eos" : "");
  out << absl::StrFormat("results       %d ok, %d failed in %.3f s\n", ok, failed, wall_s);
  out << absl::StrFormat(
      "throughput    %.1f output tokens/s, %.1f total tokens/s, %.3f requests/s\n", output_tps,
      total_tps, rps);
  out << absl::StrFormat("tokens        %.1f prompt (server count), output %d..%d per request\n",
                         mean_prompt, std::max<int64_t>(min_tokens, 0), max_tokens);
  out << "\n"
      << absl::StrFormat("  %-14s %7s %10s %10s %10s %10s %10s\n", "", "count", "mean", "p50",
                         "p90", "p99", "max");
  PrintRow("TTFT (ms)", ttft_s, out);
  PrintRow("TPOT (ms)", tpot_s, out);
  PrintRow("ITL (ms)", itl_s, out);
  PrintRow("latency (ms)", latency_s, out);
  if (!failures.empty()) {
    out << "\nfailures\n";
    for (const auto& [code, count] : failures)
      out << absl::StrFormat("  %-20s %7d  first: %s\n", code, count, first_message[code]);
  }
  out << std::flush;

  if (!options.csv.empty()) {
    const std::string header =
        "server,model,concurrency,requests,max_tokens,prompt_tokens,temperature,ok,failed,wall_s,"
        "output_tok_per_s,total_tok_per_s,req_per_s,ttft_p50_ms,ttft_p90_ms,ttft_p99_ms,"
        "tpot_mean_ms,itl_p50_ms,itl_p90_ms,itl_p99_ms,latency_p50_ms,latency_p99_ms";
    const std::string line = absl::StrFormat(
        "%s,%s,%d,%d,%d,%.1f,%g,%d,%d,%.3f,%.2f,%.2f,%.4f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,"
        "%.3f",
        options.client.server, info.model(), num_threads, options.requests, options.max_tokens,
        mean_prompt, options.temperature, ok, failed, wall_s, output_tps, total_tps, rps,
        ttft_s.p50, ttft_s.p90, ttft_s.p99, tpot_s.mean, itl_s.p50, itl_s.p90, itl_s.p99,
        latency_s.p50, latency_s.p99);
    EPX_RETURN_IF_ERROR(AppendCsv(options.csv, header, line));
  }
  if (ok == 0) return first_failure;
  return absl::OkStatus();
}

}  // namespace epx
