#include <chrono>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "common/model_weights.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "coordinator/engine.h"
#include "coordinator/generation_params.h"
#include "coordinator/scheduler.h"

namespace epx {

namespace {

// One request through a scheduler of one sequence, printed as it streams.
absl::Status GenerateOnEngine(const GenerateOptions& options, Engine& engine, std::ostream& out,
                              std::ostream& log) {
  EPX_ASSIGN_OR_RETURN(GenerationParams params, ToParams(options.request));
  const std::filesystem::path dir(options.runtime.model_dir);
  EPX_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::FromFile((dir / "tokenizer.model").string()));
  if (tokenizer->vocab_size() > engine.config().vocab_size)
    return absl::InvalidArgumentError(
        absl::StrCat(options.runtime.model_dir, ": tokenizer.model has ", tokenizer->vocab_size(),
                     " pieces, more than vocab_size ", engine.config().vocab_size));
  SchedulerOptions scheduler_options;
  scheduler_options.max_queue = 1;
  scheduler_options.max_running = 1;
  Scheduler scheduler(&engine, tokenizer.get(), scheduler_options);
  EPX_ASSIGN_OR_RETURN(GenerationRequest request,
                       BuildRequest(params, *tokenizer, scheduler.max_context()));
  request.request_id = "generate";
  const size_t prompt_tokens = request.prompt.size();
  EPX_ASSIGN_OR_RETURN(std::shared_ptr<RequestStream> stream, scheduler.Submit(std::move(request)));

  absl::Status run;
  std::thread steps([&] { run = scheduler.Run(); });
  const auto start = std::chrono::steady_clock::now();
  auto first_token = start;
  // A stop signal (SIGINT, SIGTERM) ends the request; the report below still prints.
  absl::StatusOr<Completion> done = Collect(
      *stream, [] { return Runtime::stop_requested(); },
      [&](const GenerationEvent& event) {
        if (!event.token_ids.empty() && first_token == start)
          first_token = std::chrono::steady_clock::now();
        out << event.text << std::flush;
      });
  scheduler.Stop();
  steps.join();
  out << std::endl;
  EPX_RETURN_IF_ERROR(done.status());
  EPX_RETURN_IF_ERROR(run);
  if (options.request.usage)
    log << UsageLine(FinishReasonName(done->finish), done->prompt_tokens, done->completion_tokens,
                     done->matched_stop)
        << "\n";
  const auto end = std::chrono::steady_clock::now();
  const int64_t generated = done->completion_tokens;
  const double prefill_s = std::chrono::duration<double>(first_token - start).count();
  const double decode_s = std::chrono::duration<double>(end - first_token).count();
  log << "generated " << generated << " tokens from a " << prompt_tokens << "-token prompt: "
      << "prefill " << prefill_s * 1e3 << " ms, decode "
      << (generated > 1 && decode_s > 0 ? (generated - 1) / decode_s : 0.0) << " tokens/s\n";
  if (done->finish == FinishReason::kCancelled)
    log << "stopped by a signal after " << generated << " tokens; the output above is partial\n";
  return absl::OkStatus();
}

}  // namespace

absl::Status RunGenerate(const GenerateOptions& options, std::ostream& out, std::ostream& log) {
  return Runtime::RunJob(options.runtime, options.stats, log, [&](Engine& engine) {
    return GenerateOnEngine(options, engine, out, log);
  });
}

}  // namespace epx
