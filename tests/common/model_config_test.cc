#include "common/model_config.h"

#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/common/test_util.h"

namespace epx {
namespace {

using nlohmann::json;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kSource[] = "/models/m/config.json";

// The required keys only, with the fixture's values.
json Minimal() {
  return json{{"vocab_size", 512},       {"hidden_size", 128},       {"intermediate_size", 448},
              {"num_hidden_layers", 3},  {"num_attention_heads", 4}, {"num_local_experts", 8},
              {"num_experts_per_tok", 2}};
}

absl::StatusOr<ModelConfig> Parse(const json& j) {
  return ModelConfig::FromJson(j.dump(), kSource);
}

// Parsing `j` fails with InvalidArgument naming the source and every one of `mentions`.
void ExpectInvalid(const json& j, const std::vector<std::string>& mentions) {
  auto c = Parse(j);
  ASSERT_FALSE(c.ok()) << j.dump();
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  const std::string message(c.status().message());
  EXPECT_THAT(message, HasSubstr(kSource));
  for (const std::string& m : mentions) EXPECT_THAT(message, HasSubstr(m));
}

TEST(ModelConfigTest, ParsesTinyMixtralFixture) {
  auto c = ModelConfig::FromDir(test::TinyModelDir());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "mixtral");
  EXPECT_EQ(c->vocab_size, 512);
  EXPECT_EQ(c->hidden_size, 128);
  EXPECT_EQ(c->intermediate_size, 448);
  EXPECT_EQ(c->num_hidden_layers, 3);
  EXPECT_EQ(c->num_attention_heads, 4);
  EXPECT_EQ(c->num_key_value_heads, 2);
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_EQ(c->num_local_experts, 8);
  EXPECT_EQ(c->num_experts_per_tok, 2);
  EXPECT_EQ(c->rope_theta, 1e6);
  EXPECT_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_FALSE(c->sliding_window.has_value());
  EXPECT_EQ(c->max_position_embeddings, 4096);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2));
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->torch_dtype, DType::kBF16);
  EXPECT_EQ(c->q_size(), 128);
  EXPECT_EQ(c->kv_size(), 64);
  EXPECT_EQ(c->gqa_group(), 2);
}

TEST(ModelConfigTest, FromFileOfMissingFileIsNotFoundNamingThePath) {
  const std::string path = test::TinyModelDir() + "/no-such-config.json";
  auto c = ModelConfig::FromFile(path);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(path));
}

using ModelConfigFileTest = test::ScratchDirTest;

TEST_F(ModelConfigFileTest, ErrorsInAFileNameThatFile) {
  json j = Minimal();
  j.erase("vocab_size");
  {
    std::ofstream out(Path("config.json"));
    out << j.dump(2);
  }
  auto c = ModelConfig::FromDir(dir());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()),
              AllOf(HasSubstr(Path("config.json")), HasSubstr("\"vocab_size\"")));
}

TEST_F(ModelConfigFileTest, GenerationConfigOverridesTokenIds) {
  auto c = ModelConfig::FromJson(Minimal().dump());
  ASSERT_TRUE(c.ok()) << c.status();
  // Absent file: nothing changes.
  ASSERT_TRUE(c->ApplyGenerationConfig(Path("generation_config.json")).ok());
  EXPECT_EQ(c->eos_token_ids, std::vector<int32_t>{2});
  {
    std::ofstream out(Path("generation_config.json"));
    out << R"({"bos_token_id": 1, "eos_token_id": [2, 7], "temperature": 0.6})";
  }
  ASSERT_TRUE(c->ApplyGenerationConfig(Path("generation_config.json")).ok());
  EXPECT_EQ(c->eos_token_ids, (std::vector<int32_t>{2, 7}));
  {
    std::ofstream out(Path("generation_config.json"));
    out << R"({"eos_token_id": 100000})";
  }
  absl::Status s = c->ApplyGenerationConfig(Path("generation_config.json"));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("generation_config.json"));
  EXPECT_EQ(c->eos_token_ids, (std::vector<int32_t>{2, 7}));  // unchanged on error
  {
    std::ofstream out(Path("generation_config.json"));
    out << "{not json";
  }
  EXPECT_FALSE(c->ApplyGenerationConfig(Path("generation_config.json")).ok());
}

