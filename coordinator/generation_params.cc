#include "coordinator/generation_params.h"

#include <algorithm>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace epx {

absl::StatusOr<GenerationRequest> BuildRequest(const GenerationParams& params,
                                               const Tokenizer& tokenizer, int64_t max_context) {
  const int prompts =
      params.text.has_value() + params.token_ids.has_value() + params.chat.has_value();
  if (prompts == 0) return absl::InvalidArgumentError("no prompt: give text, token ids or a chat");
  if (prompts > 1)
    return absl::InvalidArgumentError(
        "more than one prompt: give only one of text, token ids and a chat");
  GenerationRequest r;
  if (params.text.has_value()) {
    if (params.text->empty()) return absl::InvalidArgumentError("prompt text is empty");
    EPX_ASSIGN_OR_RETURN(r.prompt, tokenizer.Encode(*params.text, params.add_bos));
    if (r.prompt.empty()) return absl::InvalidArgumentError("prompt text has no tokens");
  } else if (params.token_ids.has_value()) {
    if (params.token_ids->empty()) return absl::InvalidArgumentError("prompt token_ids is empty");
    r.prompt = *params.token_ids;
  } else {
    EPX_ASSIGN_OR_RETURN(r.prompt, ApplyChatTemplate(tokenizer, *params.chat));
  }
  if (params.max_tokens.has_value()) {
    r.max_tokens = *params.max_tokens;
  } else if (params.max_tokens_to_context) {
    r.max_tokens = std::max<int64_t>(1, max_context - static_cast<int64_t>(r.prompt.size()));
  } else {
    r.max_tokens = kDefaultMaxTokens;
  }
  r.sampling.temperature = params.temperature.value_or(kDefaultTemperature);
  r.sampling.top_k = params.top_k.value_or(kDefaultTopK);
  r.sampling.top_p = params.top_p.value_or(kDefaultTopP);
  r.repetition_penalty = params.repetition_penalty.value_or(kDefaultRepetitionPenalty);
  if (params.seed.has_value()) {
    r.seed = *params.seed;
  } else {
    std::random_device device;
    r.seed = (uint64_t{device()} << 32) | device();
  }
  r.stop = params.stop;
  r.stop_token_ids = params.stop_token_ids;
  r.ignore_eos = params.ignore_eos;
  return r;
}

absl::StatusOr<Completion> Collect(RequestStream& stream, const std::function<bool()>& stop,
                                   const std::function<void(const GenerationEvent&)>& on_event) {
  Completion c;
  bool cancelled = false;
  GenerationEvent event;
  while (true) {
    if (!cancelled && stop && stop()) {
      stream.Cancel();
      cancelled = true;
    }
    if (!stream.Next(&event, absl::Milliseconds(100))) continue;
    if (on_event) on_event(event);
    c.text += event.text;
    if (event.last()) break;
  }
  if (cancelled && absl::IsCancelled(event.error)) {
    c.finish = FinishReason::kCancelled;
  } else {
    EPX_RETURN_IF_ERROR(event.error);
    c.finish = event.finish;
  }
  c.matched_stop = event.matched_stop;
  c.prompt_tokens = event.prompt_tokens;
  c.completion_tokens = event.completion_tokens;
  return c;
}

}  // namespace epx
