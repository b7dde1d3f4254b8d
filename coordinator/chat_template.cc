#include "coordinator/chat_template.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace epx {

absl::StatusOr<std::vector<int32_t>> ApplyChatTemplate(const Tokenizer& tokenizer,
                                                       absl::Span<const ChatMessage> messages) {
  if (messages.empty()) return absl::InvalidArgumentError("chat has no messages");
  std::string system;
  size_t first = 0;
  if (messages[0].role == "system") {
    system = messages[0].content;
    first = 1;
  }
  if (first == messages.size())
    return absl::InvalidArgumentError("chat has a system message but no user message");
  std::vector<int32_t> ids = {tokenizer.bos_id()};
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const bool user_turn = (i - first) % 2 == 0;
    if (m.role != "user" && m.role != "assistant")
      return absl::InvalidArgumentError(absl::StrCat(
          "chat message ", i, " has role \"", m.role, "\"",
          m.role == "system" ? "; a system message must come first"
                             : "; roles are system, user and assistant"));
    if ((m.role == "user") != user_turn)
      return absl::InvalidArgumentError(absl::StrCat(
          "chat message ", i, " is from the ", m.role, " but the ",
          user_turn ? "user" : "assistant", "'s turn was expected (roles alternate, user first)"));
    if (m.role == "user") {
      const std::string content =
          i == first && !system.empty() ? absl::StrCat(system, "\n\n", m.content) : m.content;
      EPX_ASSIGN_OR_RETURN(std::vector<int32_t> part,
                           tokenizer.Encode(absl::StrCat("[INST] ", content, " [/INST]"), false));
      ids.insert(ids.end(), part.begin(), part.end());
    } else {
      EPX_ASSIGN_OR_RETURN(std::vector<int32_t> part, tokenizer.Encode(m.content, false));
      ids.insert(ids.end(), part.begin(), part.end());
      ids.push_back(tokenizer.eos_id());
    }
  }
  if (messages.back().role != "user")
    return absl::InvalidArgumentError("chat must end with a user message");
  return ids;
}

}  // namespace epx