TEST(ModelConfigTest, HugeOrNonIntegralFloatsAreRejectedNotConverted) {
  // Found by tests/fuzz/model_config_fuzzer: the range is checked before any conversion.
  for (const char* text :
       {R"({"hidden_size": 1e30})", R"({"hidden_size": -5.12e130})", R"({"hidden_size": 128.5})"}) {
    json j = Minimal();
    j.merge_patch(json::parse(text));
    auto c = ModelConfig::FromJson(j.dump());
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << text;
  }
}

TEST(ModelConfigTest, SizesBeyondTheSupportedRangeAreRejected) {
  // Each would overflow a size computation or allocate absurdly before any tensor is checked.
  for (const char* text : {R"({"num_hidden_layers": 1000000000000})",
                           R"({"num_local_experts": 3000000000, "num_experts_per_tok": 2})",
                           R"({"num_attention_heads": 4096, "num_key_value_heads": 4096,
                               "head_dim": 65536})",
                           R"({"vocab_size": 100000000})"}) {
    json j = Minimal();
    j.merge_patch(json::parse(text));
    auto c = ModelConfig::FromJson(j.dump());
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(std::string(c.status().message()), HasSubstr("supported")) << text;
  }
}

TEST(ModelConfigTest, RopeScalingIsRejected) {
  json j = Minimal();
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}};
  auto c = ModelConfig::FromJson(j.dump());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("rope_scaling"));
  j["rope_scaling"] = nullptr;
  EXPECT_TRUE(ModelConfig::FromJson(j.dump()).ok());
}

TEST(ModelConfigTest, OptionalKeysTakeDefaults) {
  auto c = Parse(Minimal());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 4);  // = num_attention_heads
  EXPECT_EQ(c->head_dim, 32);            // = hidden_size / num_attention_heads
  EXPECT_EQ(c->gqa_group(), 1);
  EXPECT_EQ(c->rope_theta, 1e6);
  EXPECT_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_FALSE(c->sliding_window.has_value());
  EXPECT_EQ(c->max_position_embeddings, 131072);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2));
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->torch_dtype, DType::kBF16);
}

TEST(ModelConfigTest, NullOptionalKeysCountAsAbsent) {
  json j = Minimal();
  j["num_key_value_heads"] = nullptr;
  j["head_dim"] = nullptr;
  j["rope_theta"] = nullptr;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_EQ(c->rope_theta, 1e6);
}

TEST(ModelConfigTest, ExplicitHeadDimDifferentFromHiddenOverHeadsIsKept) {
  json j = Minimal();
  j["head_dim"] = 64;  // 128 / 4 would be 32
  j["num_key_value_heads"] = 1;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->q_size(), 256);
  EXPECT_EQ(c->kv_size(), 64);
  EXPECT_EQ(c->gqa_group(), 4);
}

TEST(ModelConfigTest, SlidingWindowNullAbsentOrInteger) {
  json j = Minimal();
  j["sliding_window"] = nullptr;
  auto null_window = Parse(j);
  ASSERT_TRUE(null_window.ok()) << null_window.status();
  EXPECT_FALSE(null_window->sliding_window.has_value());

  j["sliding_window"] = 4096;
  auto window = Parse(j);
  ASSERT_TRUE(window.ok()) << window.status();
  ASSERT_TRUE(window->sliding_window.has_value());
  EXPECT_EQ(*window->sliding_window, 4096);

  j["sliding_window"] = 0;
  ExpectInvalid(j, {"sliding_window"});
}

TEST(ModelConfigTest, EosTokenIdAsList) {
  json j = Minimal();
  j["eos_token_id"] = {2, 7, 511};
  j["bos_token_id"] = 0;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2, 7, 511));
  EXPECT_EQ(c->bos_token_id, 0);

  j["eos_token_id"] = {2, 512};
  ExpectInvalid(j, {"eos_token_id 512", "[0, 512)"});
  j["eos_token_id"] = {2, "3"};
  ExpectInvalid(j, {"eos_token_id"});
  j["eos_token_id"] = "2";
  ExpectInvalid(j, {"eos_token_id"});
}

