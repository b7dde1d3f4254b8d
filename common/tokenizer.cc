#include "common/tokenizer.h"

#include "absl/strings/str_cat.h"
#include "common/builtin_tokenizer.h"
#include "common/sentencepiece_shim.h"
#include "common/status.h"

namespace epx {
namespace {

absl::Status FromSp(const std::string& error, const std::string& what) {
  if (error.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(what, ": ", error));
}

// Protobuf wire encoding of a varint.
void PutVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

}  // namespace

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Create() {
  auto t = std::unique_ptr<Tokenizer>(new Tokenizer());
  std::string error;
  t->sp_ = internal::NewSentencePieceShim(&error);
  if (t->sp_ == nullptr) return absl::FailedPreconditionError(error);
  return t;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  EPX_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> t, Create());
  EPX_RETURN_IF_ERROR(FromSp(t->sp_->Load(path), absl::StrCat(path, ": cannot load tokenizer")));
  return t;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromSerialized(const std::string& proto) {
  EPX_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> t, Create());
  EPX_RETURN_IF_ERROR(
      FromSp(t->sp_->LoadFromSerialized(proto), "cannot load tokenizer from bytes"));
  return t;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(const std::string& text,
                                                       bool add_bos) const {
  std::vector<int> ids;
  EPX_RETURN_IF_ERROR(FromSp(sp_->Encode(text, &ids), "tokenizer encode"));
  std::vector<int32_t> out;
  out.reserve(ids.size() + 1);
  if (add_bos) out.push_back(bos_id());
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

absl::StatusOr<std::vector<std::string>> Tokenizer::EncodeAsPieces(const std::string& text) const {
  std::vector<std::string> pieces;
  EPX_RETURN_IF_ERROR(FromSp(sp_->EncodePieces(text, &pieces), "tokenizer encode"));
  return pieces;
}

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const int32_t> ids) const {
  const int32_t n = vocab_size();
  std::vector<int> v;
  v.reserve(ids.size());
  for (int32_t id : ids) {
    if (id < 0 || id >= n)
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " is outside the tokenizer vocabulary [0, ", n, ")"));
    v.push_back(id);
  }
  std::string text;
  EPX_RETURN_IF_ERROR(FromSp(sp_->Decode(v, &text), "tokenizer decode"));
  return text;
}

int32_t Tokenizer::vocab_size() const { return sp_->PieceSize(); }
int32_t Tokenizer::bos_id() const { return sp_->BosId(); }
int32_t Tokenizer::eos_id() const { return sp_->EosId(); }

absl::StatusOr<std::string> BuiltinTokenizerModel(int64_t vocab_size) {
  std::string proto(reinterpret_cast<const char*>(kBuiltinTokenizerModel),
                    kBuiltinTokenizerModelSize);
  if (vocab_size < kBuiltinTokenizerPieces)
    return absl::InvalidArgumentError(absl::StrCat("vocab_size ", vocab_size,
                                                   " is smaller than the ", kBuiltinTokenizerPieces,
                                                   " pieces of the built-in tokenizer"));
  // Appending `pieces` fields (ModelProto field 1) to the serialized message adds pieces at the
  // end: protobuf merges repeated fields by concatenation.
  for (int64_t i = kBuiltinTokenizerPieces; i < vocab_size; ++i) {
    std::string piece;
    const std::string text = absl::StrCat("<extra_", i, ">");
    piece.push_back(0x0a);  // SentencePiece.piece (1, bytes)
    PutVarint(text.size(), &piece);
    piece += text;
    piece.push_back(0x15);  // SentencePiece.score (2, float) = 0
    piece.append(4, '\0');
    piece.push_back(0x18);  // SentencePiece.type (3, enum) = CONTROL (3): never produced by
    piece.push_back(0x03);  // encoding, decoded as nothing
    proto.push_back(0x0a);  // ModelProto.pieces (1)
    PutVarint(piece.size(), &proto);
    proto += piece;
  }
  return proto;
}

StreamDecoder::StreamDecoder(const Tokenizer* tokenizer, absl::Span<const int32_t> context)
    : tokenizer_(tokenizer), ids_(context.begin(), context.end()) {
  // Keep a few context ids so that the first new piece decodes with its leading space.
  prefix_offset_ = ids_.size() > 4 ? ids_.size() - 4 : 0;
  read_offset_ = ids_.size();
}

absl::StatusOr<std::string> StreamDecoder::Pending() const {
  auto window = absl::MakeConstSpan(ids_);
  EPX_ASSIGN_OR_RETURN(std::string prefix, tokenizer_->Decode(window.subspan(
                                               prefix_offset_, read_offset_ - prefix_offset_)));
  EPX_ASSIGN_OR_RETURN(std::string full, tokenizer_->Decode(window.subspan(prefix_offset_)));
  // Usually `full` extends `prefix`. It does not when the new ids complete a byte sequence the
  // prefix ended with (a lone lead byte decodes to U+FFFD there, to a character here): the text
  // then starts where the two part, backed up to a character boundary, so that it is always
  // valid UTF-8 (SentencePiece's decode is).
  size_t common = 0;
  while (common < prefix.size() && common < full.size() && prefix[common] == full[common]) ++common;
  while (common > 0 && (static_cast<unsigned char>(full[common]) & 0xC0) == 0x80) --common;
  return full.substr(common);
}

absl::StatusOr<std::string> StreamDecoder::Push(int32_t id) {
  ids_.push_back(id);
  EPX_ASSIGN_OR_RETURN(std::string text, Pending());
  // U+FFFD at the end: a byte-fallback sequence is not complete yet.
  if (text.empty() || (text.size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0))
    return std::string();
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  return text;
}

absl::StatusOr<std::string> StreamDecoder::Flush() {
  EPX_ASSIGN_OR_RETURN(std::string text, Pending());
  prefix_offset_ = read_offset_ = ids_.size();
  return text;
}

}  // namespace epx
