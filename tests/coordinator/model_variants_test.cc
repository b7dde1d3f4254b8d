// The engine on checkpoints that differ from the golden one, against an independent float64
// reference: other head counts and GQA ratios, explicit head_dim, sliding window, other expert
// counts and top-k, fp16/fp32 weights, sharded files, odd sizes. Prefill then decode through the
// KV cache must reproduce the reference's full causal forward at every position.
#include <filesystem>
#include <sstream>

#include "cli/commands.h"
#include "common/model_weights.h"
#include "coordinator/engine.h"
#include "gtest/gtest.h"
#include "tests/coordinator/reference_model.h"
#include "tests/coordinator/test_util.h"

namespace epx {
namespace {

struct Variant {
  std::string name;
  MakeModelOptions options;
};

void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

std::vector<Variant> Variants() {
  auto base = [](const std::string& name) {
    Variant v;
    v.name = name;
    v.options.preset = "tiny";
    v.options.num_layers = 2;
    v.options.seed = std::hash<std::string>{}(name);
    return v;
  };
  std::vector<Variant> out;
  {
    Variant v = base("gqa8to1");  // 8 query heads share one KV head
    v.options.num_heads = 8, v.options.num_kv_heads = 1, v.options.head_dim = 16;
    out.push_back(v);
  }
  {
    Variant v = base("mha");  // no grouping
    v.options.num_heads = 4, v.options.num_kv_heads = 4;
    out.push_back(v);
  }
  {
    Variant v = base("explicit_head_dim");  // q size 6 * 40 = 240 != hidden 128
    v.options.num_heads = 6, v.options.num_kv_heads = 3, v.options.head_dim = 40;
    out.push_back(v);
  }
  {
    Variant v = base("sliding_window");  // window 5 < the 20-token sequence
    v.options.sliding_window = 5;
    out.push_back(v);
  }
  {
    Variant v = base("experts4_top1");
    v.options.num_experts = 4, v.options.num_experts_per_tok = 1;
    out.push_back(v);
  }
  {
    Variant v = base("experts16_top4_sharded");
    v.options.num_experts = 16, v.options.num_experts_per_tok = 4;
    v.options.intermediate_size = 96, v.options.shards = 3;
    out.push_back(v);
  }
  {
    Variant v = base("fp16_odd_sizes");  // sizes that are not multiples of the vector width
    v.options.dtype = DType::kF16;
    v.options.hidden_size = 72, v.options.num_heads = 3, v.options.num_kv_heads = 1;
    v.options.head_dim = 22, v.options.intermediate_size = 100;
    out.push_back(v);
  }
  {
    Variant v = base("fp32_sharded");
    v.options.dtype = DType::kF32, v.options.shards = 4;
    out.push_back(v);
  }
  return out;
}

class ModelVariantTest : public ::testing::TestWithParam<Variant> {};

TEST_P(ModelVariantTest, PrefillAndDecodeMatchReference) {
  const Variant& v = GetParam();
  MakeModelOptions options = v.options;
  options.out_dir =
      (std::filesystem::path(::testing::TempDir()) / ("epx_variant_" + v.name)).string();
  std::ostringstream log;
  ASSERT_TRUE(RunMakeModel(options, log).ok());
  EXPECT_EQ(options.shards > 1,
            std::filesystem::exists(options.out_dir + "/model.safetensors.index.json"));

  auto config = ModelConfig::FromDir(options.out_dir);
  ASSERT_TRUE(config.ok()) << config.status();
  auto weights = ModelWeights::Load(options.out_dir, *config, WeightSelection::All(*config));
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto engine = Engine::Create(weights->get());
  ASSERT_TRUE(engine.ok()) << engine.status();

  std::vector<int32_t> tokens = {1};
  for (int i = 1; i < 20; ++i) tokens.push_back((i * 97 + 13) % config->vocab_size);
  const int64_t prefill = 13, vocab = config->vocab_size;
  ASSERT_TRUE((*engine)->AddSequence(0).ok());
  std::vector<float> got;
  SequenceInput in{0, absl::MakeConstSpan(tokens).subspan(0, prefill), true};
  auto logits = (*engine)->Step({&in, 1});
  ASSERT_TRUE(logits.ok()) << logits.status();
  got.assign(logits->data<float>(), logits->data<float>() + logits->numel());
  for (size_t t = prefill; t < tokens.size(); ++t) {
    SequenceInput step{0, absl::MakeConstSpan(tokens).subspan(t, 1), false};
    logits = (*engine)->Step({&step, 1});
    ASSERT_TRUE(logits.ok()) << logits.status();
    got.insert(got.end(), logits->data<float>(), logits->data<float>() + vocab);
  }

  testing::ReferenceModel reference(options.out_dir);
  std::vector<double> want = reference.Forward(tokens);
  ASSERT_EQ(got.size(), want.size());
  for (size_t t = 0; t < tokens.size(); ++t) {
    SCOPED_TRACE("position " + std::to_string(t));
    EXPECT_LT((testing::MaxRelativeError<float, double>(
                  absl::MakeConstSpan(got).subspan(t * vocab, vocab),
                  absl::MakeConstSpan(want).subspan(t * vocab, vocab))),
              1e-4);
  }
  std::filesystem::remove_all(options.out_dir);
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, ModelVariantTest, ::testing::ValuesIn(Variants()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace epx
