// What a client asks for, whatever the transport: gRPC's GenerateRequest, the OpenAI HTTP bodies
// and the `epx generate` / `epx batch` commands are all read into GenerationParams, and
// BuildRequest turns it into the scheduler's GenerationRequest with the one set of defaults
// below. The scheduler then checks every value (ranges, vocabulary, context).
//
// Thread-safe (stateless).
#ifndef EPX_COORDINATOR_GENERATION_PARAMS_H_
#define EPX_COORDINATOR_GENERATION_PARAMS_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tokenizer.h"
#include "coordinator/chat_template.h"
#include "coordinator/scheduler.h"

namespace epx {

// The defaults (kDefaultMaxTokens, ...) are in coordinator/scheduler.h, beside GenerationRequest.
struct GenerationParams {
  // The prompt: exactly one of text, token_ids and chat.
  std::optional<std::string> text;
  bool add_bos = true;  // text only: the tokenizer's BOS first
  std::optional<std::vector<int32_t>> token_ids;
  std::optional<std::vector<ChatMessage>> chat;  // the Mixtral-Instruct template

  std::optional<int64_t> max_tokens;
  // Unset max_tokens: the rest of the context (as chat APIs do) rather than kDefaultMaxTokens.
  bool max_tokens_to_context = false;
  std::optional<float> temperature, top_p, repetition_penalty;
  std::optional<int32_t> top_k;
  std::optional<uint64_t> seed;  // unset: a random one
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
};

// The prompt tokenised and the defaults applied. InvalidArgument for a missing, empty or doubly
// given prompt and a chat the template refuses. `max_context` (Scheduler::max_context) bounds
// the max_tokens of max_tokens_to_context.
absl::StatusOr<GenerationRequest> BuildRequest(const GenerationParams& params,
                                               const Tokenizer& tokenizer, int64_t max_context);

// A request's whole output, read from its stream (the non-streaming APIs and `epx batch`).
struct Completion {
  std::string text;
  FinishReason finish = FinishReason::kNone;
  std::string matched_stop;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

// Reads `stream` to its last event, calling `on_event` (may be empty) with each one as it comes.
// Once `stop` returns true (asked at every event and at least every 100 ms) the request is
// cancelled and comes back finished as kCancelled. The stream's error, if it ended with one.
// `stop` may be empty.
absl::StatusOr<Completion> Collect(
    RequestStream& stream, const std::function<bool()>& stop,
    const std::function<void(const GenerationEvent&)>& on_event = nullptr);

}  // namespace epx

#endif  // EPX_COORDINATOR_GENERATION_PARAMS_H_
