#include "cli/batch.h"

#include <grpcpp/client_context.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "cli/grpc_client.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "coordinator/engine.h"
#include "coordinator/generation_params.h"
#include "coordinator/http_server.h"
#include "coordinator/scheduler.h"
#include "nlohmann/json.hpp"

namespace epx {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

// One input line, read.
struct Line {
  int64_t number = 0;  // 1-based, in the file
  json custom_id;      // a string, or null when the line has none
  bool chat = false;
  GenerationParams params;
  absl::Status error;  // why it cannot run (then nothing else is set)
};

absl::Status LineError(int64_t number, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("line ", number, ": ", what));
}

// Reads one non-blank line. `model` is the model's id; `seen` the custom_ids so far.
Line ReadLine(const std::string& text, int64_t number, const std::string& model,
              absl::flat_hash_set<std::string>& seen) {
  Line line;
  line.number = number;
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    line.error = LineError(number, "not JSON");
    return line;
  }
  if (!j.is_object()) {
    line.error = LineError(number, "not a JSON object");
    return line;
  }
  if (j.contains("custom_id") && j["custom_id"].is_string()) line.custom_id = j["custom_id"];
  for (const auto& [key, value] : j.items()) {
    if (key != "custom_id" && key != "method" && key != "url" && key != "body") {
      line.error = LineError(number, absl::StrCat("\"", key,
                                                  "\" is not a field of a batch line (custom_id, "
                                                  "method, url, body)"));
      return line;
    }
  }
  if (!line.custom_id.is_string() || line.custom_id.get<std::string>().empty()) {
    line.error = LineError(number, "\"custom_id\" must be a non-empty string");
    return line;
  }
  if (!seen.insert(line.custom_id.get<std::string>()).second) {
    line.error =
        LineError(number, absl::StrCat("\"custom_id\" \"", line.custom_id.get<std::string>(),
                                       "\" is used by an earlier line"));
    return line;
  }
  if (j.contains("method") && j["method"] != "POST") {
    line.error = LineError(number, "\"method\" must be \"POST\"");
    return line;
  }
  const json url = j.value("url", json());
  if (url == "/v1/chat/completions") {
    line.chat = true;
  } else if (url != "/v1/completions") {
    line.error =
        LineError(number, "\"url\" must be \"/v1/completions\" or \"/v1/chat/completions\"");
    return line;
  }
  if (!j.contains("body") || !j["body"].is_object()) {
    line.error = LineError(number, "\"body\" must be a JSON object");
    return line;
  }
  absl::StatusOr<openai::ParsedRequest> parsed = openai::ParseRequest(j["body"], line.chat);
  if (!parsed.ok()) {
    // Keeps the message's leading "\"field\"" (ErrorBody reads the param from it).
    line.error = absl::Status(parsed.status().code(), parsed.status().message());
    return line;
  }
  if (parsed->stream) {
    line.error = absl::InvalidArgumentError("\"stream\" is not supported in a batch");
    return line;
  }
  if (absl::Status served = openai::CheckModel(parsed->model, model); !served.ok()) {
    line.error = served;
    return line;
  }
  line.params = std::move(parsed->params);
  return line;
}

json ErrorLine(const Line& line, const absl::Status& status) {
  json error = openai::ErrorBody(status)["error"];
  const std::string message = error.value("message", std::string());
  if (message.rfind("line ", 0) != 0)
    error["message"] = absl::StrCat("line ", line.number, ": ", message);
  error["line"] = line.number;
  return json{{"id", absl::StrCat("batch_req_", line.number)},
              {"custom_id", line.custom_id},
              {"response", nullptr},
              {"error", error}};
}

json ResultLine(const Line& line, const std::string& model, int64_t created, const Completion& c) {
  const std::string request_id =
      absl::StrCat(line.chat ? "chatcmpl-" : "cmpl-", "batch-", line.number);
  return json{{"id", absl::StrCat("batch_req_", line.number)},
              {"custom_id", line.custom_id},
              {"response",
               {{"status_code", 200},
                {"request_id", request_id},
                {"body", openai::CompletionBody(line.chat, request_id, model, created, c.text,
                                                c.finish, c.prompt_tokens, c.completion_tokens)}}},
              {"error", nullptr}};
}

