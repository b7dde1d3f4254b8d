// CPU kernels against naive float64 loops over odd shapes, and the determinism contract: a row's
// result does not depend on the other rows.
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"

namespace epx::cpu {
namespace {

std::vector<float> RandomVector(int64_t n, uint32_t seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Weights stored as `dtype`, and the exact fp32 values they hold.
struct Weights {
  Tensor stored;
  std::vector<float> values;
};

Weights MakeWeights(int64_t n, int64_t k, DType dtype, uint32_t seed) {
  std::vector<float> f = RandomVector(n * k, seed);
  Tensor src = Tensor::Empty(DType::kF32, {n, k});
  std::memcpy(src.data<float>(), f.data(), f.size() * sizeof(float));
  Weights w;
  w.stored = *FromF32(src, dtype);
  Tensor back = *ToF32(w.stored);
  w.values.assign(back.data<float>(), back.data<float>() + back.numel());
  return w;
}

class LinearTest : public ::testing::TestWithParam<DType> {};

TEST_P(LinearTest, MatchesFloat64OverOddShapes) {
  for (int64_t m : {1, 3, 7, 19}) {
    for (int64_t n : {1, 5, 64, 67}) {
      for (int64_t k : {1, 15, 16, 33, 130}) {
        SCOPED_TRACE(absl::StrCat("m=", m, " n=", n, " k=", k));
        Weights w = MakeWeights(n, k, GetParam(), static_cast<uint32_t>(m * 1000 + n * 10 + k));
        std::vector<float> x = RandomVector(m * k, 7);
        Tensor y = Tensor::Empty(DType::kF32, {m, n});
        ASSERT_TRUE(Linear(TensorView(x.data(), DType::kF32, {m, k}), w.stored, y).ok());
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            double want = 0, mag = 0;
            for (int64_t l = 0; l < k; ++l) {
              want += static_cast<double>(x[i * k + l]) * w.values[j * k + l];
              mag += std::abs(static_cast<double>(x[i * k + l]) * w.values[j * k + l]);
            }
            ASSERT_NEAR(y.data<float>()[i * n + j], want, 1e-6 * mag + 1e-7);
          }
      }
    }
  }
}

TEST_P(LinearTest, RowResultIsIndependentOfTheOtherRows) {
  const int64_t n = 70, k = 147, m = 37;
  Weights w = MakeWeights(n, k, GetParam(), 3);
  std::vector<float> x = RandomVector(m * k, 11);
  Tensor all = Tensor::Empty(DType::kF32, {m, n});
  ASSERT_TRUE(Linear(TensorView(x.data(), DType::kF32, {m, k}), w.stored, all).ok());
  // Every row alone, and every window of rows, gives the same bits.
  for (int64_t begin = 0; begin < m; ++begin) {
    for (int64_t len : {1, 2, 3, 5, 9}) {
      if (begin + len > m) continue;
      Tensor part = Tensor::Empty(DType::kF32, {len, n});
      ASSERT_TRUE(
          Linear(TensorView(x.data() + begin * k, DType::kF32, {len, k}), w.stored, part).ok());
      ASSERT_EQ(0, std::memcmp(part.data<float>(), all.data<float>() + begin * n,
                               len * n * sizeof(float)))
          << "rows [" << begin << ", " << begin + len << ")";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(WeightTypes, LinearTest,
                         ::testing::Values(DType::kF32, DType::kBF16, DType::kF16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

TEST(LinearTest, RejectsMismatchedShapes) {
  Tensor x = Tensor::Zeros(DType::kF32, {2, 8});
  Tensor w = Tensor::Zeros(DType::kF32, {3, 9});
  Tensor y = Tensor::Zeros(DType::kF32, {2, 3});
  EXPECT_EQ(Linear(x, w, y).code(), absl::StatusCode::kInvalidArgument);
  Tensor wi = Tensor::Zeros(DType::kI32, {3, 8});
  EXPECT_EQ(Linear(x, wi, y).code(), absl::StatusCode::kInvalidArgument);
}

TEST(RmsNormTest, MatchesFloat64) {
  const int64_t rows = 3, hidden = 37;
  std::vector<float> x = RandomVector(rows * hidden, 1), w = RandomVector(hidden, 2);
  Tensor out = Tensor::Empty(DType::kF32, {rows, hidden});
  ASSERT_TRUE(RmsNorm(TensorView(x.data(), DType::kF32, {rows, hidden}),
                      TensorView(w.data(), DType::kF32, {hidden}), 1e-5f, out)
                  .ok());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < hidden; ++i) ss += double(x[r * hidden + i]) * x[r * hidden + i];
    const double inv = 1 / std::sqrt(ss / hidden + 1e-5);
    for (int64_t i = 0; i < hidden; ++i)
      EXPECT_NEAR(out.data<float>()[r * hidden + i], w[i] * x[r * hidden + i] * inv, 1e-6);
  }
}

TEST(RopeTest, RotateHalfAtPositions) {
  const int64_t d = 8, heads = 2;
  const std::vector<int64_t> positions = {0, 1, 1000};
  std::vector<float> x = RandomVector(3 * heads * d, 5);
  std::vector<float> orig = x;
  Tensor table = Tensor::Empty(DType::kF32, {3, d});
  ASSERT_TRUE(RopeTable(positions, d, 10000.0, table).ok());
  ASSERT_TRUE(ApplyRope(TensorView(x.data(), DType::kF32, {3, heads * d}), d, table).ok());
  for (int t = 0; t < 3; ++t)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < d / 2; ++i) {
        const double a = positions[t] * std::pow(10000.0, -2.0 * i / d);
        const float* o = &orig[(t * heads + h) * d];
        const float* v = &x[(t * heads + h) * d];
        EXPECT_NEAR(v[i], o[i] * std::cos(a) - o[i + d / 2] * std::sin(a), 1e-5);
        EXPECT_NEAR(v[i + d / 2], o[i + d / 2] * std::cos(a) + o[i] * std::sin(a), 1e-5);
      }
  // Position 0 is the identity.
  for (int i = 0; i < heads * d; ++i) EXPECT_EQ(x[i], orig[i]);
}

TEST(AttentionTest, GqaCausalSlidingWindowMatchesFloat64) {
  const int64_t heads = 4, kv_heads = 2, d = 19, len = 11;
  for (int64_t window : {0, 1, 4}) {
    SCOPED_TRACE(absl::StrCat("window=", window));
    std::vector<float> k = RandomVector(len * kv_heads * d, 1),
                       v = RandomVector(len * kv_heads * d, 2);
    std::vector<float> q = RandomVector(len * heads * d, 3);
    std::vector<AttentionKv> kv(len);
    for (int64_t t = 0; t < len; ++t)
      kv[t] = {.k = k.data(), .v = v.data(), .row_stride = kv_heads * d, .position = t};
    AttentionParams p{heads, kv_heads, d, 1.f / std::sqrt(float(d)), window};
    Tensor out = Tensor::Empty(DType::kF32, {len, heads * d});
    ASSERT_TRUE(Attention(TensorView(q.data(), DType::kF32, {len, heads * d}), kv, p, out).ok());
    for (int64_t t = 0; t < len; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t g = h / (heads / kv_heads);
        std::vector<double> s;
        for (int64_t j = 0; j <= t; ++j) {
          if (window > 0 && t - j >= window) {
            s.push_back(-INFINITY);
            continue;
          }
          double dot = 0;
          for (int64_t i = 0; i < d; ++i)
            dot += double(q[(t * heads + h) * d + i]) * k[(j * kv_heads + g) * d + i];
          s.push_back(dot / std::sqrt(double(d)));
        }
        const double mx = *std::max_element(s.begin(), s.end());
        double sum = 0;
        for (double& e : s) sum += (e = std::exp(e - mx));
        for (int64_t i = 0; i < d; ++i) {
          double want = 0;
          for (int64_t j = 0; j <= t; ++j) want += s[j] / sum * v[(j * kv_heads + g) * d + i];
          ASSERT_NEAR(out.data<float>()[(t * heads + h) * d + i], want, 1e-5);
        }
      }
  }
}

TEST(AttentionTest, PagedRowsGiveTheSameBitsAsContiguousRows) {
  // 29 positions in blocks of 4, the blocks scattered over a pool of 12 in scrambled order.
  const int64_t heads = 6, kv_heads = 2, d = 16, len = 29, block = 4, row = kv_heads * d;
  const std::vector<int32_t> table = {7, 2, 11, 0, 5, 9, 3, 10};
  std::vector<float> k = RandomVector(len * row, 4), v = RandomVector(len * row, 5);
  std::vector<float> q = RandomVector(len * heads * d, 6);
  std::vector<float> k_pool(12 * block * row, NAN), v_pool(12 * block * row, NAN);
  for (int64_t p = 0; p < len; ++p) {
    const int64_t r = table[p / block] * block + p % block;
    std::copy_n(&k[p * row], row, &k_pool[r * row]);
    std::copy_n(&v[p * row], row, &v_pool[r * row]);
  }
  for (int64_t window : {0, 7}) {
    std::vector<AttentionKv> contiguous(len), paged(len);
    for (int64_t t = 0; t < len; ++t) {
      contiguous[t] = {.k = k.data(), .v = v.data(), .row_stride = row, .position = t};
      paged[t] = {.k = k_pool.data(), .v = v_pool.data(), .row_stride = row, .position = t,
                  .block_table = table, .block_size = block};
    }
    AttentionParams p{heads, kv_heads, d, 0.25f, window};
    const TensorView qv(q.data(), DType::kF32, {len, heads * d});
    Tensor a = Tensor::Empty(DType::kF32, {len, heads * d});
    Tensor b = Tensor::Empty(DType::kF32, {len, heads * d});
    ASSERT_TRUE(Attention(qv, contiguous, p, a).ok());
    ASSERT_TRUE(Attention(qv, paged, p, b).ok());
    EXPECT_EQ(std::memcmp(a.data<float>(), b.data<float>(), len * heads * d * sizeof(float)), 0)
        << "window " << window;
  }
}

TEST(RouterTopKTest, SoftmaxTopKRenormalisedWithTiesToLowerIndex) {
  // Token 0: a clear order. Token 1: experts 1 and 3 tie for first place.
  std::vector<float> logits = {0.f, 2.f, 1.f, -1.f, 0.5f, 3.f, 1.f, 3.f};
  Tensor ids = Tensor::Empty(DType::kI32, {2, 2});
  Tensor w = Tensor::Empty(DType::kF32, {2, 2});
  ASSERT_TRUE(RouterTopK(TensorView(logits.data(), DType::kF32, {2, 4}), ids, w).ok());
  EXPECT_EQ(ids.data<int32_t>()[0], 1);
  EXPECT_EQ(ids.data<int32_t>()[1], 2);
  EXPECT_EQ(ids.data<int32_t>()[2], 1);
  EXPECT_EQ(ids.data<int32_t>()[3], 3);
  EXPECT_NEAR(w.data<float>()[0], std::exp(2.0) / (std::exp(2.0) + std::exp(1.0)), 1e-6);
  EXPECT_NEAR(w.data<float>()[0] + w.data<float>()[1], 1.f, 1e-6);
  EXPECT_FLOAT_EQ(w.data<float>()[2], 0.5f);
  EXPECT_FLOAT_EQ(w.data<float>()[3], 0.5f);
}

TEST(PermutationTest, GroupsSlotsByExpertStably) {
  // 3 tokens, top-2.
  std::vector<int32_t> ids = {2, 0, 0, 2, 1, 0};
  std::vector<int64_t> offsets(4), slots(6);
  ASSERT_TRUE(ExpertPermutation(TensorView(ids.data(), DType::kI32, {3, 2}), 3,
                                absl::MakeSpan(offsets), absl::MakeSpan(slots))
                  .ok());
  EXPECT_EQ(offsets, (std::vector<int64_t>{0, 3, 4, 6}));
  EXPECT_EQ(slots, (std::vector<int64_t>{1, 2, 5, 4, 0, 3}));
  std::vector<int32_t> bad = {0, 4};
  EXPECT_FALSE(ExpertPermutation(TensorView(bad.data(), DType::kI32, {1, 2}), 3,
                                 absl::MakeSpan(offsets), absl::MakeSpan(slots).subspan(0, 2))
                   .ok());

  // Permute then unpermute: slot s holds token s / 2.
  std::vector<float> x = {10, 11, 20, 21, 30, 31};  // [3, 2]
  std::vector<float> permuted(12), back(12);
  ASSERT_TRUE(PermuteRows(TensorView(x.data(), DType::kF32, {3, 2}), slots, 2,
                          TensorView(permuted.data(), DType::kF32, {6, 2}))
                  .ok());
  EXPECT_EQ(permuted[0], 10);  // slot 1 -> token 0
  EXPECT_EQ(permuted[4], 30);  // slot 5 -> token 2
  ASSERT_TRUE(UnpermuteRows(TensorView(permuted.data(), DType::kF32, {6, 2}), slots,
                            TensorView(back.data(), DType::kF32, {6, 2}))
                  .ok());
  for (int s = 0; s < 6; ++s) EXPECT_EQ(back[s * 2], x[(s / 2) * 2]);
}

TEST(SwiGluExpertTest, MatchesFloat64) {
  const int64_t rows = 3, hidden = 20, inter = 36;
  Weights w1 = MakeWeights(inter, hidden, DType::kBF16, 1);
  Weights w3 = MakeWeights(inter, hidden, DType::kBF16, 2);
  Weights w2 = MakeWeights(hidden, inter, DType::kBF16, 3);
  std::vector<float> x = RandomVector(rows * hidden, 4);
  std::vector<float> scratch(SwiGluScratchFloats(rows, inter));
  Tensor out = Tensor::Empty(DType::kF32, {rows, hidden});
  ASSERT_TRUE(SwiGluExpert(TensorView(x.data(), DType::kF32, {rows, hidden}), w1.stored, w2.stored,
                           w3.stored, absl::MakeSpan(scratch), out)
                  .ok());
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> act(inter);
    for (int64_t i = 0; i < inter; ++i) {
      double g = 0, u = 0;
      for (int64_t j = 0; j < hidden; ++j) {
        g += double(x[r * hidden + j]) * w1.values[i * hidden + j];
        u += double(x[r * hidden + j]) * w3.values[i * hidden + j];
      }
      act[i] = g / (1 + std::exp(-g)) * u;
    }
    for (int64_t o = 0; o < hidden; ++o) {
      double want = 0;
      for (int64_t i = 0; i < inter; ++i) want += act[i] * w2.values[o * inter + i];
      EXPECT_NEAR(out.data<float>()[r * hidden + o], want, 1e-5);
    }
  }
}

TEST(MoeCombineTest, AddsWeightedSlotsToResidual) {
  std::vector<float> h = {1, 2}, out_slots = {10, 20, 100, 200}, w = {0.25f, 0.75f}, x(2);
  ASSERT_TRUE(MoeCombine(TensorView(h.data(), DType::kF32, {1, 2}),
                         TensorView(out_slots.data(), DType::kF32, {2, 2}),
                         TensorView(w.data(), DType::kF32, {1, 2}),
                         TensorView(x.data(), DType::kF32, {1, 2}))
                  .ok());
  EXPECT_FLOAT_EQ(x[0], 1 + 2.5f + 75.f);
  EXPECT_FLOAT_EQ(x[1], 2 + 5.f + 150.f);
}

TEST(EmbeddingTest, GathersAndRejectsOutOfRangeIds) {
  std::vector<float> table = {0, 1, 2, 3, 4, 5};  // [3, 2]
  std::vector<int32_t> ids = {2, 0};
  Tensor out = Tensor::Empty(DType::kF32, {2, 2});
  ASSERT_TRUE(Embedding(ids, TensorView(table.data(), DType::kF32, {3, 2}), out).ok());
  EXPECT_EQ(out.data<float>()[0], 4);
  EXPECT_EQ(out.data<float>()[3], 1);
  std::vector<int32_t> bad = {3, 0};
  absl::Status s = Embedding(bad, TensorView(table.data(), DType::kF32, {3, 2}), out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("token id 3"), std::string::npos);
}

TEST(SamplingTest, GreedyIsArgMaxWithLowestIndexOnTies) {
  std::vector<float> logits = {0.f, 3.f, 1.f, 3.f};
  SamplingRng rng(0);
  EXPECT_EQ(*Sample(logits, {}, rng), 1);
  SamplingParams top1;
  top1.temperature = 5.f;
  top1.top_k = 1;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(*Sample(logits, top1, rng), 1);
}

TEST(SamplingTest, SeededDrawsAreReproducibleAndFollowTheDistribution) {
  std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f), -1e9f};
  SamplingParams p;
  p.temperature = 1.f;
  SamplingRng a(1234), b(1234), c(99);
  std::vector<int> counts(4);
  bool differs = false;
  for (int i = 0; i < 20000; ++i) {
    const int32_t x = *Sample(logits, p, a);
    EXPECT_EQ(x, *Sample(logits, p, b));
    differs |= x != *Sample(logits, p, c);
    ++counts[x];
  }
  EXPECT_TRUE(differs);
  EXPECT_NEAR(counts[0] / 20000.0, 0.5, 0.02);
  EXPECT_NEAR(counts[1] / 20000.0, 0.3, 0.02);
  EXPECT_NEAR(counts[2] / 20000.0, 0.2, 0.02);
  EXPECT_EQ(counts[3], 0);
}

TEST(SamplingTest, TopKAndTopPRestrictTheCandidates) {
  std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  SamplingRng rng(7);
  SamplingParams k2;
  k2.temperature = 1.f;
  k2.top_k = 2;
  SamplingParams p75;
  p75.temperature = 1.f;
  p75.top_p = 0.75f;  // 0.5 + 0.3 reaches it: tokens 0 and 1
  SamplingParams p_small;
  p_small.temperature = 1.f;
  p_small.top_p = 0.1f;  // only the most likely token
  std::vector<int> seen_k(4), seen_p(4);
  for (int i = 0; i < 2000; ++i) {
    ++seen_k[*Sample(logits, k2, rng)];
    ++seen_p[*Sample(logits, p75, rng)];
    EXPECT_EQ(*Sample(logits, p_small, rng), 0);
  }
  EXPECT_GT(seen_k[0], 0);
  EXPECT_GT(seen_k[1], 0);
  EXPECT_EQ(seen_k[2] + seen_k[3], 0);
  EXPECT_GT(seen_p[1], 0);
  EXPECT_EQ(seen_p[2] + seen_p[3], 0);
}

TEST(SamplingTest, RejectsBadParameters) {
  std::vector<float> logits = {0.f, 1.f};
  SamplingRng rng(0);
  SamplingParams p;
  p.temperature = -1.f;
  EXPECT_EQ(Sample(logits, p, rng).status().code(), absl::StatusCode::kInvalidArgument);
  p = {};
  p.top_p = 0.f;
  EXPECT_EQ(Sample(logits, p, rng).status().code(), absl::StatusCode::kInvalidArgument);
  p = {};
  p.top_k = -5;
  EXPECT_EQ(Sample(logits, p, rng).status().code(), absl::StatusCode::kInvalidArgument);
  p = {};
  p.temperature = NAN;
  EXPECT_EQ(Sample(logits, p, rng).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace epx::cpu
