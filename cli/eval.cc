#include <algorithm>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "common/model_weights.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "coordinator/engine.h"
#include "kernels/cpu/ops.h"

namespace epx {
namespace {

struct Prompt {
  std::vector<int32_t> tokens;
  int64_t num_greedy = 0;
  Tensor logits;                       // [T, vocab]
  std::vector<int32_t> greedy;         // [N]
  std::vector<float> greedy_logits;    // [N * vocab]
};

absl::StatusOr<std::vector<Prompt>> ReadPrompts(const std::string& path) {
  EPX_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
  std::vector<Prompt> prompts;
  for (int i = 0;; ++i) {
    const std::string p = absl::StrCat("prompt_", i, ".");
    const SafetensorsEntry* tokens = file->Find(p + "tokens");
    if (tokens == nullptr) break;
    const SafetensorsEntry* greedy = file->Find(p + "greedy");
    if (tokens->dtype != DType::kI32 || tokens->shape.size() != 1 || tokens->shape[0] == 0)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": ", p, "tokens must be a non-empty I32 vector"));
    if (greedy == nullptr || greedy->shape.size() != 1)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": ", p, "greedy (a vector; its length sets the decode steps) is missing"));
    EPX_ASSIGN_OR_RETURN(TensorView view, file->Get(p + "tokens"));
    Prompt prompt;
    prompt.tokens.assign(view.data<const int32_t>(), view.data<const int32_t>() + view.numel());
    prompt.num_greedy = greedy->shape[0];
    prompts.push_back(std::move(prompt));
  }
  if (prompts.empty())
    return absl::InvalidArgumentError(absl::StrCat(path, ": no prompt_0.tokens"));
  return prompts;
}

// Runs `group` (indices into prompts) as one batch: prefill, then greedy decode.
absl::Status RunGroup(Engine& engine, const std::vector<size_t>& group,
                      std::vector<Prompt>& prompts, int64_t vocab) {
  std::vector<SequenceInput> batch;
  for (size_t i : group) {
    EPX_RETURN_IF_ERROR(engine.AddSequence(static_cast<int64_t>(i)));
    batch.push_back({static_cast<int64_t>(i), prompts[i].tokens, /*all_logits=*/true});
  }
  EPX_ASSIGN_OR_RETURN(Tensor logits, engine.Step(batch));
  int64_t row = 0;
  std::vector<int32_t> next(prompts.size());
  for (size_t i : group) {
    Prompt& p = prompts[i];
    const int64_t n = static_cast<int64_t>(p.tokens.size());
    p.logits = Tensor::Empty(DType::kF32, {n, vocab});
    std::copy_n(logits.data<float>() + row * vocab, n * vocab, p.logits.data<float>());
    row += n;
    next[i] = cpu::ArgMax(absl::MakeConstSpan(p.logits.data<float>() + (n - 1) * vocab, vocab));
  }
  for (int64_t step = 0;; ++step) {
    if (Runtime::stop_requested()) return absl::CancelledError("stopped by a signal");
    batch.clear();
    std::vector<size_t> active;
    for (size_t i : group) {
      if (step < prompts[i].num_greedy) {
        prompts[i].greedy.push_back(next[i]);
        active.push_back(i);
      }
    }
    if (active.empty()) break;
    for (size_t i : active)
      batch.push_back({static_cast<int64_t>(i), absl::MakeConstSpan(&prompts[i].greedy.back(), 1),
                       false});
    EPX_ASSIGN_OR_RETURN(Tensor step_logits, engine.Step(batch));
    for (size_t r = 0; r < active.size(); ++r) {
      const float* l = step_logits.data<float>() + r * vocab;
      Prompt& p = prompts[active[r]];
      p.greedy_logits.insert(p.greedy_logits.end(), l, l + vocab);
      next[active[r]] = cpu::ArgMax(absl::MakeConstSpan(l, vocab));
    }
  }
  for (size_t i : group) EPX_RETURN_IF_ERROR(engine.RemoveSequence(static_cast<int64_t>(i)));
  return absl::OkStatus();
}

absl::Status EvalOnEngine(const EvalOptions& options, Engine& engine, std::ostream& log) {
  EPX_ASSIGN_OR_RETURN(std::vector<Prompt> prompts, ReadPrompts(options.input));
  const int64_t vocab = engine.config().vocab_size;
  if (options.sequential) {
    for (size_t i = 0; i < prompts.size(); ++i)
      EPX_RETURN_IF_ERROR(RunGroup(engine, {i}, prompts, vocab));
  } else {
    std::vector<size_t> all(prompts.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    EPX_RETURN_IF_ERROR(RunGroup(engine, all, prompts, vocab));
  }
  std::vector<std::pair<std::string, TensorView>> out;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Prompt& p = prompts[i];
    const std::string n = absl::StrCat("prompt_", i, ".");
    const int64_t g = static_cast<int64_t>(p.greedy.size());
    out.emplace_back(n + "tokens",
                     TensorView(p.tokens.data(), DType::kI32, {static_cast<int64_t>(p.tokens.size())}));
    out.emplace_back(n + "logits", p.logits.view());
    out.emplace_back(n + "greedy", TensorView(p.greedy.data(), DType::kI32, {g}));
    out.emplace_back(n + "greedy_logits",
                     TensorView(p.greedy_logits.data(), DType::kF32, {g, vocab}));
    log << "prompt " << i << ": " << p.tokens.size() << " prompt tokens, " << g
        << " greedy tokens\n";
  }
  return WriteSafetensors(options.output, out);
}

}  // namespace

absl::Status RunEval(const EvalOptions& options, std::ostream& log) {
  EPX_ASSIGN_OR_RETURN(auto runtime, Runtime::Start(options.runtime));
  if (runtime->is_worker()) return runtime->ServeAsWorker();
  absl::Status result = EvalOnEngine(options, runtime->engine(), log);
  if (result.ok() && options.stats) runtime->PrintStats(log);
  return runtime->Finish(result);
}

}  // namespace epx
