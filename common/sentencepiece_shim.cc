#include "common/sentencepiece_shim.h"

#include "sentencepiece_processor.h"

namespace epx::internal {

struct SentencePieceShim::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

namespace {
std::string Message(const sentencepiece::util::Status& s) {
  return s.ok() ? std::string() : s.ToString();
}
}  // namespace

SentencePieceShim::SentencePieceShim() : impl_(std::make_unique<Impl>()) {}
SentencePieceShim::~SentencePieceShim() = default;

std::string SentencePieceShim::Load(const std::string& path) {
  return Message(impl_->sp.Load(path));
}
std::string SentencePieceShim::LoadFromSerialized(const std::string& proto) {
  return Message(impl_->sp.LoadFromSerializedProto(proto));
}
std::string SentencePieceShim::Encode(const std::string& text, std::vector<int>* ids) const {
  return Message(impl_->sp.Encode(text, ids));
}
std::string SentencePieceShim::EncodePieces(const std::string& text,
                                            std::vector<std::string>* pieces) const {
  return Message(impl_->sp.Encode(text, pieces));
}
std::string SentencePieceShim::Decode(const std::vector<int>& ids, std::string* text) const {
  return Message(impl_->sp.Decode(ids, text));
}
int SentencePieceShim::PieceSize() const { return impl_->sp.GetPieceSize(); }
int SentencePieceShim::BosId() const { return impl_->sp.bos_id(); }
int SentencePieceShim::EosId() const { return impl_->sp.eos_id(); }

}  // namespace epx::internal
