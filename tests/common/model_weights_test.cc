#include "common/model_weights.h"

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/common/test_util.h"

namespace epx {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

ModelConfig TinyConfig() {
  auto c = ModelConfig::FromDir(test::TinyModelDir());
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

std::string TinyWeightsPath() { return test::TinyModelDir() + "/model.safetensors"; }

class ModelWeightsTest : public test::ScratchDirTest {
 protected:
  void WriteConfig(const ModelConfig& config) {
    std::ofstream out(Path("config.json"));
    out << config.ToJson();
    ASSERT_TRUE(out.good());
  }

  // A checkpoint directory with `config` and the fixture's weights (symlinked, not copied).
  void MakeDirWithFixtureWeights(const ModelConfig& config) {
    WriteConfig(config);
    std::filesystem::create_symlink(TinyWeightsPath(), Path("model.safetensors"));
  }

  // Rewrites the fixture's weights into dir()/model.safetensors through `edit`, which may drop
  // an entry (return false) or change its dtype, shape and bytes.
  void CopyFixtureWeights(
      const std::function<bool(SafetensorsWriteEntry&, const TensorView&)>& edit) {
    auto src = SafetensorsFile::Open(TinyWeightsPath());
    ASSERT_TRUE(src.ok()) << src.status();
    std::vector<SafetensorsWriteEntry> entries;
    for (const SafetensorsEntry& e : (*src)->entries()) {
      auto view = (*src)->Get(e.name);
      ASSERT_TRUE(view.ok()) << view.status();
      SafetensorsWriteEntry w{e.name, e.dtype, e.shape, [v = *view](uint8_t* dst, size_t n) {
                                std::memcpy(dst, v.raw(), n);
                                return absl::OkStatus();
                              }};
      if (edit(w, *view)) entries.push_back(std::move(w));
    }
    ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), entries, (*src)->metadata()).ok());
  }

  // Loading dir() with `config` fails with `code`, naming every one of `mentions`.
  void ExpectLoadError(const ModelConfig& config, absl::StatusCode code,
                       const std::vector<std::string>& mentions) {
    auto w = ModelWeights::Load(dir(), config, WeightSelection::All(config));
    ASSERT_FALSE(w.ok());
    EXPECT_EQ(w.status().code(), code) << w.status();
    for (const std::string& m : mentions)
      EXPECT_THAT(std::string(w.status().message()), HasSubstr(m));
  }
};

TEST_F(ModelWeightsTest, LoadsAllOfTinyMixtral) {
  const ModelConfig config = TinyConfig();
  auto w = ModelWeights::Load(test::TinyModelDir(), config, WeightSelection::All(config));
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelWeights& m = **w;
  EXPECT_EQ(m.config().Hash(), config.Hash());
  EXPECT_TRUE(m.selection().non_expert);
  EXPECT_EQ(m.selection().experts.size(), 8u);

  EXPECT_EQ(m.embed_tokens().dtype(), DType::kBF16);
  EXPECT_EQ(m.embed_tokens().shape(), Shape({512, 128}));
  EXPECT_EQ(m.lm_head().shape(), Shape({512, 128}));
  EXPECT_NE(m.lm_head().raw(), m.embed_tokens().raw());  // not tied in this checkpoint
  EXPECT_EQ(m.final_norm().dtype(), DType::kF32);
  EXPECT_EQ(m.final_norm().shape(), Shape({128}));

  for (int i = 0; i < 3; ++i) {
    SCOPED_TRACE(i);
    const LayerWeights& layer = m.layer(i);
    EXPECT_EQ(layer.input_norm.dtype(), DType::kF32);
    EXPECT_EQ(layer.input_norm.shape(), Shape({128}));
    EXPECT_EQ(layer.post_attention_norm.shape(), Shape({128}));
    EXPECT_EQ(layer.q_proj.shape(), Shape({128, 128}));
    EXPECT_EQ(layer.k_proj.shape(), Shape({64, 128}));
    EXPECT_EQ(layer.v_proj.shape(), Shape({64, 128}));
    EXPECT_EQ(layer.o_proj.shape(), Shape({128, 128}));
    EXPECT_EQ(layer.gate.shape(), Shape({8, 128}));
    EXPECT_EQ(layer.q_proj.dtype(), DType::kBF16);
    ASSERT_EQ(layer.experts.size(), 8u);
    for (const ExpertWeights& e : layer.experts) {
      EXPECT_TRUE(e.loaded());
      EXPECT_EQ(e.w1.shape(), Shape({448, 128}));
      EXPECT_EQ(e.w2.shape(), Shape({128, 448}));
      EXPECT_EQ(e.w3.shape(), Shape({448, 128}));
      EXPECT_EQ(e.w2.dtype(), DType::kBF16);
    }
  }

  // Norms are the checkpoint's bf16 values widened exactly to fp32.
  auto file = SafetensorsFile::Open(TinyWeightsPath());
  ASSERT_TRUE(file.ok()) << file.status();
  auto raw_norm = (*file)->Get("model.layers.1.post_attention_layernorm.weight");
  ASSERT_TRUE(raw_norm.ok());
  for (int64_t k = 0; k < 128; ++k) {
    ASSERT_EQ(m.layer(1).post_attention_norm.data<float>()[k],
              Bf16ToF32(raw_norm->data<const uint16_t>()[k]))
        << k;
  }
  // Views point at the checkpoint's bytes.
  auto raw_w2 = (*file)->Get("model.layers.2.block_sparse_moe.experts.5.w2.weight");
  ASSERT_TRUE(raw_w2.ok());
  EXPECT_EQ(std::memcmp(m.layer(2).experts[5].w2.raw(), raw_w2->raw(), raw_w2->nbytes()), 0);

  // Loading everything reads every tensor once.
  uint64_t total = 0;
  for (const SafetensorsEntry& e : (*file)->entries()) total += e.end - e.begin;
  EXPECT_EQ(m.bytes_mapped(), total);
}

