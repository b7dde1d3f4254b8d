#include "cli/bench_serve.h"

#include <grpcpp/client_context.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/grpc_client.h"
#include "common/status.h"
#include "epx/v1/generation.grpc.pb.h"

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

RequestResult RunOne(v1::Generation::Stub& stub, const v1::GenerateRequest& request,
                     const ClientOptions& client) {
  RequestResult result;
  grpc::ClientContext context;
  context.set_deadline(ClientDeadline(client.timeout_s));
  const Clock::time_point start = Clock::now();
  std::optional<Clock::time_point> first, last;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub.Generate(&context, request);
  v1::GenerateResponse response;
  bool cancelled = false;
  while (reader->Read(&response)) {
    if (response.token_ids_size() > 0) {
      const Clock::time_point now = Clock::now();
      if (!first.has_value()) {
        first = now;
        result.ttft_ms = Ms(now - start);
      } else {
        result.itl_ms.push_back(Ms(now - *last));
      }
      last = now;
      result.output_tokens += response.token_ids_size();
    }
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      result.prompt_tokens = response.usage().prompt_tokens();
      cancelled = response.finish_reason() == v1::FINISH_REASON_CANCELLED;
    }
  }
  result.status = FromGrpcStatus(reader->Finish(), client.server, "epx.v1.Generation/Generate");
  result.latency_ms = Ms(Clock::now() - start);
  if (result.status.ok() && cancelled)
    result.status = absl::UnavailableError("finished as cancelled: the server shut down");
  if (result.output_tokens > 1 && first.has_value())
    result.tpot_ms = Ms(*last - *first) / static_cast<double>(result.output_tokens - 1);
  return result;
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
  return absl::OkStatus();
}

absl::StatusOr<v1::ModelInfoResponse> GetModelInfo(v1::Generation::Stub& stub,
                                                   const ClientOptions& client) {
  grpc::ClientContext context;
  context.set_deadline(ClientDeadline(client.timeout_s));
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
  // One channel (one HTTP/2 connection) for all threads: the requests multiplex over it, as they
  // would from one front end.
  std::unique_ptr<v1::Generation::Stub> stub =
      v1::Generation::NewStub(MakeClientChannel(options.client));
  EPX_ASSIGN_OR_RETURN(v1::ModelInfoResponse info, GetModelInfo(*stub, options.client));
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

  // Each slot is written by the one thread that took its index and read after the joins.
  std::vector<RequestResult> results(options.requests);
  std::atomic<int64_t> next{0};
  const int64_t num_threads = std::min(options.concurrency, options.requests);
  const Clock::time_point start = Clock::now();
  try {
    std::vector<std::jthread> threads;
    threads.reserve(num_threads);
    for (int64_t t = 0; t < num_threads; ++t) {
      threads.emplace_back([&] {
        for (int64_t i = next++; i < options.requests; i = next++)
          results[i] = RunOne(*stub, MakeRequest(options, i, info.config()), options.client);
      });
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
  out << absl::StrFormat("server        %s (%s, world size %d)\n", options.client.server,
                         info.model(), info.world_size());
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
