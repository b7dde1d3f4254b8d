// Elementwise and row-wise kernels of a step: dtype conversion, the dummy-weight fill, embedding
// gather, RMSNorm (plain and fused with the residual add), RoPE with the KV-cache write, the MoE
// combine and SiLU-and-multiply.
//
// Design choices:
// - Row ops run one block per token row. A row (hidden 4096: 16 KiB of fp32) is about what one
//   block streams efficiently, its reduction then never leaves the block, and the block size
//   depends only on the row length: a row's result is computed by the same operations whatever
//   the number of rows, which is the CPU determinism contract (kernels/cpu/ops.h) carried over.
// - Each thread moves 8 elements per step through 16-byte loads and stores when the row length
//   and the base pointers allow it (every Mixtral shape does); otherwise the same kernel body runs
//   with scalar accesses, so the two paths differ in speed only.
// - RMSNorm accumulates the sum of squares in double, as the oracle does: the fp64 work is noise
//   in a bandwidth-bound kernel, and the norm scale then equals the oracle's except for the fp64
//   summation order, so outputs agree with it to the last fp32 bit in practice.
// - Where the oracle's fp32 expression is a plain product or sum, the kernels spell it with
//   __fmul_rn/__fadd_rn so nvcc cannot contract it into an FMA; where the oracle, built with
//   -ffp-contract=fast (kernels/cpu/CMakeLists.txt), forms an FMA (MoeCombine's acc += w * e) the
//   kernel uses fmaf. RoPE is tested with a tolerance since which product the host compiler fuses
//   is not specified.
// - Device-side indices (token ids, KV-cache rows, permuted rows) cannot be reported from a
//   kernel; the engine validates them on the host. Kernels still never access memory out of
//   bounds: an embedding row with a bad id is zeros, a bad KV row is not written, a bad combine
//   row contributes nothing.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/dummy_weights.h"
#include "kernels/cuda/check_args.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops.h"

