#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "common/model_weights.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "coordinator/engine.h"
#include "kernels/cpu/ops.h"

namespace epx {

namespace {

absl::Status GenerateOnEngine(const GenerateOptions& options, Engine& engine, std::ostream& out,
                              std::ostream& log) {
  cpu::SamplingParams sampling;
  sampling.temperature = options.temperature;
  sampling.top_k = options.top_k;
  sampling.top_p = options.top_p;
  EPX_RETURN_IF_ERROR(sampling.Validate());
  if (options.max_tokens <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--max-tokens must be positive, got ", options.max_tokens));
  if (options.prompt.empty()) return absl::InvalidArgumentError("--prompt is empty");

  const std::filesystem::path dir(options.runtime.model_dir);
  ModelConfig config = engine.config();
  EPX_RETURN_IF_ERROR(config.ApplyGenerationConfig((dir / "generation_config.json").string()));
  EPX_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::FromFile((dir / "tokenizer.model").string()));
  if (tokenizer->vocab_size() > config.vocab_size)
    return absl::InvalidArgumentError(
        absl::StrCat(options.runtime.model_dir, ": tokenizer.model has ", tokenizer->vocab_size(),
                     " pieces, more than vocab_size ", config.vocab_size));
  EPX_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, tokenizer->Encode(options.prompt, false));
  prompt.insert(prompt.begin(), config.bos_token_id);
  // The last sampled token is never fed back, so the cache holds prompt + max_tokens - 1.
  const int64_t room = config.max_position_embeddings - static_cast<int64_t>(prompt.size()) + 1;
  if (options.max_tokens > room)
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", prompt.size(), " tokens) + --max-tokens ", options.max_tokens,
                     " exceed the context of ", config.max_position_embeddings, " tokens"));

  EPX_RETURN_IF_ERROR(engine.AddSequence(0));
  cpu::SamplingRng rng(options.seed);
  StreamDecoder decoder(tokenizer.get(), prompt);
  std::vector<int32_t> input = prompt;
  int64_t generated = 0;
  const auto start = std::chrono::steady_clock::now();
  auto first_token = start;
  while (generated < options.max_tokens && !Runtime::stop_requested()) {
    SequenceInput in{0, input, false};
    EPX_ASSIGN_OR_RETURN(Tensor logits, engine.Step({&in, 1}));
    EPX_ASSIGN_OR_RETURN(
        int32_t token,
        cpu::Sample({logits.data<float>(), static_cast<size_t>(config.vocab_size)}, sampling, rng));
    if (++generated == 1) first_token = std::chrono::steady_clock::now();
    if (std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), token) !=
        config.eos_token_ids.end())
      break;
    if (token < tokenizer->vocab_size()) {
      EPX_ASSIGN_OR_RETURN(std::string text, decoder.Push(token));
      out << text << std::flush;
    }
    input.assign(1, token);
  }
  EPX_ASSIGN_OR_RETURN(std::string rest, decoder.Flush());
  out << rest << std::endl;
  const auto end = std::chrono::steady_clock::now();
  const double prefill_s = std::chrono::duration<double>(first_token - start).count();
  const double decode_s = std::chrono::duration<double>(end - first_token).count();
  log << "generated " << generated << " tokens from a " << prompt.size() << "-token prompt: "
      << "prefill " << prefill_s * 1e3 << " ms, decode "
      << (generated > 1 && decode_s > 0 ? (generated - 1) / decode_s : 0.0) << " tokens/s\n";
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
