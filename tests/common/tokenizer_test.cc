// The SentencePiece tokenizer against tests/data/tiny-mixtral/tokenizer_cases.json (ids and
// pieces exact, decode round trip), streaming decode, and the built-in padded tokenizer.
#include "common/tokenizer.h"

#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace epx {
namespace {

const std::string kDir = std::string(EPX_TEST_DATA_DIR) + "/tiny-mixtral";

std::unique_ptr<Tokenizer> Load() {
  auto t = Tokenizer::FromFile(kDir + "/tokenizer.model");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

// The model's normaliser (nmt_nfkc, remove_extra_whitespaces) turns tabs and newlines into
// spaces, collapses runs of spaces and strips the ends; decoding gives that normalised text.
std::string Normalised(const std::string& text) {
  std::string out;
  for (char ch : text) {
    const bool space = ch == ' ' || ch == '\t' || ch == '\n';
    if (space) {
      if (!out.empty() && out.back() != ' ') out.push_back(' ');
    } else {
      out.push_back(ch);
    }
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

nlohmann::json Cases() {
  std::ifstream in(kDir + "/tokenizer_cases.json");
  return nlohmann::json::parse(in)["cases"];
}

TEST(TokenizerTest, CasesEncodeExactlyAndDecodeBack) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 512);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  const nlohmann::json cases = Cases();
  ASSERT_GE(cases.size(), 5u);
  for (const auto& c : cases) {
    const std::string text = c["text"];
    SCOPED_TRACE(text);
    auto ids = tok->Encode(text, /*add_bos=*/false);
    ASSERT_TRUE(ids.ok());
    EXPECT_EQ(*ids, c["ids"].get<std::vector<int32_t>>());
    auto pieces = tok->EncodeAsPieces(text);
    ASSERT_TRUE(pieces.ok());
    EXPECT_EQ(*pieces, c["pieces"].get<std::vector<std::string>>());
    // Round trip: decoding gives the (normalised) text, which encodes to the same ids.
    auto decoded = tok->Decode(*ids);
    ASSERT_TRUE(decoded.ok());
    EXPECT_EQ(*decoded, Normalised(text));
    EXPECT_EQ(*tok->Encode(*decoded, false), *ids);
    auto with_bos = tok->Encode(text, /*add_bos=*/true);
    ASSERT_TRUE(with_bos.ok());
    ASSERT_EQ(with_bos->size(), ids->size() + 1);
    EXPECT_EQ((*with_bos)[0], 1);
  }
}

TEST(TokenizerTest, DecodeRejectsIdsOutsideTheVocabulary) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  auto s = tok->Decode(std::vector<int32_t>{5, 512});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("512"), std::string::npos);
  EXPECT_FALSE(tok->Decode(std::vector<int32_t>{-1}).ok());
}

TEST(TokenizerTest, MissingFileIsAnError) {
  auto t = Tokenizer::FromFile(kDir + "/no-such-tokenizer.model");
  EXPECT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("no-such-tokenizer.model"), std::string::npos);
}

// Pushing ids one at a time yields exactly the text of decoding them together after the
// context, including multi-byte characters spelled by byte-fallback pieces.
TEST(StreamDecoderTest, IncrementsConcatenateToTheFullText) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  const std::vector<int32_t> context = *tok->Encode("Hello", true);
  for (const auto& c : Cases()) {
    const std::string text = c["text"];
    if (text.empty()) continue;
    SCOPED_TRACE(text);
    const std::vector<int32_t> ids = *tok->Encode(" " + text, false);
    StreamDecoder stream(tok.get(), context);
    std::string streamed;
    for (int32_t id : ids) {
      auto piece = stream.Push(id);
      ASSERT_TRUE(piece.ok());
      // Never a partial UTF-8 sequence.
      EXPECT_EQ(piece->find("\xEF\xBF\xBD"), std::string::npos);
      streamed += *piece;
    }
    std::vector<int32_t> all = context;
    all.insert(all.end(), ids.begin(), ids.end());
    EXPECT_EQ(*tok->Decode(context) + streamed, *tok->Decode(all));
  }
}

// Whether `text` is well-formed UTF-8 (shortest forms, no surrogates, at most U+10FFFF).
bool IsValidUtf8(const std::string& text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto byte = [&](size_t k) { return static_cast<unsigned char>(text[k]); };
    const unsigned char lead = byte(i);
    size_t n = lead < 0x80           ? 1
               : (lead >> 5) == 0x6  ? 2
               : (lead >> 4) == 0xE  ? 3
               : (lead >> 3) == 0x1E ? 4
                                     : 0;
    if (n == 0 || i + n > text.size()) return false;
    uint32_t cp = n == 1 ? lead : lead & (0x7F >> n);
    for (size_t k = 1; k < n; ++k) {
      if ((byte(i + k) & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (byte(i + k) & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n;
  }
  return true;
}

// The byte-fallback piece <0xNN>: this model numbers them 3 + NN.
int32_t BytePiece(int value) { return 3 + value; }

// A prompt that ends inside a character (its lead byte) completed by the first generated id:
// the increment is the character, never the lead's continuation bytes alone (which gRPC's
// proto3 strings and JSON would refuse).
TEST(StreamDecoderTest, APromptEndingInsideACharacterStillGivesValidUtf8) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  const std::vector<int32_t> context = {tok->bos_id(), BytePiece(0xC4)};
  StreamDecoder stream(tok.get(), context);
  auto piece = stream.Push(BytePiece(0x89));
  ASSERT_TRUE(piece.ok());
  EXPECT_EQ(*piece, "\xC4\x89");  // U+0109
}

// Random ids after random contexts: every increment, and the flushed tail, is valid UTF-8.
TEST(StreamDecoderTest, EveryIncrementOfRandomIdsIsValidUtf8) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  uint64_t state = 1;
  const auto next_id = [&] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<int32_t>(3 + (state >> 33) % (tok->vocab_size() - 3));
  };
  for (int trial = 0; trial < 2000; ++trial) {
    const std::vector<int32_t> context = {tok->bos_id(), next_id(), next_id()};
    StreamDecoder stream(tok.get(), context);
    for (int i = 0; i < 8; ++i) {
      auto piece = stream.Push(next_id());
      ASSERT_TRUE(piece.ok());
      ASSERT_TRUE(IsValidUtf8(*piece)) << "trial " << trial << " id " << i;
    }
    auto tail = stream.Flush();
    ASSERT_TRUE(tail.ok());
    ASSERT_TRUE(IsValidUtf8(*tail)) << "trial " << trial;
  }
}

TEST(BuiltinTokenizerTest, PaddedToTheModelVocabularyAndEncodesLikeTheFile) {
  auto proto = BuiltinTokenizerModel(32000);
  ASSERT_TRUE(proto.ok());
  auto padded = Tokenizer::FromSerialized(*proto);
  ASSERT_TRUE(padded.ok()) << padded.status();
  EXPECT_EQ((*padded)->vocab_size(), 32000);
  auto file = Load();
  ASSERT_NE(file, nullptr);
  for (const auto& c : Cases()) {
    const std::string text = c["text"];
    EXPECT_EQ(*(*padded)->Encode(text, false), *file->Encode(text, false));
  }
  // The padding pieces are unused: they decode to nothing.
  EXPECT_EQ(*(*padded)->Decode(std::vector<int32_t>{31999}), "");
  EXPECT_FALSE(BuiltinTokenizerModel(100).ok());
}

}  // namespace
}  // namespace epx
