// Synthetic weights are a pure function of (seed, index): the GPU fill kernel evaluates the same
// constexpr code, so these properties hold on both sides.
#include "common/dummy_weights.h"

#include <cmath>
#include <set>

#include "gtest/gtest.h"

namespace epx {
namespace {

TEST(DummyWeightsTest, DeterministicInRangeAndOnTheGrid) {
  double sum = 0, sum_sq = 0;
  const int n = 1 << 16;
  for (int i = 0; i < n; ++i) {
    const float v = DummyUniform(42, i);
    EXPECT_EQ(v, DummyUniform(42, i));
    ASSERT_GE(v, -1.f);
    ASSERT_LT(v, 1.f);
    EXPECT_EQ(v * (1 << 23), std::round(v * (1 << 23)));  // exact multiple of 2^-23
    sum += v;
    sum_sq += double(v) * v;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sum_sq / n, 1.0 / 3.0, 0.01);  // variance of U(-1, 1)
}

TEST(DummyWeightsTest, SeedsAndTensorsDiffer) {
  EXPECT_NE(DummyUniform(1, 7), DummyUniform(2, 7));
  EXPECT_NE(DummyTensorSeed(0, "model.layers.0.self_attn.q_proj.weight"),
            DummyTensorSeed(0, "model.layers.0.self_attn.k_proj.weight"));
  EXPECT_NE(DummyTensorSeed(0, "lm_head.weight"), DummyTensorSeed(1, "lm_head.weight"));
  std::set<float> distinct;
  for (int i = 0; i < 1000; ++i) distinct.insert(DummyUniform(3, i));
  EXPECT_GT(distinct.size(), 990u);
}

TEST(DummyWeightsTest, ConstantEvaluable) {
  // The GPU evaluates the same code; being constexpr is what lets it.
  constexpr float v = DummyUniform(5, 11);
  static_assert(v >= -1.f && v < 1.f);
  EXPECT_EQ(v, DummyUniform(5, 11));
  EXPECT_FLOAT_EQ(DummyFill::Matrix(4096).scale, 1.f / 64.f);
  EXPECT_EQ(DummyFill::Ones().offset, 1.f);
}

}  // namespace
}  // namespace epx
