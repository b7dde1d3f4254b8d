// y = x @ w^T with a fixed per-element reduction order: element (m, n) accumulates x[m, k] *
// w[n, k] into 16 lanes by k mod 16 in ascending k, sums the lanes in order, then adds the
// k % 16 tail in order. Register blocking (up to 4 rows x 4 outputs) and the threading only
// change which elements are computed together, never how one is computed, so a row's result does
// not depend on the other rows. (A BLAS sgemm picks kernels by matrix size, which changes the
// summation order; see docs/ARCHITECTURE.md.)
#include <algorithm>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/simd.h"

namespace epx::cpu {
namespace {

using simd::F32x16;
using simd::kLanes;

constexpr int kMr = 4;        // rows of x per micro tile
constexpr int kNr = 4;        // rows of w per micro tile
constexpr int64_t kNb = 64;   // rows of w per thread task (kept in L2 across row tiles)
constexpr int64_t kMc = 256;  // rows of x per pass

template <typename W, int MR, int NR>
void MicroTile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k, float* y,
               int64_t ldy) {
  F32x16 acc[MR][NR] = {};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    F32x16 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = simd::Load(w + r * ldw + i);
    for (int m = 0; m < MR; ++m) {
      const F32x16 xv = simd::Load(x + m * ldx + i);
      for (int r = 0; r < NR; ++r) acc[m][r] += xv * wv[r];
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int r = 0; r < NR; ++r) {
      float s = simd::ReduceSum(acc[m][r]);
      for (int64_t j = i; j < k; ++j) s += x[m * ldx + j] * simd::ToF32(w[r * ldw + j]);
      y[m * ldy + r] = s;
    }
  }
}

template <typename W, int MR>
void MicroRow(int nr, const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k, float* y,
              int64_t ldy) {
  switch (nr) {
    case 4:
      return MicroTile<W, MR, 4>(x, ldx, w, ldw, k, y, ldy);
    case 3:
      return MicroTile<W, MR, 3>(x, ldx, w, ldw, k, y, ldy);
    case 2:
      return MicroTile<W, MR, 2>(x, ldx, w, ldw, k, y, ldy);
    default:
      return MicroTile<W, MR, 1>(x, ldx, w, ldw, k, y, ldy);
  }
}

template <typename W>
void Micro(int mr, int nr, const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k,
           float* y, int64_t ldy) {
  switch (mr) {
    case 4:
      return MicroRow<W, 4>(nr, x, ldx, w, ldw, k, y, ldy);
    case 3:
      return MicroRow<W, 3>(nr, x, ldx, w, ldw, k, y, ldy);
    case 2:
      return MicroRow<W, 2>(nr, x, ldx, w, ldw, k, y, ldy);
    default:
      return MicroRow<W, 1>(nr, x, ldx, w, ldw, k, y, ldy);
  }
}

template <typename W>
void LinearImpl(const float* x, const W* w, float* y, int64_t m, int64_t n, int64_t k) {
  const int64_t num_blocks = (n + kNb - 1) / kNb;
  const int64_t tasks = num_blocks * ((m + kMc - 1) / kMc);
  // Small problems are not worth waking the thread team.
  const bool parallel = m * n * k >= (int64_t{1} << 18) && tasks > 1;
#pragma omp parallel if (parallel)
  for (int64_t mc = 0; mc < m; mc += kMc) {
    const int64_t mc_end = std::min(m, mc + kMc);
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int64_t n0 = b * kNb;
      const int64_t n1 = std::min(n, n0 + kNb);
      for (int64_t m0 = mc; m0 < mc_end; m0 += kMr) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, mc_end - m0));
        for (int64_t r0 = n0; r0 < n1; r0 += kNr) {
          const int nr = static_cast<int>(std::min<int64_t>(kNr, n1 - r0));
          Micro<W>(mr, nr, x + m0 * k, k, w + r0 * k, k, k, y + m0 * n + r0, n);
        }
      }
    }
  }
}

}  // namespace

absl::Status Linear(const TensorView& x, const TensorView& w, const TensorView& y) {
  if (x.rank() != 2 || w.rank() != 2 || y.rank() != 2 || x.dtype() != DType::kF32 ||
      y.dtype() != DType::kF32)
    return absl::InvalidArgumentError("Linear: x and y must be 2-D F32, w 2-D");
  const int64_t m = x.dim(0), k = x.dim(1), n = w.dim(0);
  if (w.dim(1) != k || y.dim(0) != m || y.dim(1) != n)
    return absl::InvalidArgumentError(absl::StrCat("Linear: shapes x ", ShapeString(x.shape()),
                                                   ", w ", ShapeString(w.shape()), ", y ",
                                                   ShapeString(y.shape()), " do not agree"));
  if (m == 0 || n == 0) return absl::OkStatus();
  switch (w.dtype()) {
    case DType::kF32:
      LinearImpl(x.data<const float>(), w.data<const float>(), y.data<float>(), m, n, k);
      break;
    case DType::kBF16:
      LinearImpl(x.data<const float>(), w.data<const simd::Bf16>(), y.data<float>(), m, n, k);
      break;
    case DType::kF16:
      LinearImpl(x.data<const float>(), w.data<const simd::F16>(), y.data<float>(), m, n, k);
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("Linear: weight dtype ", DTypeName(w.dtype()), " is not supported"));
  }
  return absl::OkStatus();
}

}  // namespace epx::cpu