namespace epx::cuda {
namespace {

using Bf16 = __nv_bfloat16;

// ---- host-side argument checks ----

absl::Status CheckGrid(const char* op, int64_t blocks) {
  if (blocks > INT32_MAX)
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", blocks, " rows exceed the grid"));
  return absl::OkStatus();
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads for one block per row of `chunks` work items: whole warps, at most 256.
int RowThreads(int64_t chunks) {
  return static_cast<int>(std::clamp<int64_t>((chunks + 31) / 32 * 32, 32, 256));
}

// Blocks of 256 threads for a grid-stride loop over `items`.
constexpr int kFlatThreads = 256;
int FlatBlocks(int64_t items) {
  return static_cast<int>(
      std::clamp<int64_t>((items + kFlatThreads - 1) / kFlatThreads, 1, 1 << 16));
}

// ---- device helpers ----

__device__ __forceinline__ float ToF32(float v) { return v; }
__device__ __forceinline__ float ToF32(Bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToF32(__half v) { return __half2float(v); }
__device__ __forceinline__ void FromF32(float v, float& out) { out = v; }
__device__ __forceinline__ void FromF32(float v, Bf16& out) { out = __float2bfloat16_rn(v); }

// kN elements moved as one aligned word (at most 16 bytes).
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T e[kN];
};

// Elements per word when a thread moves kW consecutive elements of T.
template <typename T, int kW>
inline constexpr int kPackOf = std::min<int>(kW, 16 / static_cast<int>(sizeof(T)));

// v = p[0..kW) widened to fp32. REQUIRES: p aligned to the word size when kW > 1.
template <int kW, typename T>
__device__ __forceinline__ void LoadF32(const T* p, float (&v)[kW]) {
  constexpr int kN = kPackOf<T, kW>;
  using P = Pack<T, kN>;
#pragma unroll
  for (int w = 0; w < kW / kN; ++w) {
    const P word = reinterpret_cast<const P*>(p)[w];
#pragma unroll
    for (int k = 0; k < kN; ++k) v[w * kN + k] = ToF32(word.e[k]);
  }
}

// p[0..kW) = v rounded to T (nearest even). REQUIRES: as LoadF32.
template <int kW, typename T>
__device__ __forceinline__ void StoreF32(T* p, const float (&v)[kW]) {
  constexpr int kN = kPackOf<T, kW>;
  using P = Pack<T, kN>;
#pragma unroll
  for (int w = 0; w < kW / kN; ++w) {
    P word;
#pragma unroll
    for (int k = 0; k < kN; ++k) FromF32(v[w * kN + k], word.e[k]);
    reinterpret_cast<P*>(p)[w] = word;
  }
}

// Sum over the block; every thread gets the same bits (the xor butterfly adds the same pairs in
// every lane). REQUIRES: called once per kernel by all threads, blockDim.x a multiple of 32.
__device__ double BlockSum(double v) {
  __shared__ double partial[32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---- kernels ----

// Grid-stride over words of kW elements, then the last n % kW elements one by one.
template <int kW, typename Src, typename Dst>
__global__ void ConvertKernel(const Src* src, Dst* dst, int64_t n) {
  const int64_t words = n / kW;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t w = first; w < words; w += stride) {
    float v[kW];
    LoadF32<kW>(src + w * kW, v);
    StoreF32<kW>(dst + w * kW, v);
  }
  const int64_t i = words * kW + first;
  if (i < n) FromF32(ToF32(src[i]), dst[i]);
}

template <int kW, typename Dst>
__global__ void FillDummyKernel(Dst* dst, int64_t n, uint64_t seed, float scale, float offset) {
  const int64_t words = n / kW;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // offset + scale * u without contraction, as the C++ expression evaluates on the host. The
  // fills in use (DummyFill::Matrix: offset 0; Ones: scale 0) give the same bits fused or not.
  auto value = [&](int64_t i) {
    return __fadd_rn(offset, __fmul_rn(scale, DummyUniform(seed, static_cast<uint64_t>(i))));
  };
  for (int64_t w = first; w < words; w += stride) {
    float v[kW];
#pragma unroll
    for (int k = 0; k < kW; ++k) v[k] = value(w * kW + k);
    StoreF32<kW>(dst + w * kW, v);
  }
  const int64_t i = words * kW + first;
  if (i < n) FromF32(value(i), dst[i]);
}

template <int kW>
__global__ void EmbeddingKernel(const int32_t* ids, const Bf16* table, int64_t vocab,
                                int64_t hidden, float* out) {
  const int64_t t = blockIdx.x;
  const int64_t id = ids[t];
  const bool valid = id >= 0 && id < vocab;
  for (int64_t i = threadIdx.x * kW; i < hidden; i += blockDim.x * kW) {
    float v[kW] = {};
    if (valid) LoadF32<kW>(table + id * hidden + i, v);
    StoreF32<kW>(out + t * hidden + i, v);
  }
}

// out = w * (x * inv_rms), per row; with kAdd, x += delta first (written back).
template <bool kAdd, int kW, typename Out>
__global__ void RmsNormKernel(float* x, const float* delta, const float* w, float eps, Out* out,
                              int64_t hidden) {
  const int64_t row = blockIdx.x;
  float* xr = x + row * hidden;
  double ss = 0.0;
  for (int64_t i = threadIdx.x * kW; i < hidden; i += blockDim.x * kW) {
    float v[kW];
    LoadF32<kW>(xr + i, v);
    if constexpr (kAdd) {
      float d[kW];
      LoadF32<kW>(delta + row * hidden + i, d);
#pragma unroll
      for (int k = 0; k < kW; ++k) v[k] = __fadd_rn(v[k], d[k]);
      StoreF32<kW>(xr + i, v);
    }
#pragma unroll
    for (int k = 0; k < kW; ++k) ss = fma(static_cast<double>(v[k]), static_cast<double>(v[k]), ss);
  }
  ss = BlockSum(ss);
  const float inv =
      static_cast<float>(1.0 / sqrt(ss / static_cast<double>(hidden) + static_cast<double>(eps)));
  // Each thread rereads the elements it wrote above, so its own stores are visible to it.
  for (int64_t i = threadIdx.x * kW; i < hidden; i += blockDim.x * kW) {
    float v[kW], wv[kW], y[kW];
    LoadF32<kW>(xr + i, v);
    LoadF32<kW>(w + i, wv);
#pragma unroll
    for (int k = 0; k < kW; ++k) y[k] = __fmul_rn(wv[k], __fmul_rn(v[k], inv));
    StoreF32<kW>(out + row * hidden + i, y);
  }
}

struct RopeShape {
  int64_t num_heads, num_kv_heads, head_dim, num_cache_rows;
};

// One block per token. Work items are kW-wide runs of rotation pairs (i, i + head_dim / 2) over
// the q and k heads, then kW-wide runs of v.
template <int kW>
__global__ void RopeQkvKernel(const float* qkv, const float* rope, const int32_t* kv_rows,
                              RopeShape s, Bf16* q_out, Bf16* k_cache, Bf16* v_cache) {
  const int64_t t = blockIdx.x;
  const int64_t half = s.head_dim / 2;
  const int64_t kv_width = s.num_kv_heads * s.head_dim;
  const float* src = qkv + t * (s.num_heads + 2 * s.num_kv_heads) * s.head_dim;
  const float* cos_t = rope + t * s.head_dim;
  const float* sin_t = cos_t + half;
  const int64_t row = kv_rows[t];
  const bool row_ok = row >= 0 && row < s.num_cache_rows;
  const int64_t rot_items = (s.num_heads + s.num_kv_heads) * half / kW;
  for (int64_t c = threadIdx.x; c < rot_items; c += blockDim.x) {
    const int64_t head = c * kW / half, i = c * kW % half;
    if (head >= s.num_heads && !row_ok) continue;
    const float* hv = src + head * s.head_dim;
    float a[kW], b[kW], co[kW], si[kW], lo[kW], hi[kW];
    LoadF32<kW>(hv + i, a);
    LoadF32<kW>(hv + half + i, b);
    LoadF32<kW>(cos_t + i, co);
    LoadF32<kW>(sin_t + i, si);
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      lo[k] = fmaf(a[k], co[k], -__fmul_rn(b[k], si[k]));  // x1 * cos - x2 * sin
      hi[k] = fmaf(b[k], co[k], __fmul_rn(a[k], si[k]));   // x2 * cos + x1 * sin
    }
    Bf16* dst = head < s.num_heads ? q_out + (t * s.num_heads + head) * s.head_dim
                                   : k_cache + row * kv_width + (head - s.num_heads) * s.head_dim;
    StoreF32<kW>(dst + i, lo);
    StoreF32<kW>(dst + half + i, hi);
  }
  if (!row_ok) return;
  const float* v_src = src + (s.num_heads + s.num_kv_heads) * s.head_dim;
  for (int64_t i = threadIdx.x * kW; i < kv_width; i += blockDim.x * kW) {
    float v[kW];
    LoadF32<kW>(v_src + i, v);
    StoreF32<kW>(v_cache + row * kv_width + i, v);
  }
}

// x[t] += sum_j weights[t, j] * expert_out[row(t, j)], the sum formed first, in j order.
template <int kW, typename E>
__global__ void MoeCombineKernel(float* x, const E* expert_out, int64_t num_rows,
                                 const int32_t* row_of_slot, const float* weights, int64_t num_topk,
                                 int64_t hidden) {
  const int64_t t = blockIdx.x;
  for (int64_t i = threadIdx.x * kW; i < hidden; i += blockDim.x * kW) {
    float acc[kW] = {};
    for (int64_t j = 0; j < num_topk; ++j) {
      const int64_t slot = t * num_topk + j;
      const int64_t r = row_of_slot != nullptr ? int64_t{row_of_slot[slot]} : slot;
      if (r < 0 || r >= num_rows) continue;
      const float wj = weights[slot];
      float e[kW];
      LoadF32<kW>(expert_out + r * hidden + i, e);
#pragma unroll
      for (int k = 0; k < kW; ++k) acc[k] = fmaf(wj, e[k], acc[k]);
    }
    float v[kW];
    LoadF32<kW>(x + t * hidden + i, v);
#pragma unroll
    for (int k = 0; k < kW; ++k) v[k] = __fadd_rn(v[k], acc[k]);
    StoreF32<kW>(x + t * hidden + i, v);
  }
}

// Grid-stride over kW-wide runs of the [num_rows, inter] output.
template <int kW>
__global__ void SiluMulKernel(const Bf16* gate_up, Bf16* out, int64_t num_rows, int64_t inter) {
  const int64_t runs_per_row = inter / kW;
  const int64_t runs = num_rows * runs_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < runs;
       c += stride) {
    const int64_t r = c / runs_per_row, i = c % runs_per_row * kW;
    float g[kW], u[kW], y[kW];
    LoadF32<kW>(gate_up + r * 2 * inter + i, g);
    LoadF32<kW>(gate_up + r * 2 * inter + inter + i, u);
#pragma unroll
    for (int k = 0; k < kW; ++k) y[k] = g[k] / (1.f + expf(-g[k])) * u[k];
    StoreF32<kW>(out + r * inter + i, y);
  }
}

// Calls f(T{}) with T the device type of `dtype` (float or Bf16).
template <typename F>
void WithFloatOrBf16(DType dtype, F&& f) {
  if (dtype == DType::kF32) {
    f(float{});
  } else {
    f(Bf16{});
  }
}

}  // namespace

absl::Status Convert(const TensorView& src, const TensorView& dst, StreamHandle stream) {
  if (src.numel() != dst.numel())
    return absl::InvalidArgumentError(absl::StrCat("Convert: src ", ShapeString(src.shape()),
                                                   " and dst ", ShapeString(dst.shape()),
                                                   " differ in size"));
  auto check = [](const char* name, const TensorView& t, std::initializer_list<DType> dtypes) {
    // Any rank: check the dtype and data only.
    if (std::find(dtypes.begin(), dtypes.end(), t.dtype()) == dtypes.end())
      return absl::InvalidArgumentError(
          absl::StrCat("Convert: ", name, " must be ", DTypeList(dtypes), ", got ",
                       DTypeName(t.dtype()), " ", ShapeString(t.shape())));
    if (t.numel() > 0 && t.empty())
      return absl::InvalidArgumentError(absl::StrCat("Convert: ", name, " has no data"));
    return absl::OkStatus();
  };
  EPX_RETURN_IF_ERROR(check("src", src, {DType::kF32, DType::kF16, DType::kBF16}));
  EPX_RETURN_IF_ERROR(check("dst", dst, {DType::kBF16, DType::kF32}));
  const int64_t n = src.numel();
  if (n == 0) return absl::OkStatus();
  if (src.dtype() == dst.dtype()) {
    EPX_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice, stream));
    return absl::OkStatus();
  }
  const bool vec = Aligned16(src.raw()) && Aligned16(dst.raw());
  auto launch = [&](auto src_tag, auto dst_tag) {
    using S = decltype(src_tag);
    using D = decltype(dst_tag);
    if (vec) {
      ConvertKernel<8>
          <<<FlatBlocks(n / 8), kFlatThreads, 0, stream>>>(src.data<const S>(), dst.data<D>(), n);
    } else {
      ConvertKernel<1>
          <<<FlatBlocks(n), kFlatThreads, 0, stream>>>(src.data<const S>(), dst.data<D>(), n);
    }
  };
  WithFloatOrBf16(dst.dtype(), [&](auto dst_tag) {
    switch (src.dtype()) {
      case DType::kF32:
        launch(float{}, dst_tag);
        break;
      case DType::kF16:
        launch(__half{}, dst_tag);
        break;
      default:
        launch(Bf16{}, dst_tag);
        break;
    }
  });
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status FillDummy(const TensorView& dst, uint64_t seed, float scale, float offset,
                       StreamHandle stream) {
  if (dst.dtype() != DType::kBF16 && dst.dtype() != DType::kF32)
    return absl::InvalidArgumentError(absl::StrCat("FillDummy: dst must be BF16 or F32, got ",
                                                   DTypeName(dst.dtype()), " ",
                                                   ShapeString(dst.shape())));
  const int64_t n = dst.numel();
  if (n == 0) return absl::OkStatus();
  if (dst.empty()) return absl::InvalidArgumentError("FillDummy: dst has no data");
  const bool vec = Aligned16(dst.raw());
  WithFloatOrBf16(dst.dtype(), [&](auto tag) {
    using D = decltype(tag);
    if (vec) {
      FillDummyKernel<8>
          <<<FlatBlocks(n / 8), kFlatThreads, 0, stream>>>(dst.data<D>(), n, seed, scale, offset);
    } else {
      FillDummyKernel<1>
          <<<FlatBlocks(n), kFlatThreads, 0, stream>>>(dst.data<D>(), n, seed, scale, offset);
    }
  });
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status Embedding(const TensorView& ids, const TensorView& table, const TensorView& out,
                       StreamHandle stream) {
  EPX_RETURN_IF_ERROR(CheckTensor("Embedding", "ids", ids, {DType::kI32}, {-1}));
  EPX_RETURN_IF_ERROR(CheckTensor("Embedding", "table", table, {DType::kBF16}, {-1, -1}));
  const int64_t num_tokens = ids.dim(0), vocab = table.dim(0), hidden = table.dim(1);
  EPX_RETURN_IF_ERROR(CheckTensor("Embedding", "out", out, {DType::kF32}, {num_tokens, hidden}));
  EPX_RETURN_IF_ERROR(CheckGrid("Embedding", num_tokens));
  if (num_tokens == 0 || hidden == 0) return absl::OkStatus();
  const bool vec = hidden % 8 == 0 && Aligned16(table.raw()) && Aligned16(out.raw());
  if (vec) {
    EmbeddingKernel<8><<<num_tokens, RowThreads(hidden / 8), 0, stream>>>(
        ids.data<const int32_t>(), table.data<const Bf16>(), vocab, hidden, out.data<float>());
  } else {
    EmbeddingKernel<1><<<num_tokens, RowThreads(hidden), 0, stream>>>(
        ids.data<const int32_t>(), table.data<const Bf16>(), vocab, hidden, out.data<float>());
  }
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

namespace {

// RmsNorm, and AddRmsNorm when `add` (delta unused otherwise).
absl::Status LaunchRmsNorm(const char* op, const TensorView& x, bool add, const TensorView& delta,
                           const TensorView& w, float eps, const TensorView& out,
                           StreamHandle stream) {
  EPX_RETURN_IF_ERROR(CheckTensor(op, "x", x, {DType::kF32}, {-1, -1}));
  const int64_t num_tokens = x.dim(0), hidden = x.dim(1);
  if (add)
    EPX_RETURN_IF_ERROR(CheckTensor(op, "delta", delta, {DType::kF32}, {num_tokens, hidden}));
  EPX_RETURN_IF_ERROR(CheckTensor(op, "w", w, {DType::kF32}, {hidden}));
  EPX_RETURN_IF_ERROR(
      CheckTensor(op, "out", out, {DType::kBF16, DType::kF32}, {num_tokens, hidden}));
  EPX_RETURN_IF_ERROR(CheckGrid(op, num_tokens));
  if (num_tokens == 0 || hidden == 0) return absl::OkStatus();
  const bool vec = hidden % 8 == 0 && Aligned16(x.raw()) && Aligned16(w.raw()) &&
                   Aligned16(out.raw()) && (!add || Aligned16(delta.raw()));
  const int threads = RowThreads(vec ? hidden / 8 : hidden);
  float* xp = x.data<float>();
  const float* dp = delta.data<const float>();
  const float* wp = w.data<const float>();
  WithFloatOrBf16(out.dtype(), [&](auto tag) {
    using Out = decltype(tag);
    Out* op_out = out.data<Out>();
    if (add && vec) {
      RmsNormKernel<true, 8><<<num_tokens, threads, 0, stream>>>(xp, dp, wp, eps, op_out, hidden);
    } else if (add) {
      RmsNormKernel<true, 1><<<num_tokens, threads, 0, stream>>>(xp, dp, wp, eps, op_out, hidden);
    } else if (vec) {
      RmsNormKernel<false, 8><<<num_tokens, threads, 0, stream>>>(xp, dp, wp, eps, op_out, hidden);
    } else {
      RmsNormKernel<false, 1><<<num_tokens, threads, 0, stream>>>(xp, dp, wp, eps, op_out, hidden);
    }
  });
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

}  // namespace

absl::Status RmsNorm(const TensorView& x, const TensorView& w, float eps, const TensorView& out,
                     StreamHandle stream) {
  return LaunchRmsNorm("RmsNorm", x, /*add=*/false, TensorView(), w, eps, out, stream);
}

absl::Status AddRmsNorm(const TensorView& x, const TensorView& delta, const TensorView& w,
                        float eps, const TensorView& out, StreamHandle stream) {
  return LaunchRmsNorm("AddRmsNorm", x, /*add=*/true, delta, w, eps, out, stream);
}

absl::Status RopeQkvToCache(const TensorView& qkv, const TensorView& rope,
                            const TensorView& kv_rows, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, const TensorView& q_out, const TensorView& k_cache,
                            const TensorView& v_cache, StreamHandle stream) {
  constexpr const char* kOp = "RopeQkvToCache";
  if (num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0)
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": num_heads (", num_heads, ") and num_kv_heads (", num_kv_heads,
                     ") must be positive and head_dim (", head_dim, ") positive and even"));
  EPX_RETURN_IF_ERROR(
      CheckTensor(kOp, "qkv", qkv, {DType::kF32}, {-1, (num_heads + 2 * num_kv_heads) * head_dim}));
  const int64_t num_tokens = qkv.dim(0);
  const int64_t kv_width = num_kv_heads * head_dim;
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "rope", rope, {DType::kF32}, {num_tokens, head_dim}));
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "kv_rows", kv_rows, {DType::kI32}, {num_tokens}));
  EPX_RETURN_IF_ERROR(
      CheckTensor(kOp, "q_out", q_out, {DType::kBF16}, {num_tokens, num_heads * head_dim}));
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "k_cache", k_cache, {DType::kBF16}, {-1, kv_width}));
  EPX_RETURN_IF_ERROR(
      CheckTensor(kOp, "v_cache", v_cache, {DType::kBF16}, {k_cache.dim(0), kv_width}));
  EPX_RETURN_IF_ERROR(CheckGrid(kOp, num_tokens));
  if (num_tokens == 0) return absl::OkStatus();
  const RopeShape shape{num_heads, num_kv_heads, head_dim, k_cache.dim(0)};
  const bool vec = head_dim % 8 == 0 && Aligned16(qkv.raw()) && Aligned16(rope.raw()) &&
                   Aligned16(q_out.raw()) && Aligned16(k_cache.raw()) && Aligned16(v_cache.raw());
  const int64_t pairs = (num_heads + num_kv_heads) * head_dim / 2;
  if (vec) {
    RopeQkvKernel<4><<<num_tokens, RowThreads(pairs / 4), 0, stream>>>(
        qkv.data<const float>(), rope.data<const float>(), kv_rows.data<const int32_t>(), shape,
        q_out.data<Bf16>(), k_cache.data<Bf16>(), v_cache.data<Bf16>());
  } else {
    RopeQkvKernel<1><<<num_tokens, RowThreads(pairs), 0, stream>>>(
        qkv.data<const float>(), rope.data<const float>(), kv_rows.data<const int32_t>(), shape,
        q_out.data<Bf16>(), k_cache.data<Bf16>(), v_cache.data<Bf16>());
  }
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status MoeCombine(const TensorView& x, const TensorView& expert_out,
                        const TensorView& row_of_slot, const TensorView& weights,
                        StreamHandle stream) {
  constexpr const char* kOp = "MoeCombine";
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "x", x, {DType::kF32}, {-1, -1}));
  const int64_t num_tokens = x.dim(0), hidden = x.dim(1);
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "weights", weights, {DType::kF32}, {num_tokens, -1}));
  const int64_t num_topk = weights.dim(1);
  EPX_RETURN_IF_ERROR(
      CheckTensor(kOp, "expert_out", expert_out, {DType::kBF16, DType::kF32}, {-1, hidden}));
  const bool permuted = !row_of_slot.empty();
  if (permuted) {
    EPX_RETURN_IF_ERROR(
        CheckTensor(kOp, "row_of_slot", row_of_slot, {DType::kI32}, {num_tokens * num_topk}));
  } else if (expert_out.dim(0) < num_tokens * num_topk) {
    return absl::InvalidArgumentError(absl::StrCat(
        kOp, ": expert_out ", ShapeString(expert_out.shape()), " has fewer than num_tokens * ",
        "num_topk = ", num_tokens * num_topk, " rows (slot order, no row_of_slot)"));
  }
  EPX_RETURN_IF_ERROR(CheckGrid(kOp, num_tokens));
  if (num_tokens == 0 || hidden == 0 || num_topk == 0) return absl::OkStatus();
  const bool vec = hidden % 8 == 0 && Aligned16(x.raw()) && Aligned16(expert_out.raw());
  const int threads = RowThreads(vec ? hidden / 8 : hidden);
  const int32_t* rows = permuted ? row_of_slot.data<const int32_t>() : nullptr;
  WithFloatOrBf16(expert_out.dtype(), [&](auto tag) {
    using E = decltype(tag);
    if (vec) {
      MoeCombineKernel<8><<<num_tokens, threads, 0, stream>>>(
          x.data<float>(), expert_out.data<const E>(), expert_out.dim(0), rows,
          weights.data<const float>(), num_topk, hidden);
    } else {
      MoeCombineKernel<1><<<num_tokens, threads, 0, stream>>>(
          x.data<float>(), expert_out.data<const E>(), expert_out.dim(0), rows,
          weights.data<const float>(), num_topk, hidden);
    }
  });
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

