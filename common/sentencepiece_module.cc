// The SentencePieceShim over libsentencepiece, built as libepx_sentencepiece.so and loaded by
// sentencepiece_loader.cc (see sentencepiece_shim.h for why).
#include "common/sentencepiece_shim.h"
#include "sentencepiece_processor.h"

namespace epx::internal {
namespace {

std::string Message(const sentencepiece::util::Status& s) {
  return s.ok() ? std::string() : s.ToString();
}

class SentencePieceModule final : public SentencePieceShim {
 public:
  std::string Load(const std::string& path) override { return Message(sp_.Load(path)); }
  std::string LoadFromSerialized(const std::string& proto) override {
    return Message(sp_.LoadFromSerializedProto(proto));
  }
  std::string Encode(const std::string& text, std::vector<int>* ids) const override {
    return Message(sp_.Encode(text, ids));
  }
  std::string EncodePieces(const std::string& text,
                           std::vector<std::string>* pieces) const override {
    return Message(sp_.Encode(text, pieces));
  }
  std::string Decode(const std::vector<int>& ids, std::string* text) const override {
    return Message(sp_.Decode(ids, text));
  }
  int PieceSize() const override { return sp_.GetPieceSize(); }
  int BosId() const override { return sp_.bos_id(); }
  int EosId() const override { return sp_.eos_id(); }

 private:
  sentencepiece::SentencePieceProcessor sp_;
};

}  // namespace
}  // namespace epx::internal

extern "C" __attribute__((visibility("default"))) epx::internal::SentencePieceShim*
EpxNewSentencePieceShim() {
  return new epx::internal::SentencePieceModule();
}