TEST_F(ModelWeightsTest, KvHeadsDisagreeingWithTensorsNamesFileTensorAndShapes) {
  ModelConfig config = TinyConfig();
  config.num_key_value_heads = 4;  // the checkpoint has 2: k_proj is [64, 128]
  MakeDirWithFixtureWeights(config);
  auto parsed = ModelConfig::FromDir(dir());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->num_key_value_heads, 4);
  ExpectLoadError(*parsed, absl::StatusCode::kInvalidArgument,
                  {Path("model.safetensors"), "'model.layers.0.self_attn.k_proj.weight'",
                   "[64, 128]", "[128, 128]", "num_key_value_heads"});
}

TEST_F(ModelWeightsTest, IntermediateSizeDisagreeingWithTensorsNamesFileTensorAndShapes) {
  ModelConfig config = TinyConfig();
  config.intermediate_size = 512;  // the checkpoint's experts have 448
  MakeDirWithFixtureWeights(config);
  auto parsed = ModelConfig::FromDir(dir());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ExpectLoadError(
      *parsed, absl::StatusCode::kInvalidArgument,
      {Path("model.safetensors"), "'model.layers.0.block_sparse_moe.experts.0.w1.weight'",
       "[448, 128]", "[512, 128]", "intermediate_size"});
}

TEST_F(ModelWeightsTest, MissingTensorIsNamed) {
  const std::string missing = "model.layers.1.self_attn.v_proj.weight";
  CopyFixtureWeights(
      [&](SafetensorsWriteEntry& w, const TensorView&) { return w.name != missing; });
  WriteConfig(TinyConfig());
  ExpectLoadError(TinyConfig(), absl::StatusCode::kNotFound, {dir(), missing});
}

TEST_F(ModelWeightsTest, IntegerWeightIsADtypeError) {
  const std::string name = "model.layers.0.block_sparse_moe.gate.weight";
  CopyFixtureWeights([&](SafetensorsWriteEntry& w, const TensorView&) {
    if (w.name == name) {
      w.dtype = DType::kI32;  // same shape [8, 128], 4-byte elements
      w.fill = [](uint8_t* dst, size_t n) {
        std::memset(dst, 0, n);
        return absl::OkStatus();
      };
    }
    return true;
  });
  WriteConfig(TinyConfig());
  ExpectLoadError(TinyConfig(), absl::StatusCode::kInvalidArgument,
                  {Path("model.safetensors"), name, "I32"});
}

