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
  GenerationEvent event;
  bool cancelled = false;
  while (true) {
    // A stop signal (SIGINT, SIGTERM) ends the request; the report below still prints. Checked
    // on every event too, since a busy decode never lets Next time out.
    if (!cancelled && Runtime::stop_requested()) {
      stream->Cancel();
      cancelled = true;
    }
    if (!stream->Next(&event, absl::Milliseconds(100))) continue;
    if (!event.token_ids.empty() && first_token == start)
      first_token = std::chrono::steady_clock::now();
    out << event.text << std::flush;
    if (event.last()) break;
  }
  scheduler.Stop();
  steps.join();
  out << std::endl;
  if (!(cancelled && absl::IsCancelled(event.error))) EPX_RETURN_IF_ERROR(event.error);
  EPX_RETURN_IF_ERROR(run);
  if (options.request.usage)
    log << UsageLine(FinishReasonName(event.finish), event.prompt_tokens, event.completion_tokens,
                     event.matched_stop)
        << "\n";
  const auto end = std::chrono::steady_clock::now();
  const int64_t generated = event.completion_tokens;
  const double prefill_s = std::chrono::duration<double>(first_token - start).count();
  const double decode_s = std::chrono::duration<double>(end - first_token).count();
  log << "generated " << generated << " tokens from a " << prompt_tokens << "-token prompt: "
      << "prefill " << prefill_s * 1e3 << " ms, decode "
      << (generated > 1 && decode_s > 0 ? (generated - 1) / decode_s : 0.0) << " tokens/s\n";
  if (event.finish == FinishReason::kCancelled)
    log << "stopped by a signal after " << generated << " tokens; the output above is partial\n";
  return absl::OkStatus();
}

}  // namespace

absl::Status RunGenerate(const GenerateOptions& options, std::ostream& out, std::ostream& log) {
  EPX_ASSIGN_OR_RETURN(auto runtime, Runtime::Start(options.runtime));
  if (runtime->is_worker()) return runtime->ServeAsWorker();
  absl::Status result = GenerateOnEngine(options, runtime->engine(), out, log);
  if (result.ok() && options.stats) runtime->PrintStats(log);
  return runtime->Finish(result);
}

}  // namespace epx
