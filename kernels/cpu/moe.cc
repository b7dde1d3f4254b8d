// Router top-k, the expert permutation, and the SwiGLU expert FFN.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/ops.h"

namespace epx::cpu {

absl::Status RouterTopK(const TensorView& logits, const TensorView& topk_ids,
                        const TensorView& topk_weights) {
  if (logits.rank() != 2 || logits.dtype() != DType::kF32 || topk_ids.dtype() != DType::kI32 ||
      topk_weights.dtype() != DType::kF32 || topk_ids.shape() != topk_weights.shape() ||
      topk_ids.rank() != 2 || topk_ids.dim(0) != logits.dim(0) || topk_ids.dim(1) > logits.dim(1) ||
      topk_ids.dim(1) <= 0)
    return absl::InvalidArgumentError("RouterTopK: shapes or dtypes do not agree");
  const int64_t tokens = logits.dim(0), experts = logits.dim(1), k = topk_ids.dim(1);
  std::vector<float> p(experts);
  std::vector<int32_t> order(experts);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* l = logits.data<const float>() + t * experts;
    for (int64_t e = 0; e < experts; ++e) {
      if (std::isnan(l[e]))
        return absl::InvalidArgumentError(
            absl::StrCat("RouterTopK: router logit of token ", t, ", expert ", e, " is NaN"));
    }
    float max_logit = l[0];
    for (int64_t e = 1; e < experts; ++e) max_logit = std::max(max_logit, l[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < experts; ++e) {
      p[e] = std::exp(l[e] - max_logit);
      sum += p[e];
    }
    for (int64_t e = 0; e < experts; ++e) p[e] /= sum;
    for (int64_t e = 0; e < experts; ++e) order[e] = static_cast<int32_t>(e);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int32_t a, int32_t b) { return p[a] != p[b] ? p[a] > p[b] : a < b; });
    float top_sum = 0.f;
    for (int64_t j = 0; j < k; ++j) top_sum += p[order[j]];
    int32_t* ids = topk_ids.data<int32_t>() + t * k;
    float* w = topk_weights.data<float>() + t * k;
    for (int64_t j = 0; j < k; ++j) {
      ids[j] = order[j];
      w[j] = p[order[j]] / top_sum;
    }
  }
  return absl::OkStatus();
}

