// Bytes of the built-in SentencePiece model (generated at build time from
// tests/data/tiny-mixtral/tokenizer.model by cmake/EmbedFile.cmake).
#ifndef EPX_COMMON_BUILTIN_TOKENIZER_H_
#define EPX_COMMON_BUILTIN_TOKENIZER_H_

#include <cstddef>
#include <cstdint>

namespace epx {
extern const uint8_t kBuiltinTokenizerModel[];
extern const size_t kBuiltinTokenizerModelSize;
inline constexpr int64_t kBuiltinTokenizerPieces = 512;
}  // namespace epx

#endif  // EPX_COMMON_BUILTIN_TOKENIZER_H_
