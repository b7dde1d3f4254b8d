#include <algorithm>
#include <cmath>
#include <cstring>
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
  Tensor logits;                     // [T, vocab]
  std::vector<int32_t> greedy;       // [N]
  std::vector<float> greedy_logits;  // [N * vocab]
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
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": ", p, "greedy (a vector; its length sets the decode steps) is missing"));
    EPX_ASSIGN_OR_RETURN(TensorView view, file->Get(p + "tokens"));
    Prompt prompt;
    prompt.tokens.resize(view.numel());  // copied: the mapped data need not be 4-byte aligned
    std::memcpy(prompt.tokens.data(), view.raw(), view.nbytes());
    prompt.num_greedy = greedy->shape[0];
    prompts.push_back(std::move(prompt));
  }
  if (prompts.empty())
    return absl::InvalidArgumentError(absl::StrCat(path, ": no prompt_0.tokens"));
  size_t listed = 0;
  for (const auto& e : file->entries())
    if (e.name.rfind("prompt_", 0) == 0 && e.name.size() > 7 &&
        e.name.compare(e.name.size() - 7, 7, ".tokens") == 0)
      ++listed;
  if (listed != prompts.size())
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": holds ", listed, " prompt_{i}.tokens but they are not numbered 0..",
                     listed - 1, " (prompt_", prompts.size(), " is missing)"));
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
      batch.push_back(
          {static_cast<int64_t>(i), absl::MakeConstSpan(&prompts[i].greedy.back(), 1), false});
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

// max |a - b| / max |ref| over two equally long float arrays.
double RelativeError(const float* a, const float* ref, int64_t n) {
  double diff = 0, mag = 0;
  for (int64_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - ref[i]));
    mag = std::max(mag, std::abs(static_cast<double>(ref[i])));
  }
  return mag > 0 ? diff / mag : diff;
}

// Compares each prompt's outputs with the reference ones the input file holds (the golden
// layout): logits and greedy_logits within `tolerance` of the largest reference magnitude, greedy
// tokens exact.
absl::Status CheckAgainstReference(const EvalOptions& options, const std::vector<Prompt>& prompts,
                                   int64_t vocab, std::ostream& log) {
  EPX_ASSIGN_OR_RETURN(auto ref, SafetensorsFile::Open(options.input));
  std::string failures;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Prompt& p = prompts[i];
    const std::string n = absl::StrCat("prompt_", i, ".");
    auto read = [&](const std::string& name, DType dtype,
                    int64_t numel) -> absl::StatusOr<std::vector<uint8_t>> {
      const SafetensorsEntry* e = ref->Find(n + name);
      if (e == nullptr || e->dtype != dtype || NumElements(e->shape) != numel)
        return absl::InvalidArgumentError(absl::StrCat(options.input, ": --check needs ", n, name,
                                                       " of ", numel, " ", DTypeName(dtype),
                                                       " values"));
      EPX_ASSIGN_OR_RETURN(TensorView v, ref->Get(n + name));
      std::vector<uint8_t> bytes(v.nbytes());  // copied: the mapping need not be aligned
      if (!bytes.empty()) std::memcpy(bytes.data(), v.raw(), bytes.size());
      return bytes;
    };
    const int64_t t = static_cast<int64_t>(p.tokens.size()), g = p.num_greedy;
    EPX_ASSIGN_OR_RETURN(auto logits, read("logits", DType::kF32, t * vocab));
    EPX_ASSIGN_OR_RETURN(auto greedy, read("greedy", DType::kI32, g));
    EPX_ASSIGN_OR_RETURN(auto greedy_logits, read("greedy_logits", DType::kF32, g * vocab));
    const double prefill_err = RelativeError(
        p.logits.data<float>(), reinterpret_cast<const float*>(logits.data()), t * vocab);
    const double decode_err = RelativeError(
        p.greedy_logits.data(), reinterpret_cast<const float*>(greedy_logits.data()), g * vocab);
    int64_t same = 0;
    for (int64_t j = 0; j < g; ++j)
      same += p.greedy[j] == reinterpret_cast<const int32_t*>(greedy.data())[j];
    log << "check prompt " << i << ": prefill logits rel err " << prefill_err
        << ", decode logits rel err " << decode_err << ", greedy tokens " << same << "/" << g
        << " equal\n";
    if (prefill_err > options.tolerance || decode_err > options.tolerance || same != g)
      absl::StrAppend(&failures, failures.empty() ? "" : "; ", "prompt ", i);
  }
  if (!failures.empty())
    return absl::FailedPreconditionError(
        absl::StrCat("outputs differ from the reference in ", options.input, " (tolerance ",
                     options.tolerance, " relative, greedy tokens exact): ", failures));
  log << "check passed: every prompt within " << options.tolerance
      << " of the reference, every greedy token equal\n";
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
    out.emplace_back(n + "tokens", TensorView(p.tokens.data(), DType::kI32,
                                              {static_cast<int64_t>(p.tokens.size())}));
    out.emplace_back(n + "logits", p.logits.view());
    out.emplace_back(n + "greedy", TensorView(p.greedy.data(), DType::kI32, {g}));
    out.emplace_back(n + "greedy_logits",
                     TensorView(p.greedy_logits.data(), DType::kF32, {g, vocab}));
    log << "prompt " << i << ": " << p.tokens.size() << " prompt tokens, " << g
        << " greedy tokens\n";
  }
  EPX_RETURN_IF_ERROR(WriteSafetensors(options.output, out));
  return options.check ? CheckAgainstReference(options, prompts, vocab, log) : absl::OkStatus();
}

}  // namespace

absl::Status RunEval(const EvalOptions& options, std::ostream& log) {
  return Runtime::RunJob(options.runtime, options.stats, log,
                         [&](Engine& engine) { return EvalOnEngine(options, engine, log); });
}

}  // namespace epx