absl::Status ExpertPermutation(const TensorView& topk_ids, int64_t num_experts,
                               absl::Span<int64_t> expert_offsets, absl::Span<int64_t> slots) {
  if (topk_ids.dtype() != DType::kI32 ||
      static_cast<int64_t>(expert_offsets.size()) != num_experts + 1 ||
      static_cast<int64_t>(slots.size()) != topk_ids.numel())
    return absl::InvalidArgumentError("ExpertPermutation: sizes do not agree");
  const int32_t* ids = topk_ids.data<const int32_t>();
  const int64_t n = topk_ids.numel();
  std::fill(expert_offsets.begin(), expert_offsets.end(), 0);
  for (int64_t s = 0; s < n; ++s) {
    if (ids[s] < 0 || ids[s] >= num_experts)
      return absl::InvalidArgumentError(
          absl::StrCat("ExpertPermutation: expert id ", ids[s], " outside [0, ", num_experts, ")"));
    ++expert_offsets[ids[s] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) expert_offsets[e + 1] += expert_offsets[e];
  std::vector<int64_t> cursor(expert_offsets.begin(), expert_offsets.end() - 1);
  // Slots ascend, so tokens ascend within each expert: a stable counting sort.
  for (int64_t s = 0; s < n; ++s) slots[cursor[ids[s]]++] = s;
  return absl::OkStatus();
}

absl::Status PermuteRows(const TensorView& x, absl::Span<const int64_t> slots, int64_t num_topk,
                         const TensorView& permuted) {
  const int64_t hidden = x.dim(1);
  if (x.dtype() != permuted.dtype() || permuted.dim(0) != static_cast<int64_t>(slots.size()) ||
      permuted.dim(1) != hidden)
    return absl::InvalidArgumentError("PermuteRows: shapes do not agree");
  const size_t row_bytes = hidden * DTypeSize(x.dtype());
  for (size_t r = 0; r < slots.size(); ++r) {
    const int64_t t = slots[r] / num_topk;
    if (t < 0 || t >= x.dim(0)) return absl::InvalidArgumentError("PermuteRows: slot out of range");
    std::memcpy(static_cast<uint8_t*>(permuted.raw()) + r * row_bytes,
                static_cast<const uint8_t*>(x.raw()) + t * row_bytes, row_bytes);
  }
  return absl::OkStatus();
}

absl::Status UnpermuteRows(const TensorView& permuted, absl::Span<const int64_t> slots,
                           const TensorView& out) {
  if (permuted.dtype() != out.dtype() || permuted.dim(0) != static_cast<int64_t>(slots.size()) ||
      out.dim(0) < permuted.dim(0) || out.dim(1) != permuted.dim(1))
    return absl::InvalidArgumentError("UnpermuteRows: shapes do not agree");
  const size_t row_bytes = permuted.dim(1) * DTypeSize(permuted.dtype());
  for (size_t r = 0; r < slots.size(); ++r) {
    if (slots[r] < 0 || slots[r] >= out.dim(0))
      return absl::InvalidArgumentError("UnpermuteRows: slot out of range");
    std::memcpy(static_cast<uint8_t*>(out.raw()) + slots[r] * row_bytes,
                static_cast<const uint8_t*>(permuted.raw()) + r * row_bytes, row_bytes);
  }
  return absl::OkStatus();
}

int64_t SwiGluScratchFloats(int64_t num_rows, int64_t intermediate) {
  return 2 * num_rows * intermediate;
}

absl::Status SwiGluExpert(const TensorView& x, const TensorView& w1, const TensorView& w2,
                          const TensorView& w3, absl::Span<float> scratch, const TensorView& out) {
  const int64_t rows = x.dim(0), inter = w1.dim(0);
  if (static_cast<int64_t>(scratch.size()) < SwiGluScratchFloats(rows, inter))
    return absl::InvalidArgumentError("SwiGluExpert: scratch too small");
  if (rows == 0) return absl::OkStatus();
  TensorView gate(scratch.data(), DType::kF32, {rows, inter});
  TensorView up(scratch.data() + rows * inter, DType::kF32, {rows, inter});
  EPX_RETURN_IF_ERROR(Linear(x, w1, gate));
  EPX_RETURN_IF_ERROR(Linear(x, w3, up));
  float* g = gate.data<float>();
  const float* u = up.data<const float>();
  const int64_t n = rows * inter;
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  return Linear(gate, w2, out);
}

int64_t GroupedSwiGluScratchFloats(absl::Span<const int64_t> offsets, int64_t intermediate) {
  int64_t largest = 0;
  for (size_t g = 0; g + 1 < offsets.size(); ++g)
    largest = std::max(largest, offsets[g + 1] - offsets[g]);
  return SwiGluScratchFloats(largest, intermediate);
}

absl::Status GroupedSwiGlu(const TensorView& x, absl::Span<const int64_t> offsets,
                           absl::Span<const SwiGluWeights> weights, absl::Span<float> scratch,
                           const TensorView& out) {
  if (offsets.size() != weights.size() + 1 || offsets.empty() || offsets.back() > x.dim(0) ||
      out.shape() != x.shape() || out.dtype() != x.dtype())
    return absl::InvalidArgumentError("GroupedSwiGlu: shapes do not agree");
  if (x.dtype() == DType::kBF16) {
    EPX_ASSIGN_OR_RETURN(Tensor x32, ToF32(x));
    Tensor out32 = Tensor::Empty(DType::kF32, out.shape());
    EPX_RETURN_IF_ERROR(GroupedSwiGlu(x32, offsets, weights, scratch, out32));
    EPX_ASSIGN_OR_RETURN(Tensor narrowed, FromF32(out32, DType::kBF16));
    std::memcpy(out.raw(), narrowed.data<uint8_t>(), out.nbytes());
    return absl::OkStatus();
  }
  if (x.dtype() != DType::kF32)
    return absl::InvalidArgumentError(
        absl::StrCat("GroupedSwiGlu: rows must be F32 or BF16, not ", DTypeName(x.dtype())));
  for (size_t g = 0; g < weights.size(); ++g) {
    const int64_t begin = offsets[g], end = offsets[g + 1];
    if (begin == end) continue;
    if (weights[g].w1.empty())
      return absl::FailedPreconditionError(
          absl::StrCat("expert group ", g, " has ", end - begin, " rows but no weights here"));
    EPX_RETURN_IF_ERROR(SwiGluExpert(x.Slice(begin, end), weights[g].w1, weights[g].w2,
                                     weights[g].w3, scratch, out.Slice(begin, end)));
  }
  return absl::OkStatus();
}

}  // namespace epx::cpu