absl::Status SiluMul(const TensorView& gate_up, const TensorView& out, StreamHandle stream) {
  EPX_RETURN_IF_ERROR(CheckTensor("SiluMul", "gate_up", gate_up, {DType::kBF16}, {-1, -1}));
  const int64_t num_rows = gate_up.dim(0), inter = gate_up.dim(1) / 2;
  if (gate_up.dim(1) % 2 != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "SiluMul: gate_up ", ShapeString(gate_up.shape()), " must have an even number of columns"));
  EPX_RETURN_IF_ERROR(CheckTensor("SiluMul", "out", out, {DType::kBF16}, {num_rows, inter}));
  if (num_rows == 0 || inter == 0) return absl::OkStatus();
  const bool vec = inter % 8 == 0 && Aligned16(gate_up.raw()) && Aligned16(out.raw());
  if (vec) {
    SiluMulKernel<8><<<FlatBlocks(num_rows * inter / 8), kFlatThreads, 0, stream>>>(
        gate_up.data<const Bf16>(), out.data<Bf16>(), num_rows, inter);
  } else {
    SiluMulKernel<1><<<FlatBlocks(num_rows * inter), kFlatThreads, 0, stream>>>(
        gate_up.data<const Bf16>(), out.data<Bf16>(), num_rows, inter);
  }
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

}  // namespace epx::cuda
