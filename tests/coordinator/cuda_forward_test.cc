// The CUDA backend end to end (label gpu): the golden prompts of tests/data/tiny-mixtral through
// an Engine on the GPU, with BF16 and FP8 experts, local and "remote" experts, and batched
// against alone. Skips with a message where no device is visible.
#include "coordinator/cuda_forward.h"

#include <string>
#include <vector>

#include "common/model_weights.h"
#include "coordinator/engine.h"
#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "tests/coordinator/test_util.h"
#include "tests/kernels/cuda_test_util.h"

namespace epx {
namespace {

using testing::GoldenPrompt;
using testing::MaxRelativeError;
using testing::ReadVector;
using testing::TinyModelDir;

// BF16 weights and activations carry a relative rounding of 2^-9 per step; through three layers
// of the tiny model the logits stay within 3% of the largest reference logit (an fp32 backend is
// within 1e-5). FP8 experts (3 mantissa bits, a scale per row) within 10%.
constexpr double kBf16Tolerance = 3e-2;
constexpr double kFp8Tolerance = 1e-1;
// Positions whose argmax equals the reference's: the issue asks for at least 99%.
constexpr double kMinTop1 = 0.99;


class CudaForwardTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto config = ModelConfig::FromDir(TinyModelDir());
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = new ModelConfig(*config);
    auto weights = ModelWeights::Load(TinyModelDir(), *config, WeightSelection::All(*config));
    ASSERT_TRUE(weights.ok()) << weights.status();
    weights_ = weights->release();
    goldens_ = testing::ReadGoldenPrompts();
    ASSERT_EQ(goldens_.size(), 3u);
  }
  static void TearDownTestSuite() {
    delete weights_;
    delete config_;
  }

  std::unique_ptr<Engine> MakeEngine(const CudaForwardOptions& options,
                                     ExpertExecutor* experts = nullptr) {
    auto forward = NewCudaForward(*config_, weights_, experts, options);
    EXPECT_TRUE(forward.ok()) << forward.status();
    if (!forward.ok()) return nullptr;
    auto engine = Engine::Create(*config_, std::move(*forward));
    EXPECT_TRUE(engine.ok()) << engine.status();
    return engine.ok() ? std::move(*engine) : nullptr;
  }

  // Prefill of each prompt, then decode fed the golden greedy tokens (teacher forcing), so that
  // every position is compared even where a near-tie flips one argmax. All prompts in one batch.
  // Returns, per prompt, prefill logits followed by decode logits.
  static std::vector<std::vector<float>> Run(Engine& engine, const std::vector<int>& prompts) {
    const int64_t vocab = engine.config().vocab_size;
    std::vector<std::vector<float>> out(prompts.size());
    std::vector<SequenceInput> batch;
    for (size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_TRUE(engine.AddSequence(static_cast<int64_t>(i)).ok());
      batch.push_back({static_cast<int64_t>(i), goldens_[prompts[i]].tokens, true});
    }
    auto logits = engine.Step(batch);
    EXPECT_TRUE(logits.ok()) << logits.status();
    if (!logits.ok()) return out;
    const float* row = logits->data<float>();
    for (size_t i = 0; i < prompts.size(); ++i) {
      const size_t n = goldens_[prompts[i]].tokens.size() * vocab;
      out[i].assign(row, row + n);
      row += n;
    }
    const size_t steps = goldens_[prompts[0]].greedy.size();
    for (size_t s = 0; s + 1 < steps; ++s) {
      batch.clear();
      for (size_t i = 0; i < prompts.size(); ++i)
        batch.push_back({static_cast<int64_t>(i),
                         absl::MakeConstSpan(&goldens_[prompts[i]].greedy[s], 1), false});
      auto step = engine.Step(batch);
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok()) return out;
      for (size_t i = 0; i < prompts.size(); ++i)
        out[i].insert(out[i].end(), step->data<float>() + i * vocab,
                      step->data<float>() + (i + 1) * vocab);
    }
    for (size_t i = 0; i < prompts.size(); ++i)
      EXPECT_TRUE(engine.RemoveSequence(static_cast<int64_t>(i)).ok());
    return out;
  }

  // The reference for Run's output: prefill logits, then the greedy logits but the last.
  static std::vector<float> Reference(int prompt, int64_t vocab) {
    const GoldenPrompt& g = goldens_[prompt];
    std::vector<float> ref = g.logits;
    ref.insert(ref.end(), g.greedy_logits.begin(), g.greedy_logits.end() - vocab);
    return ref;
  }

  static void ExpectMatchesGolden(const std::vector<std::vector<float>>& got, double tolerance) {
    const int64_t vocab = config_->vocab_size;
    int64_t agree = 0, positions = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const std::vector<float> ref = Reference(static_cast<int>(i), vocab);
      ASSERT_EQ(got[i].size(), ref.size()) << "prompt " << i;
      EXPECT_LT((MaxRelativeError<float, float>(got[i], ref)), tolerance) << "prompt " << i;
      for (size_t p = 0; p < ref.size() / vocab; ++p, ++positions) {
        const auto a = absl::MakeConstSpan(got[i].data() + p * vocab, vocab);
        const auto b = absl::MakeConstSpan(ref.data() + p * vocab, vocab);
        agree += cpu::ArgMax(a) == cpu::ArgMax(b);
      }
    }
    EXPECT_GE(static_cast<double>(agree) / positions, kMinTop1)
        << agree << " of " << positions << " positions agree on the top token";
  }

  static inline ModelConfig* config_ = nullptr;
  static inline ModelWeights* weights_ = nullptr;
  static inline std::vector<GoldenPrompt> goldens_;
};

