// A std-only facade over libsentencepiece. Its header declares its own `absl::string_view`,
// which clashes with abseil's, so only sentencepiece_shim.cc includes it and this interface
// carries no abseil types. Internal to common/; Tokenizer is the public API.
#ifndef EPX_COMMON_SENTENCEPIECE_SHIM_H_
#define EPX_COMMON_SENTENCEPIECE_SHIM_H_

#include <memory>
#include <string>
#include <vector>

namespace epx::internal {

class SentencePieceShim {
 public:
  SentencePieceShim();
  ~SentencePieceShim();
  // Each returns "" on success, else the library's error message.
  std::string Load(const std::string& path);
  std::string LoadFromSerialized(const std::string& proto);
  std::string Encode(const std::string& text, std::vector<int>* ids) const;
  std::string EncodePieces(const std::string& text, std::vector<std::string>* pieces) const;
  std::string Decode(const std::vector<int>& ids, std::string* text) const;
  int PieceSize() const;
  int BosId() const;
  int EosId() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace epx::internal

#endif  // EPX_COMMON_SENTENCEPIECE_SHIM_H_
