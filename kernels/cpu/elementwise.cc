// Row-wise ops: embedding gather, RMSNorm, RoPE, residual adds and the MoE combine.
#include <cmath>
#include <cstring>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/simd.h"

namespace epx::cpu {
namespace {

absl::Status Check2dF32(const char* op, const char* name, const TensorView& t) {
  if (t.rank() != 2 || t.dtype() != DType::kF32)
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", name, " must be 2-D F32, got ",
                                                   DTypeName(t.dtype()), " ",
                                                   ShapeString(t.shape())));
  return absl::OkStatus();
}

template <typename W>
void GatherRow(const W* row, int64_t hidden, float* out) {
  for (int64_t i = 0; i < hidden; ++i) out[i] = simd::ToF32(row[i]);
}

}  // namespace

absl::Status Embedding(absl::Span<const int32_t> ids, const TensorView& table,
                       const TensorView& out) {
  EPX_RETURN_IF_ERROR(Check2dF32("Embedding", "out", out));
  if (table.rank() != 2 || out.dim(0) != static_cast<int64_t>(ids.size()) ||
      out.dim(1) != table.dim(1))
    return absl::InvalidArgumentError("Embedding: shapes do not agree");
  const int64_t vocab = table.dim(0), hidden = table.dim(1);
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab)
      return absl::InvalidArgumentError(absl::StrCat(
          "token id ", ids[i], " at index ", i, " is outside the vocabulary [0, ", vocab, ")"));
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    float* dst = out.data<float>() + i * hidden;
    switch (table.dtype()) {
      case DType::kF32:
        GatherRow(table.data<const float>() + ids[i] * hidden, hidden, dst);
        break;
      case DType::kBF16:
        GatherRow(table.data<const simd::Bf16>() + ids[i] * hidden, hidden, dst);
        break;
      case DType::kF16:
        GatherRow(table.data<const simd::F16>() + ids[i] * hidden, hidden, dst);
        break;
      default:
        return absl::InvalidArgumentError("Embedding: table must be F32, BF16 or F16");
    }
  }
  return absl::OkStatus();
}

absl::Status RmsNorm(const TensorView& x, const TensorView& w, float eps, const TensorView& out) {
  EPX_RETURN_IF_ERROR(Check2dF32("RmsNorm", "x", x));
  EPX_RETURN_IF_ERROR(Check2dF32("RmsNorm", "out", out));
  const int64_t rows = x.dim(0), hidden = x.dim(1);
  if (w.dtype() != DType::kF32 || w.numel() != hidden || out.shape() != x.shape())
    return absl::InvalidArgumentError("RmsNorm: shapes do not agree");
  const float* wp = w.data<const float>();
#pragma omp parallel for schedule(static) if (rows * hidden >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data<const float>() + r * hidden;
    float* yr = out.data<float>() + r * hidden;
    double ss = 0;  // in double: the mean of squares is the one long reduction here
    for (int64_t i = 0; i < hidden; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / hidden + eps));
    for (int64_t i = 0; i < hidden; ++i) yr[i] = wp[i] * (xr[i] * inv);
  }
  return absl::OkStatus();
}

absl::Status RopeTable(absl::Span<const int64_t> positions, int64_t head_dim, double theta,
                       const TensorView& out) {
  EPX_RETURN_IF_ERROR(Check2dF32("RopeTable", "out", out));
  if (head_dim % 2 != 0 || out.dim(0) != static_cast<int64_t>(positions.size()) ||
      out.dim(1) != head_dim)
    return absl::InvalidArgumentError("RopeTable: shapes do not agree");
  const int64_t half = head_dim / 2;
  for (size_t t = 0; t < positions.size(); ++t) {
    float* row = out.data<float>() + t * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / head_dim);
      const double angle = static_cast<double>(positions[t]) * inv_freq;
      row[i] = static_cast<float>(std::cos(angle));
      row[half + i] = static_cast<float>(std::sin(angle));
    }
  }
  return absl::OkStatus();
}

absl::Status ApplyRope(const TensorView& x, int64_t head_dim, const TensorView& table) {
  EPX_RETURN_IF_ERROR(Check2dF32("ApplyRope", "x", x));
  if (x.dim(1) % head_dim != 0 || table.dim(0) != x.dim(0) || table.dim(1) != head_dim)
    return absl::InvalidArgumentError("ApplyRope: shapes do not agree");
  const int64_t rows = x.dim(0), heads = x.dim(1) / head_dim, half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows * x.dim(1) >= (1 << 16))
  for (int64_t t = 0; t < rows; ++t) {
    const float* cs = table.data<const float>() + t * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x.data<float>() + t * x.dim(1) + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[half + i], c = cs[i], s = cs[half + i];
        v[i] = a * c - b * s;         // x1 * cos + (-x2) * sin
        v[half + i] = b * c + a * s;  // x2 * cos + x1 * sin
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Add(const TensorView& a, const TensorView& b, const TensorView& out) {
  if (a.dtype() != DType::kF32 || b.dtype() != DType::kF32 || out.dtype() != DType::kF32 ||
      a.shape() != b.shape() || a.shape() != out.shape())
    return absl::InvalidArgumentError("Add: operands must be F32 of one shape");
  const int64_t n = a.numel();
  const float* ap = a.data<const float>();
  const float* bp = b.data<const float>();
  float* op = out.data<float>();
#pragma omp parallel for schedule(static) if (n >= (1 << 18))
  for (int64_t i = 0; i < n; ++i) op[i] = ap[i] + bp[i];
  return absl::OkStatus();
}

absl::Status MoeCombine(const TensorView& h, const TensorView& expert_out,
                        const TensorView& weights, const TensorView& x_out) {
  EPX_RETURN_IF_ERROR(Check2dF32("MoeCombine", "h", h));
  EPX_RETURN_IF_ERROR(Check2dF32("MoeCombine", "expert_out", expert_out));
  EPX_RETURN_IF_ERROR(Check2dF32("MoeCombine", "weights", weights));
  const int64_t tokens = h.dim(0), hidden = h.dim(1), topk = weights.dim(1);
  if (weights.dim(0) != tokens || expert_out.dim(0) != tokens * topk ||
      expert_out.dim(1) != hidden || x_out.shape() != h.shape())
    return absl::InvalidArgumentError("MoeCombine: shapes do not agree");
#pragma omp parallel for schedule(static) if (tokens * hidden >= (1 << 16))
  for (int64_t t = 0; t < tokens; ++t) {
    const float* wt = weights.data<const float>() + t * topk;
    const float* hr = h.data<const float>() + t * hidden;
    float* xr = x_out.data<float>() + t * hidden;
    for (int64_t i = 0; i < hidden; ++i) {
      float acc = 0.f;
      for (int64_t j = 0; j < topk; ++j)
        acc += wt[j] * expert_out.data<const float>()[(t * topk + j) * hidden + i];
      xr[i] = hr[i] + acc;
    }
  }
  return absl::OkStatus();
}

}  // namespace epx::cpu
