// Text <-> token ids through SentencePiece (libsentencepiece), reading a `tokenizer.model`.
// Encode/Decode are const and thread-safe. `StreamDecoder` turns a growing id sequence into
// printable text increments (holding back incomplete UTF-8 from byte-fallback pieces); it is
// single-threaded.
#ifndef EPX_COMMON_TOKENIZER_H_
#define EPX_COMMON_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace epx::internal {
class SentencePieceShim;
}

namespace epx {

class Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromSerialized(const std::string& proto);
  ~Tokenizer();

  // Ids as SentencePiece gives them; with `add_bos`, bos_id() first.
  absl::StatusOr<std::vector<int32_t>> Encode(const std::string& text, bool add_bos) const;
  absl::StatusOr<std::vector<std::string>> EncodeAsPieces(const std::string& text) const;
  // InvalidArgument naming the first id outside [0, vocab_size()).
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const;
  int32_t vocab_size() const;
  int32_t bos_id() const;
  int32_t eos_id() const;

 private:
  Tokenizer();
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Create();
  std::unique_ptr<internal::SentencePieceShim> sp_;
};

// A built-in SentencePiece BPE model (512 pieces, byte fallback; <unk>=0, <s>=1, </s>=2),
// padded with control pieces `<extra_N>` (never produced by Encode, decoded as nothing) to
// `vocab_size` pieces. For synthetic checkpoints.
// REQUIRES: vocab_size >= 512.
absl::StatusOr<std::string> BuiltinTokenizerModel(int64_t vocab_size);

class StreamDecoder {
 public:
  // `context` (e.g. the prompt) conditions spacing of the first new piece; it is never emitted.
  StreamDecoder(const Tokenizer* tokenizer, absl::Span<const int32_t> context);
  // Appends one id; returns the text that became complete (maybe empty).
  absl::StatusOr<std::string> Push(int32_t id);
  // At the end of generation: whatever Push() held back (an incomplete byte sequence decodes
  // to U+FFFD here).
  absl::StatusOr<std::string> Flush();

 private:
  // Text of the ids after read_offset_, decoded in the context of those from prefix_offset_.
  absl::StatusOr<std::string> Pending() const;

  const Tokenizer* tokenizer_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;
  size_t read_offset_ = 0;
};

}  // namespace epx

#endif  // EPX_COMMON_TOKENIZER_H_