TEST(ModelConfigTest, OtherOptionalFields) {
  json j = Minimal();
  j["rope_theta"] = 10000.0;
  j["rms_norm_eps"] = 1e-6;
  j["max_position_embeddings"] = 2048;
  j["tie_word_embeddings"] = true;
  j["torch_dtype"] = "float16";
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->torch_dtype, DType::kF16);

  j["torch_dtype"] = "float32";
  ASSERT_TRUE(Parse(j).ok());
  EXPECT_EQ(Parse(j)->torch_dtype, DType::kF32);
  j["torch_dtype"] = "int8";
  ExpectInvalid(j, {"torch_dtype", "int8"});
}

TEST(ModelConfigTest, IntegralFloatCountsAsInteger) {
  json j = Minimal();
  j["hidden_size"] = 128.0;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 128);
}

// --- Validation errors. ---

TEST(ModelConfigTest, MissingRequiredKeyNamesTheKey) {
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_local_experts", "num_experts_per_tok"}) {
    SCOPED_TRACE(key);
    json j = Minimal();
    j.erase(key);
    ExpectInvalid(j, {absl::StrCat("missing required key \"", key, "\"")});
  }
}

TEST(ModelConfigTest, HeadsNotAMultipleOfKvHeads) {
  json j = Minimal();
  j["num_key_value_heads"] = 3;
  ExpectInvalid(j, {"num_attention_heads (4) must be a multiple of num_key_value_heads (3)"});
}

TEST(ModelConfigTest, TopKAboveNumberOfExperts) {
  json j = Minimal();
  j["num_experts_per_tok"] = 9;
  ExpectInvalid(j, {"num_experts_per_tok (9) exceeds num_local_experts (8)"});
}

TEST(ModelConfigTest, NegativeOrZeroSizes) {
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "head_dim",
                          "num_local_experts", "num_experts_per_tok", "max_position_embeddings"}) {
    SCOPED_TRACE(key);
    json j = Minimal();
    j[key] = -8;
    ExpectInvalid(j, {absl::StrCat("\"", key, "\" must be positive, got -8")});
    j[key] = 0;
    ExpectInvalid(j, {absl::StrCat("\"", key, "\" must be positive, got 0")});
  }
}

TEST(ModelConfigTest, NonPositiveFloats) {
  json j = Minimal();
  j["rope_theta"] = 0.0;
  ExpectInvalid(j, {"rope_theta"});
  j = Minimal();
  j["rms_norm_eps"] = -1e-5;
  ExpectInvalid(j, {"rms_norm_eps"});
  j = Minimal();
  j["rms_norm_eps"] = "1e-5";
  ExpectInvalid(j, {"rms_norm_eps", "must be a number"});
}

TEST(ModelConfigTest, OddHeadDimIsRejectedForRope) {
  json j = Minimal();
  j["head_dim"] = 33;
  ExpectInvalid(j, {"head_dim (33) must be even"});
}

TEST(ModelConfigTest, WrongModelType) {
  json j = Minimal();
  j["model_type"] = "llama";
  ExpectInvalid(j, {"model_type \"llama\"", "mixtral"});
  j["model_type"] = 7;
  ExpectInvalid(j, {"model_type"});
}

TEST(ModelConfigTest, HiddenActOtherThanSilu) {
  json j = Minimal();
  j["hidden_act"] = "gelu";
  ExpectInvalid(j, {"hidden_act \"gelu\"", "silu"});
  j["hidden_act"] = "silu";
  EXPECT_TRUE(Parse(j).ok());
}

TEST(ModelConfigTest, NonIntegerValue) {
  json j = Minimal();
  j["hidden_size"] = 128.5;
  ExpectInvalid(j, {"\"hidden_size\" must be an integer, got 128.5"});
  j["hidden_size"] = "128";
  ExpectInvalid(j, {"\"hidden_size\" must be an integer, got \"128\""});
  j = Minimal();
  j["num_key_value_heads"] = true;
  ExpectInvalid(j, {"\"num_key_value_heads\" must be an integer"});
}