// Runs one line's request; how depends on --model or --server.
using RunOne = std::function<absl::StatusOr<Completion>(const GenerationParams&)>;

// "[#########           ] 45/100 lines, 3 errors, 12.3 lines/s" on one terminal line.
void DrawProgress(int64_t done, int64_t total, int64_t errors, double seconds) {
  constexpr int kWidth = 30;
  const int filled = total > 0 ? static_cast<int>(kWidth * done / total) : kWidth;
  const std::string bar = std::string(filled, '#') + std::string(kWidth - filled, ' ');
  const std::string line = absl::StrFormat("\r[%s] %d/%d lines, %d errors, %.1f lines/s", bar, done,
                                           total, errors, seconds > 0 ? done / seconds : 0.0);
  (void)!write(STDERR_FILENO, line.data(), line.size());
}

// Answers every line with `run`, `concurrency` at a time, writing results in order to `out`.
absl::Status AnswerLines(const std::vector<Line>& lines, const RunOne& run,
                         const std::string& model, const BatchOptions& options, std::ostream& out,
                         std::ostream& log) {
  const int64_t total = static_cast<int64_t>(lines.size());
  const bool progress = options.progress.value_or(isatty(STDERR_FILENO) == 1);
  const int64_t created = absl::ToUnixSeconds(absl::Now());
  const Clock::time_point start = Clock::now();

  std::mutex mu;
  std::vector<std::optional<std::string>> results(lines.size());  // guarded by mu
  int64_t written = 0, done = 0, errors = 0;                      // guarded by mu
  bool write_failed = false;                                      // guarded by mu
  Clock::time_point last_draw = start;                            // guarded by mu
  std::atomic<int64_t> next{0};
  std::atomic<bool> stopped{false};

  const auto finish_line = [&](size_t i, const json& result, bool error) {
    std::lock_guard<std::mutex> lock(mu);
    results[i] = openai::Dump(result);
    ++done;
    errors += error;
    const int64_t before = written;
    while (written < total && results[written].has_value()) {
      out << *results[written] << "\n";
      results[written].reset();
      ++written;
    }
    if (written > before) out.flush();
    if (!out) write_failed = true;
    const Clock::time_point now = Clock::now();
    if (progress && (done == total || now - last_draw > std::chrono::milliseconds(100))) {
      last_draw = now;
      DrawProgress(done, total, errors, std::chrono::duration<double>(now - start).count());
    }
  };

  const auto work = [&] {
    for (int64_t i = next++; i < total; i = next++) {
      const Line& line = lines[i];
      if (!line.error.ok()) {
        finish_line(i, ErrorLine(line, line.error), true);
        continue;
      }
      if (Runtime::stop_requested()) stopped = true;
      if (stopped) {
        finish_line(i, ErrorLine(line, absl::CancelledError("not run: stopped by a signal")), true);
        continue;
      }
      absl::StatusOr<Completion> c = run(line.params);
      if (c.ok() && c->finish == FinishReason::kCancelled)
        c = absl::CancelledError("cancelled before it finished (a stop signal or a shutdown)");
      if (!c.ok()) {
        finish_line(i, ErrorLine(line, c.status()), true);
      } else {
        finish_line(i, ResultLine(line, model, created, *c), false);
      }
    }
  };
  const int64_t threads = std::max<int64_t>(1, std::min(options.concurrency, total));
  {
    std::vector<std::jthread> pool;
    for (int64_t t = 0; t < threads; ++t) pool.emplace_back(work);
  }
  if (progress) (void)!write(STDERR_FILENO, "\n", 1);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (write_failed) return absl::DataLossError(absl::StrCat(options.output, ": write failed"));
  log << absl::StrFormat("%d lines: %d answered, %d errors, in %.2f s; wrote %s\n", total,
                         total - errors, errors, seconds, options.output);
  if (stopped)
    return absl::CancelledError(absl::StrCat("stopped by a signal; the lines not run are in ",
                                             options.output, " as cancelled"));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Line>> ReadInput(const std::string& path, const std::string& model) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open the input"));
  std::vector<Line> lines;
  absl::flat_hash_set<std::string> seen;
  std::string text;
  for (int64_t number = 1; std::getline(in, text); ++number) {
    if (absl::StripAsciiWhitespace(text).empty()) continue;
    lines.push_back(ReadLine(text, number, model, seen));
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return lines;
}

absl::Status Validate(const BatchOptions& options) {
  if (options.input.empty()) return absl::InvalidArgumentError("--input is empty");
  if (options.output.empty()) return absl::InvalidArgumentError("--output is empty");
  if (options.concurrency <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--concurrency must be positive, got ", options.concurrency));
  std::error_code ec;
  if (std::filesystem::equivalent(options.input, options.output, ec))
    return absl::InvalidArgumentError("--output must not be the --input file");
  if (!std::filesystem::exists(options.input, ec))
    return absl::NotFoundError(absl::StrCat(options.input, ": no such file"));
  return absl::OkStatus();
}

absl::StatusOr<std::ofstream> OpenOutput(const std::string& path) {
  std::ofstream out(path, std::ios::trunc);
  if (!out) return absl::NotFoundError(absl::StrCat(path, ": cannot open the output"));
  return out;
}

absl::Status RunRemote(const BatchOptions& options, std::ostream& log) {
  EPX_RETURN_IF_ERROR(ValidateClientOptions(options.client));
  std::unique_ptr<v1::Generation::Stub> stub =
      v1::Generation::NewStub(MakeClientChannel(options.client));
  v1::ModelInfoResponse info;
  {
    grpc::ClientContext context;
    PrepareContext(context, options.client);
    EPX_RETURN_IF_ERROR(FromGrpcStatus(stub->ModelInfo(&context, {}, &info), options.client.server,
                                       "epx.v1.Generation/ModelInfo"));
  }
  EPX_ASSIGN_OR_RETURN(std::vector<Line> lines, ReadInput(options.input, info.model()));
  EPX_ASSIGN_OR_RETURN(std::ofstream out, OpenOutput(options.output));
  const RunOne run = [&](const GenerationParams& params) {
    return GenerateToCompletion(*stub, ToGenerateRequest(params), options.client);
  };
  return AnswerLines(lines, run, info.model(), options, out, log);
}

absl::Status RunLocal(const BatchOptions& options, Engine& engine, std::ostream& log) {
  const std::filesystem::path dir(options.runtime.model_dir);
  EPX_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::FromFile((dir / "tokenizer.model").string()));
  const std::string model = openai::ModelName(options.runtime.model_dir);
  EPX_ASSIGN_OR_RETURN(std::vector<Line> lines, ReadInput(options.input, model));
  EPX_ASSIGN_OR_RETURN(std::ofstream out, OpenOutput(options.output));
  SchedulerOptions scheduler_options;
  scheduler_options.max_queue = options.concurrency;  // one per thread, never refused
  Scheduler scheduler(&engine, tokenizer.get(), scheduler_options);
  absl::Status steps;
  std::thread stepper([&] { steps = scheduler.Run(); });
  const RunOne run = [&](const GenerationParams& params) -> absl::StatusOr<Completion> {
    EPX_ASSIGN_OR_RETURN(GenerationRequest request,
                         BuildRequest(params, *tokenizer, scheduler.max_context()));
    EPX_ASSIGN_OR_RETURN(std::shared_ptr<RequestStream> stream,
                         scheduler.Submit(std::move(request)));
    return Collect(*stream, [] { return Runtime::stop_requested(); });
  };
  absl::Status answered = AnswerLines(lines, run, model, options, out, log);
  scheduler.Stop();
  stepper.join();
  EPX_RETURN_IF_ERROR(steps);
  return answered;
}

}  // namespace

absl::Status RunBatch(const BatchOptions& options, std::ostream& log) {
  EPX_RETURN_IF_ERROR(Validate(options));
  if (options.remote) return RunRemote(options, log);
  return Runtime::RunJob(options.runtime, options.stats, log,
                         [&](Engine& engine) { return RunLocal(options, engine, log); });
}

}  // namespace epx