TEST_F(CudaForwardTest, GoldenWithinBf16Tolerance) {
  EPX_SKIP_WITHOUT_GPU();
  for (const char* gemm : {"auto", "skinny", "cublas-loop", "cublas-grouped"}) {
    SCOPED_TRACE(gemm);
    CudaForwardOptions options;
    options.grouped_gemm = gemm;
    auto engine = MakeEngine(options);
    ASSERT_NE(engine, nullptr);
    ExpectMatchesGolden(Run(*engine, {0, 1, 2}), kBf16Tolerance);
  }
}

// A forced skinny GEMM takes at most kSkinnyMaxRows routed rows; larger steps (here a prefill of
// 3 x 23 tokens, 138 routed rows) run with the cuBLAS loop instead of failing.
TEST_F(CudaForwardTest, ForcedSkinnyRunsLargeSteps) {
  EPX_SKIP_WITHOUT_GPU();
  CudaForwardOptions options;
  options.grouped_gemm = "skinny";
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  const auto got = Run(*engine, {2, 2, 2});
  const std::vector<float> ref = Reference(2, config_->vocab_size);
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(got[i].size(), ref.size()) << "copy " << i;
    EXPECT_LT((MaxRelativeError<float, float>(got[i], ref)), kBf16Tolerance) << "copy " << i;
  }
}

TEST_F(CudaForwardTest, GoldenWithFp8Experts) {
  EPX_SKIP_WITHOUT_GPU();
  CudaForwardOptions options;
  options.expert_dtype = DType::kF8E4M3;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  ExpectMatchesGolden(Run(*engine, {0, 1, 2}), kFp8Tolerance);
}

// Experts computed elsewhere (here the CPU executor standing in for the workers): rows go to the
// host and back every layer.
TEST_F(CudaForwardTest, GoldenWithRemoteExperts) {
  EPX_SKIP_WITHOUT_GPU();
  std::unique_ptr<ExpertExecutor> cpu_experts = NewLocalExpertExecutor(weights_);
  auto engine = MakeEngine(CudaForwardOptions(), cpu_experts.get());
  ASSERT_NE(engine, nullptr);
  ExpectMatchesGolden(Run(*engine, {0, 1, 2}), kBf16Tolerance);
}

// Each prompt alone and in the batch: the same greedy argmax at every position, and logits
// within the bf16 tolerance of each other (GEMM tiling may depend on the row count).
TEST_F(CudaForwardTest, BatchedMatchesAlone) {
  EPX_SKIP_WITHOUT_GPU();
  auto engine = MakeEngine(CudaForwardOptions());
  ASSERT_NE(engine, nullptr);
  const auto batched = Run(*engine, {0, 1, 2});
  for (int i = 0; i < 3; ++i) {
    const auto alone = Run(*engine, {i});
    ASSERT_EQ(alone[0].size(), batched[i].size());
    EXPECT_LT((MaxRelativeError<float, float>(alone[0], batched[i])), kBf16Tolerance);
  }
}

TEST_F(CudaForwardTest, DummyWeightsRunAtTheConfigShapes) {
  EPX_SKIP_WITHOUT_GPU();
  CudaForwardOptions options;
  options.dummy_seed = 7;
  auto forward = NewCudaForward(*config_, nullptr, nullptr, options);
  ASSERT_TRUE(forward.ok()) << forward.status();
  auto engine = Engine::Create(*config_, std::move(*forward));
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_TRUE((*engine)->AddSequence(1).ok());
  const std::vector<int32_t> prompt = {1, 2, 3, 4, 5};
  auto logits = (*engine)->Step({{1, prompt, false}});
  ASSERT_TRUE(logits.ok()) << logits.status();
  for (int64_t i = 0; i < logits->numel(); ++i)
    ASSERT_TRUE(std::isfinite(logits->data<float>()[i])) << i;
}

TEST_F(CudaForwardTest, BadOptionsAreRefused) {
  if (!cuda::BuiltWithCuda()) {
    const absl::Status status = NewCudaForward(*config_, weights_, nullptr, {}).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(status.message().find("built without CUDA"), std::string::npos) << status;
    return;
  }
  CudaForwardOptions options;
  options.grouped_gemm = "fastest";
  EXPECT_EQ(NewCudaForward(*config_, weights_, nullptr, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options = CudaForwardOptions();
  options.expert_dtype = DType::kF16;
  EXPECT_EQ(NewCudaForward(*config_, weights_, nullptr, options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace epx
