// The CUDA backend on checkpoints of other dtypes and shapes (label gpu): fp16 and fp32 weights
// are converted as they are uploaded, sliding windows and other head/expert counts take the
// same kernels. Each variant's GPU logits are compared with the CPU engine's on the same
// checkpoint, prefill and decode. Skips with a message where no device is visible.
#include <filesystem>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "common/model_weights.h"
#include "coordinator/cuda_forward.h"
#include "coordinator/engine.h"
#include "gtest/gtest.h"
#include "tests/coordinator/test_util.h"
#include "tests/kernels/cuda_test_util.h"

namespace epx {
namespace {

using testing::MaxRelativeError;

// BF16 rounding of weights and GEMM inputs through a few layers (see cuda_forward_test.cc).
constexpr double kTolerance = 3e-2;

struct Variant {
  std::string name;
  MakeModelOptions options;
};

void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

Variant MakeVariant(std::string name, DType dtype) {
  Variant v{std::move(name), {}};
  v.options.preset = "tiny";
  v.options.seed = 11;
  v.options.dtype = dtype;
  return v;
}

std::vector<Variant> Variants() {
  std::vector<Variant> out = {MakeVariant("fp16", DType::kF16), MakeVariant("fp32", DType::kF32),
                              MakeVariant("bf16_window", DType::kBF16),
                              MakeVariant("bf16_mha_16experts_top4", DType::kBF16)};
  out[2].options.sliding_window = 5;
  out[3].options.num_heads = 4;
  out[3].options.num_kv_heads = 4;
  out[3].options.num_experts = 16;
  out[3].options.num_experts_per_tok = 4;
  return out;
}

// Prefill of 13 tokens (all logits) and 7 decode steps, one sequence.
std::vector<float> RunPrompt(Engine& engine, int64_t vocab) {
  std::vector<int32_t> tokens = {1};
  for (int i = 1; i < 20; ++i) tokens.push_back(static_cast<int32_t>((i * 97 + 13) % vocab));
  std::vector<float> out;
  EXPECT_TRUE(engine.AddSequence(0).ok());
  SequenceInput prefill{0, absl::MakeConstSpan(tokens).subspan(0, 13), true};
  auto logits = engine.Step({&prefill, 1});
  EXPECT_TRUE(logits.ok()) << logits.status();
  if (!logits.ok()) return out;
  out.assign(logits->data<float>(), logits->data<float>() + logits->numel());
  for (size_t t = 13; t < tokens.size(); ++t) {
    SequenceInput step{0, absl::MakeConstSpan(tokens).subspan(t, 1), false};
    auto next = engine.Step({&step, 1});
    EXPECT_TRUE(next.ok()) << next.status();
    if (!next.ok()) return out;
    out.insert(out.end(), next->data<float>(), next->data<float>() + next->numel());
  }
  return out;
}

class CudaModelVariantTest : public ::testing::TestWithParam<Variant> {};

TEST_P(CudaModelVariantTest, GpuMatchesCpuOnTheSameCheckpoint) {
  EPX_SKIP_WITHOUT_GPU();
  const Variant& v = GetParam();
  MakeModelOptions options = v.options;
  options.out_dir =
      (std::filesystem::path(::testing::TempDir()) / ("epx_cuda_variant_" + v.name)).string();
  std::ostringstream log;
  ASSERT_TRUE(RunMakeModel(options, log).ok()) << log.str();
  auto config = ModelConfig::FromDir(options.out_dir);
  ASSERT_TRUE(config.ok()) << config.status();
  auto weights = ModelWeights::Load(options.out_dir, *config, WeightSelection::All(*config));
  ASSERT_TRUE(weights.ok()) << weights.status();

  auto cpu_engine = Engine::Create(weights->get());
  ASSERT_TRUE(cpu_engine.ok()) << cpu_engine.status();
  auto forward = NewCudaForward(*config, weights->get(), nullptr, CudaForwardOptions());
  ASSERT_TRUE(forward.ok()) << forward.status();
  auto gpu_engine = Engine::Create(*config, std::move(*forward));
  ASSERT_TRUE(gpu_engine.ok()) << gpu_engine.status();

  const std::vector<float> want = RunPrompt(**cpu_engine, config->vocab_size);
  const std::vector<float> got = RunPrompt(**gpu_engine, config->vocab_size);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_LT((MaxRelativeError<float, float>(got, want)), kTolerance);
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, CudaModelVariantTest, ::testing::ValuesIn(Variants()),
                         [](const ::testing::TestParamInfo<Variant>& info) {
                           return info.param.name;
                         });

}  // namespace
}  // namespace epx
