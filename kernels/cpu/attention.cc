// GQA attention over per-token key/value rows (contiguous or paged). One (token, head) pair is one task: scores in key
// order, max-subtracted softmax in fp32, values accumulated in key order. Nothing depends on the
// other tokens of the batch.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/simd.h"

namespace epx::cpu {
namespace {

// Keys and values of one KV head are `row_stride` floats apart, usually a page or more, which
// the hardware prefetchers do not follow; fetch a few rows ahead by hand.
constexpr int64_t kPrefetchRows = 6;
inline void PrefetchRow(const float* row, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(row + i);
}

float Dot(const float* a, const float* b, int64_t n) {
  simd::F32x16 acc = {};
  int64_t i = 0;
  for (; i + simd::kLanes <= n; i += simd::kLanes) acc += simd::Load(a + i) * simd::Load(b + i);
  float s = simd::ReduceSum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

absl::Status Attention(const TensorView& q, absl::Span<const AttentionKv> kv,
                       const AttentionParams& p, const TensorView& out) {
  if (q.rank() != 2 || q.dtype() != DType::kF32 || out.shape() != q.shape() ||
      out.dtype() != DType::kF32)
    return absl::InvalidArgumentError("Attention: q and out must be F32 of one 2-D shape");
  if (p.num_heads <= 0 || p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0 ||
      q.dim(1) != p.num_heads * p.head_dim || static_cast<int64_t>(kv.size()) != q.dim(0))
    return absl::InvalidArgumentError("Attention: shapes or head counts do not agree");
  const int64_t tokens = q.dim(0), d = p.head_dim, group = p.num_heads / p.num_kv_heads;
  // One task is a (token, KV head) pair: each key and value row is read once for the `group`
  // query heads that share it. Per head, the operations and their order are those of a
  // head-at-a-time loop.
  const int64_t tasks = tokens * p.num_kv_heads;
#pragma omp parallel if (tasks > 1)
  {
    std::vector<float> scores;  // [group, n]
    std::vector<float> acc(group * d);
    std::vector<float> max_score(group), sum(group);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t t = task / p.num_kv_heads, kvh = task % p.num_kv_heads;
      const AttentionKv& s = kv[t];
      const int64_t first =
          p.sliding_window > 0 ? std::max<int64_t>(0, s.position - p.sliding_window + 1) : 0;
      const int64_t n = s.position + 1 - first;
      scores.resize(group * n);
      const float* q0 = q.data<const float>() + t * q.dim(1) + kvh * group * d;
      std::fill(max_score.begin(), max_score.end(), -INFINITY);
      for (int64_t j = 0; j < n; ++j) {
        const float* kj = s.k + s.Row(first + j) * s.row_stride + kvh * d;
        if (j + kPrefetchRows < n)
          PrefetchRow(s.k + s.Row(first + j + kPrefetchRows) * s.row_stride + kvh * d, d);
        for (int64_t g = 0; g < group; ++g) {
          const float x = Dot(q0 + g * d, kj, d) * p.scale;
          scores[g * n + j] = x;
          max_score[g] = std::max(max_score[g], x);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float total = 0.f;
        float* sg = scores.data() + g * n;
        for (int64_t j = 0; j < n; ++j) {
          sg[j] = std::exp(sg[j] - max_score[g]);
          total += sg[j];
        }
        sum[g] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float* vj = s.v + s.Row(first + j) * s.row_stride + kvh * d;
        if (j + kPrefetchRows < n)
          PrefetchRow(s.v + s.Row(first + j + kPrefetchRows) * s.row_stride + kvh * d, d);
        for (int64_t g = 0; g < group; ++g) {
          const float pj = scores[g * n + j];
          float* ag = acc.data() + g * d;
          for (int64_t i = 0; i < d; ++i) ag[i] += pj * vj[i];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = out.data<float>() + t * q.dim(1) + (kvh * group + g) * d;
        const float inv = 1.f / sum[g];
        for (int64_t i = 0; i < d; ++i) o[i] = acc[g * d + i] * inv;
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace epx::cpu
