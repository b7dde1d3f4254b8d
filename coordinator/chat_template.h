// The Mixtral-Instruct chat format: <s>[INST] user [/INST] assistant</s>[INST] user [/INST].
// BOS and EOS are inserted as token ids (never tokenised from text), the text between them is
// tokenised segment by segment, as the reference implementation of the format does. A system
// message, which the format has no place for, is put before the first user message, separated
// by a blank line.
//
// Thread-safe (stateless).
#ifndef EPX_COORDINATOR_CHAT_TEMPLATE_H_
#define EPX_COORDINATOR_CHAT_TEMPLATE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/tokenizer.h"

namespace epx {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

// InvalidArgument, naming the message, for: no messages, an unknown role, a system message
// other than the first, roles that do not alternate user/assistant starting with user, or a
// conversation that does not end with a user message.
absl::StatusOr<std::vector<int32_t>> ApplyChatTemplate(const Tokenizer& tokenizer,
                                                       absl::Span<const ChatMessage> messages);

}  // namespace epx

#endif  // EPX_COORDINATOR_CHAT_TEMPLATE_H_
