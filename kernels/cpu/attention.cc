// GQA attention over per-token key/value rows. One (token, head) pair is one task: scores in key
// order, max-subtracted softmax in fp32, values accumulated in key order. Nothing depends on the
// other tokens of the batch.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/simd.h"

namespace epx::cpu {
namespace {

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
  const int64_t tasks = tokens * p.num_heads;
#pragma omp parallel if (tasks > 1)
  {
    std::vector<float> scores;
    std::vector<float> acc(d);
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t t = task / p.num_heads, h = task % p.num_heads, kvh = h / group;
      const AttentionKv& s = kv[t];
      const int64_t first =
          p.sliding_window > 0 ? std::max<int64_t>(0, s.position - p.sliding_window + 1) : 0;
      const int64_t n = s.position + 1 - first;
      scores.resize(n);
      const float* qh = q.data<const float>() + t * q.dim(1) + h * d;
      float max_score = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        scores[j] = Dot(qh, s.k + (first + j) * s.row_stride + kvh * d, d) * p.scale;
        max_score = std::max(max_score, scores[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        sum += scores[j];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float* vj = s.v + (first + j) * s.row_stride + kvh * d;
        const float pj = scores[j];
        for (int64_t i = 0; i < d; ++i) acc[i] += pj * vj[i];
      }
      float* o = out.data<float>() + t * q.dim(1) + h * d;
      const float inv = 1.f / sum;
      for (int64_t i = 0; i < d; ++i) o[i] = acc[i] * inv;
    }
  }
  return absl::OkStatus();
}

}  // namespace epx::cpu
