// JSON parsing for untrusted files (config.json, safetensors headers, shard indexes, placement
// files) through nlohmann-json, with exceptions off and a nesting limit: values nested deeper
// than kMaxJsonDepth are refused, so nothing downstream (including dump() in error messages)
// recurses deeply. Thread-safe (pure).
#ifndef EPX_COMMON_JSON_H_
#define EPX_COMMON_JSON_H_

#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace epx {

inline constexpr int kMaxJsonDepth = 64;

// InvalidArgument naming `source` for malformed or too deeply nested text.
absl::StatusOr<nlohmann::json> ParseJson(const char* begin, const char* end,
                                         const std::string& source);
inline absl::StatusOr<nlohmann::json> ParseJson(const std::string& text,
                                                const std::string& source) {
  return ParseJson(text.data(), text.data() + text.size(), source);
}
// The whole file as a string; NotFound naming `path` if it cannot be opened.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);
// Reads and parses a file; NotFound if it cannot be opened.
absl::StatusOr<nlohmann::json> ParseJsonFile(const std::string& path);

}  // namespace epx

#endif  // EPX_COMMON_JSON_H_
