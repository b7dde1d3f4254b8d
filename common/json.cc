#include "common/json.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace epx {

absl::StatusOr<nlohmann::json> ParseJson(const char* begin, const char* end,
                                         const std::string& source) {
  bool too_deep = false;
  // Values deeper than the limit are discarded as they are parsed, so the result stays shallow.
  nlohmann::json::parser_callback_t limit = [&too_deep](int depth, nlohmann::json::parse_event_t,
                                                        nlohmann::json&) {
    if (depth > kMaxJsonDepth) too_deep = true;
    return depth <= kMaxJsonDepth;
  };
  nlohmann::json j = nlohmann::json::parse(begin, end, limit, /*allow_exceptions=*/false);
  if (too_deep)
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": JSON nested deeper than ", kMaxJsonDepth, " levels"));
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(source, ": invalid JSON"));
  return j;
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<nlohmann::json> ParseJsonFile(const std::string& path) {
  EPX_ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
  return ParseJson(text, path);
}

}  // namespace epx
