// A std-only facade over libsentencepiece, loaded at run time from its own module
// (libepx_sentencepiece.so) in an isolated symbol scope.
//
// Why a module: Debian's libsentencepiece exports its own copy of protobuf 3.14, which clashes
// with the system protobuf that gRPC uses; linked into one process, whichever comes first in
// the load order breaks the other. The module is dlopen()ed with RTLD_LOCAL | RTLD_DEEPBIND, so
// sentencepiece binds to its own protobuf and nothing else sees it. (Its header also declares
// its own `absl::string_view`, another reason only the module includes it.) Internal to
// common/; Tokenizer is the public API.
#ifndef EPX_COMMON_SENTENCEPIECE_SHIM_H_
#define EPX_COMMON_SENTENCEPIECE_SHIM_H_

#include <memory>
#include <string>
#include <vector>

namespace epx::internal {

class SentencePieceShim {
 public:
  virtual ~SentencePieceShim() = default;
  // Each returns "" on success, else the library's error message.
  virtual std::string Load(const std::string& path) = 0;
  virtual std::string LoadFromSerialized(const std::string& proto) = 0;
  virtual std::string Encode(const std::string& text, std::vector<int>* ids) const = 0;
  virtual std::string EncodePieces(const std::string& text,
                                   std::vector<std::string>* pieces) const = 0;
  virtual std::string Decode(const std::vector<int>& ids, std::string* text) const = 0;
  virtual int PieceSize() const = 0;
  virtual int BosId() const = 0;
  virtual int EosId() const = 0;
};

// Loads the module (once per process) and makes a processor. The module is looked for at
// $EPX_SENTENCEPIECE_MODULE, next to the executable, in ../lib from it, and where the build
// put it. On failure returns null and sets `error` to what was tried.
std::unique_ptr<SentencePieceShim> NewSentencePieceShim(std::string* error);

}  // namespace epx::internal

#endif  // EPX_COMMON_SENTENCEPIECE_SHIM_H_