TEST(ModelConfigTest, BosOutsideVocabulary) {
  json j = Minimal();
  j["bos_token_id"] = 512;
  ExpectInvalid(j, {"bos_token_id 512"});
}

TEST(ModelConfigTest, TokenIdsBeyond32BitsAreRejectedNotWrapped) {
  // 2^32 + 1 would wrap to 1, a valid id.
  json j = Minimal();
  j["bos_token_id"] = 4294967297LL;
  ExpectInvalid(j, {"bos_token_id 4294967297"});
  j = Minimal();
  j["eos_token_id"] = 4294967298LL;
  ExpectInvalid(j, {"eos_token_id 4294967298"});
  j["eos_token_id"] = {2, 4294967298LL};
  ExpectInvalid(j, {"eos_token_id 4294967298"});
}

TEST(ModelConfigTest, TextThatIsNotAJsonObject) {
  auto c = ModelConfig::FromJson("[1, 2]", kSource);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), AllOf(HasSubstr(kSource), HasSubstr("JSON")));
  EXPECT_FALSE(ModelConfig::FromJson("{\"vocab_size\": ", kSource).ok());
}

// --- ToJson, Hash. ---

void ExpectSameConfig(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.num_local_experts, b.num_local_experts);
  EXPECT_EQ(a.num_experts_per_tok, b.num_experts_per_tok);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.sliding_window, b.sliding_window);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
  EXPECT_EQ(a.Hash(), b.Hash());
}

TEST(ModelConfigTest, ToJsonRoundTripsTheFixture) {
  auto c = ModelConfig::FromDir(test::TinyModelDir());
  ASSERT_TRUE(c.ok()) << c.status();
  auto again = ModelConfig::FromJson(c->ToJson(), "round-trip");
  ASSERT_TRUE(again.ok()) << again.status() << "\n" << c->ToJson();
  ExpectSameConfig(*c, *again);
}

TEST(ModelConfigTest, ToJsonRoundTripsNonDefaultFields) {
  json j = Minimal();
  j["num_key_value_heads"] = 1;
  j["head_dim"] = 48;
  j["rope_theta"] = 123456.789;
  j["rms_norm_eps"] = 3.3e-7;
  j["sliding_window"] = 1024;
  j["max_position_embeddings"] = 999;
  j["bos_token_id"] = 5;
  j["eos_token_id"] = {3, 4};
  j["tie_word_embeddings"] = true;
  j["torch_dtype"] = "float32";
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  auto again = ModelConfig::FromJson(c->ToJson(), "round-trip");
  ASSERT_TRUE(again.ok()) << again.status() << "\n" << c->ToJson();
  ExpectSameConfig(*c, *again);
}

TEST(ModelConfigTest, HashChangesWithEveryComputationField) {
  auto base = Parse(Minimal());
  ASSERT_TRUE(base.ok()) << base.status();
  const uint64_t h = base->Hash();
  EXPECT_EQ(Parse(Minimal())->Hash(), h);  // deterministic

  auto changed = [&](auto mutate) {
    ModelConfig c = *base;
    mutate(c);
    EXPECT_TRUE(c.Validate().ok()) << c.Validate();
    return c.Hash();
  };
  EXPECT_NE(changed([](ModelConfig& c) { c.vocab_size = 1024; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.hidden_size = 256; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.intermediate_size = 512; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.num_hidden_layers = 4; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.num_attention_heads = 8; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.num_key_value_heads = 2; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.head_dim = 64; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.num_local_experts = 16; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.num_experts_per_tok = 1; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.rope_theta = 1e4; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.rms_norm_eps = 1e-6; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.sliding_window = 4096; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.tie_word_embeddings = true; }), h);
  // Floats are hashed at full precision: a change in the 7th significant digit still counts.
  EXPECT_NE(changed([](ModelConfig& c) { c.rope_theta = 1000001.0; }), h);
  EXPECT_NE(changed([](ModelConfig& c) { c.rms_norm_eps = 1.0000001e-5; }), h);
}

}  // namespace
}  // namespace epx