TEST_F(ModelWeightsTest, TiedEmbeddingsWithoutLmHeadReuseTheEmbedding) {
  CopyFixtureWeights(
      [](SafetensorsWriteEntry& w, const TensorView&) { return w.name != "lm_head.weight"; });
  ModelConfig config = TinyConfig();
  config.tie_word_embeddings = true;
  WriteConfig(config);
  auto w = ModelWeights::Load(dir(), config, WeightSelection::Coordinator());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->lm_head().raw(), (*w)->embed_tokens().raw());

  // Untied, the missing lm_head is an error.
  config.tie_word_embeddings = false;
  auto untied = ModelWeights::Load(dir(), config, WeightSelection::Coordinator());
  EXPECT_EQ(untied.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(untied.status().message()), HasSubstr("lm_head.weight"));
}

TEST_F(ModelWeightsTest, TiedEmbeddingsIgnoreAStoredLmHeadAsHuggingFaceDoes) {
  ModelConfig config = TinyConfig();
  config.tie_word_embeddings = true;
  auto w = ModelWeights::Load(test::TinyModelDir(), config, WeightSelection::Coordinator());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->lm_head().raw(), (*w)->embed_tokens().raw());
}

// --- Role-based loading. ---

TEST_F(ModelWeightsTest, CoordinatorMapsOnlyNonExpertWeights) {
  const ModelConfig config = TinyConfig();
  auto all = ModelWeights::Load(test::TinyModelDir(), config, WeightSelection::All(config));
  auto coord = ModelWeights::Load(test::TinyModelDir(), config, WeightSelection::Coordinator());
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_TRUE(coord.ok()) << coord.status();
  EXPECT_LT((*coord)->bytes_mapped(), (*all)->bytes_mapped());
  const uint64_t expert_bytes = 3ull * config.hidden_size * config.intermediate_size * 2 *
                                config.num_local_experts * config.num_hidden_layers;
  EXPECT_EQ((*coord)->bytes_mapped(), (*all)->bytes_mapped() - expert_bytes);

  EXPECT_FALSE((*coord)->embed_tokens().empty());
  EXPECT_FALSE((*coord)->layer(0).q_proj.empty());
  for (int i = 0; i < config.num_hidden_layers; ++i) {
    for (const ExpertWeights& e : (*coord)->layer(i).experts) EXPECT_FALSE(e.loaded());
  }
}

TEST_F(ModelWeightsTest, ExpertSelectionMapsExactlyThoseExperts) {
  const ModelConfig config = TinyConfig();
  const uint64_t one_expert_bytes =
      3ull * config.hidden_size * config.intermediate_size * 2 * config.num_hidden_layers;
  ASSERT_EQ(one_expert_bytes, 3ull * 128 * 448 * 2 * 3);

  auto w = ModelWeights::Load(test::TinyModelDir(), config, WeightSelection::Experts({0}));
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->bytes_mapped(), one_expert_bytes);
  EXPECT_TRUE((*w)->embed_tokens().empty());
  EXPECT_TRUE((*w)->lm_head().empty());
  for (int i = 0; i < config.num_hidden_layers; ++i) {
    SCOPED_TRACE(i);
    const LayerWeights& layer = (*w)->layer(i);
    EXPECT_TRUE(layer.q_proj.empty());
    EXPECT_TRUE(layer.gate.empty());
    ASSERT_EQ(layer.experts.size(), 8u);
    EXPECT_TRUE(layer.experts[0].loaded());
    for (int e = 1; e < 8; ++e) EXPECT_FALSE(layer.experts[e].loaded()) << e;
  }

  auto two = ModelWeights::Load(test::TinyModelDir(), config, WeightSelection::Experts({3, 7}));
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ((*two)->bytes_mapped(), 2 * one_expert_bytes);
  EXPECT_TRUE((*two)->layer(2).experts[7].loaded());
  EXPECT_FALSE((*two)->layer(2).experts[0].loaded());
}

TEST_F(ModelWeightsTest, NonexistentExpertIsRejected) {
  const ModelConfig config = TinyConfig();
  for (int bad : {-1, 8}) {
    auto w = ModelWeights::Load(test::TinyModelDir(), config, WeightSelection::Experts({0, bad}));
    EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(w.status().message()),
                AllOf(HasSubstr(absl::StrCat("expert ", bad)), HasSubstr("8 experts")));
  }
}

TEST_F(ModelWeightsTest, DirectoryWithoutWeightsIsNotFound) {
  WriteConfig(TinyConfig());
  auto w = ModelWeights::Load(dir(), TinyConfig(), WeightSelection::Coordinator());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(w.status().message()), HasSubstr(dir()));
}

}  // namespace
}  // namespace epx
