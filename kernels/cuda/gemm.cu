// The GEMMs of the model on the GPU: Linear (attention projections, router, LM head) and the
// grouped expert FFN, plus FP8 row-wise weight quantisation.
//
// Linear is one cuBLAS call. cuBLAS is column-major, so the row-major y[m, n] = x[m, k] w[n, k]^T
// is issued as the column-major y^T[n, m] = w * x^T (op T on w): no copy, no transpose kernel.
// cuBLAS picks kernels (and split-K) by shape, so unlike cpu::Linear a row's bits may change with
// the number of rows; the GPU contract is "within tolerance of the oracle" (docs/ARCHITECTURE.md, "CUDA backend").
//
// GroupedSwiGlu runs out = w2(silu(w1 x) * (w3 x)) for rows grouped by expert, in three forms
// because the right one depends on how many rows each expert gets:
//
// - kSkinny (decode, few rows): the work is reading the weights. Mixtral's w13 is 235 MB per
//   expert in BF16 and one decode row per expert does 2 FLOPs per weight, so a GEMM tiled for
//   large M wastes its tile and, worse, cuBLAS's small-M heuristics rarely stream HBM at full
//   rate. The skinny kernel reads every weight row of a group exactly once, with 16-byte loads
//   that bypass L1, and multiplies it against all of the group's rows (<= kSkinnyMaxRows) on the
//   tensor cores with the operands swapped: weight rows are the MMA's M (16 per tile), tokens its
//   N (8 per tile), so one token costs the same as eight. Each lane loads 16 contiguous bytes of a
//   weight row and of a token row; the K positions inside an MMA are permuted identically for
//   both operands (a dot product does not care about order), which is what lets a plain 16-byte
//   load feed the fragment registers directly. A block owns 32 weight rows and splits K over its
//   8 warps; partial sums meet in shared memory in a fixed order, so results are deterministic
//   and a row's output does not depend on the other rows. The group of a block is found on the
//   device from `offsets` (no host round trip), and the grid only spans min(groups, rows) groups
//   so that decode does not launch thousands of empty blocks. FP8 e4m3 weights are widened to
//   BF16 in registers (exactly: a byte shuffle and one bf16x2 multiply by 2^120) and the per-row
//   scale is applied to the fp32 sum, so FP8 decode reads half the bytes of BF16.
// - kCublasLoop (prefill, many rows): compute-bound; one cuBLAS GEMM per non-empty group for w13
//   into a BF16 gate|up buffer, SiluMul, one GEMM for w2. With FP8 weights each expert matrix is
//   first dequantised to BF16 into scratch (fp8 * scale rounded to bf16) and the BF16 GEMM runs
//   on it. That costs 5 bytes of traffic per weight instead of 2, which is fine where compute
//   dominates (hundreds of rows per expert) and is why FP8 decode takes the skinny kernel.
// - kCublasGrouped: cublasGemmGroupedBatchedEx (cuBLAS 12.5+), one call for the w13 GEMMs of all
//   groups, one SiluMul over all rows, one call for w2; the pointer arrays are written into
//   scratch by a tiny kernel (cuBLAS reads them on the device). With FP8 weights it runs the
//   per-group form: keeping every dequantised expert resident would need 3 * hidden *
//   intermediate * 2 bytes of scratch per expert, which defeats the point of FP8.
//
// kAuto takes kSkinny up to kSkinnyMaxRows rows and kCublasLoop above; bench/
// cuda_moe_layer_bench measures all three forms per token count, and decides this.
//
// Numerics: every product accumulates in fp32; gate|up and the SiluMul output are rounded to BF16
// (as the engine stores activations); outputs are rounded to BF16 once.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/check_args.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops.h"

namespace epx::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Host helpers

std::string Describe(const TensorView& t) {
  return absl::StrCat(DTypeName(t.dtype()), " ", ShapeString(t.shape()));
}

bool FitsInt(int64_t v) { return v >= 0 && v <= INT_MAX; }

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

constexpr size_t AlignUp(size_t bytes, size_t alignment = 256) {
  return (bytes + alignment - 1) / alignment * alignment;
}

// FailedPrecondition unless `blas` holds a cuBLAS handle. A Blas without one was not made by
// Blas::Create() (or was moved from): cuBLAS cannot run on it, and a default-constructed one has
// no stream either, so the work that only needs the stream (the skinny kernel, the k = 0 memset)
// would go to the legacy default stream, unordered with the caller's work. Checked after the
// arguments, so that an argument error is reported as such whatever the Blas.
absl::Status CheckBlas(const char* op, const Blas& blas) {
  if (blas.handle() == nullptr)
    return absl::FailedPreconditionError(
        absl::StrCat(op, ": blas has no cuBLAS handle (not made by Blas::Create)"));
  return absl::OkStatus();
}

// Row-major y[m, n] = x[m, k] @ w[n, k]^T (+ beta * y), BF16 inputs, fp32 accumulation. Row
// strides are ldx, ldw, ldy elements. REQUIRES: m, n, k >= 1 and all fit in int.
absl::Status GemmXWt(const Blas& blas, const void* x, int64_t ldx, const void* w, int64_t ldw,
                     void* y, cudaDataType y_type, int64_t ldy, int64_t m, int64_t n, int64_t k,
                     float beta) {
  const float alpha = 1.f;
  EPX_CUBLAS_RETURN_IF_ERROR(
      cublasGemmEx(blas.handle(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
                   static_cast<int>(m), static_cast<int>(k), &alpha, w, CUDA_R_16BF,
                   static_cast<int>(ldw), x, CUDA_R_16BF, static_cast<int>(ldx), &beta, y, y_type,
                   static_cast<int>(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Device helpers

// 16 bytes from global memory, or zeros when !pred. kStream: weights are streamed once, and
// L1::no_allocate keeps them from evicting the token rows, which every block re-reads (those are
// loaded cached, kStream false).
template <bool kStream>
struct LoadHint {
  static constexpr char kText[] = ".L1::no_allocate";
};
template <>
struct LoadHint<false> {
  static constexpr char kText[] = "";
};

template <bool kStream>
__device__ __forceinline__ uint4 Load16(const void* p, bool pred) {
  uint4 v;
  asm("{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %5, 0;\n"
      "  mov.b32 %0, 0;\n"
      "  mov.b32 %1, 0;\n"
      "  mov.b32 %2, 0;\n"
      "  mov.b32 %3, 0;\n"
      "  @p ld.global.nc%6.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(static_cast<int>(pred)), "C"(LoadHint<kStream>::kText));
  return v;
}

// d += a * b for one m16n8k16 tile: a 16x16 BF16 (row), b 16x8 BF16 (col), d 16x8 fp32.
__device__ __forceinline__ void MmaBf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two e4m3 values, each moved into a bf16 with the same sign, exponent and mantissa bits (e4m3
// bits 6..0 to bf16 bits 10..4), which is the e4m3 value times 2^-120 for normal and subnormal
// codes alike; one bf16x2 multiply by 2^120 (exact: a power of two, subnormals kept) restores it.
// Exact for every finite code; the NaN codes become 480, and quantised weights never hold them.
__device__ __forceinline__ uint32_t E4m3PairAtBf16BitsToBf16(uint32_t shuffled) {
  const uint32_t bits = (shuffled & 0x80008000u) | ((shuffled >> 4) & 0x07f007f0u);
  uint32_t out;
  // 0x7b80 is bf16 2^120; adding -0 keeps the sign of zeros.
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n"
      : "=r"(out)
      : "r"(bits), "r"(0x7b807b80u), "r"(0x80008000u));
  return out;
}

// Four e4m3 bytes (b0 lowest) to bf16 pairs: lo = (b0, b1), hi = (b2, b3), low half first.
__device__ __forceinline__ void E4m3x4ToBf16(uint32_t v, uint32_t& lo, uint32_t& hi) {
  // byte_perm puts each byte in the high byte of its 16-bit half, zeros below.
  lo = E4m3PairAtBf16BitsToBf16(__byte_perm(v, 0u, 0x1404));
  hi = E4m3PairAtBf16BitsToBf16(__byte_perm(v, 0u, 0x3424));
}

// ---------------------------------------------------------------------------------------------
// The skinny grouped kernel

constexpr int kSkinnyWarps = 8;
constexpr int kSkinnyThreads = kSkinnyWarps * 32;
constexpr int kSkinnyBlockRows = 32;     // weight rows (output columns) per block: 2 MMA tiles
constexpr int kSkinnyMaxTokenTiles = 8;  // 8 tokens per MMA tile: kSkinnyMaxRows = 64
constexpr int kSkinnyReduceTiles = 4;    // token tiles reduced through shared memory at once
constexpr int kSkinnyReduceStride = 36;  // floats per token row of the reduction buffer: the
                                         // fragment stores of a warp hit 32 distinct banks
static_assert(kSkinnyMaxRows == kSkinnyMaxTokenTiles * 8);
// Experts one skinny launch can address (RouterTopK's limit); the pointers travel as kernel
// parameters (4 KiB, within sm_70+'s 32 KiB parameter space since CUDA 12.1).
constexpr int kSkinnyMaxGroups = 256;

struct SkinnyWeights {
  const void* w[kSkinnyMaxGroups];       // [n, k] BF16 or F8E4M3; nullptr: not loaded
  const float* scale[kSkinnyMaxGroups];  // [n] F32 (FP8 only)
};

struct SkinnyArgs {
  const __nv_bfloat16* x = nullptr;  // [num_rows, k]
  __nv_bfloat16* y = nullptr;        // [num_rows, n]
  const int32_t* offsets = nullptr;  // [num_groups + 1]
  int num_groups = 0;
  int num_rows = 0;
  int n = 0;  // multiple of 16
  int k = 0;  // multiple of 16
};

// y[r, :] = x[r, :] @ W_g^T for the rows r of group g, where g is the blockIdx.y-th non-empty
// group; block x covers weight rows [32 * blockIdx.x, +32). kTokenTiles * 8 >= the most rows any
// group can have (the host picks it from num_rows).
template <bool kFp8, int kTokenTiles>
__global__ void __launch_bounds__(kSkinnyThreads, kTokenTiles <= 2 ? 2 : 1)
    SkinnyGroupedGemmKernel(SkinnyArgs args, const __grid_constant__ SkinnyWeights weights) {
  constexpr int kElemBytes = kFp8 ? 1 : 2;
  constexpr int kElemsPerLoad = 16 / kElemBytes;  // per lane per step: 8 bf16 or 16 fp8
  constexpr int kHalves = kElemsPerLoad / 8;      // 8-element pieces: 2 MMAs each
  constexpr int kStepK = 4 * kElemsPerLoad;       // K a warp covers per step (4 lanes per row)
  // Weight bytes in flight per lane: kUnroll * 4 * 16. The token fragments of a step take
  // kTokenTiles * kHalves * 4 registers; fewer of them leave room for more steps in flight.
  constexpr int kTokenPieces = kTokenTiles * kHalves;
  constexpr int kUnroll = kTokenPieces <= 2 ? 4 : (kTokenPieces <= 4 ? 2 : 1);
  constexpr int kReduceTiles = kTokenTiles < kSkinnyReduceTiles ? kTokenTiles : kSkinnyReduceTiles;

  __shared__ int s_group, s_begin, s_end;
  __shared__ float s_partial[kSkinnyWarps][kReduceTiles * 8][kSkinnyReduceStride];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  // Find the blockIdx.y-th non-empty group: one warp scans the offsets 32 groups at a time.
  if (warp == 0) {
    int want = static_cast<int>(blockIdx.y);
    int found = -1, begin = 0, end = 0;
    for (int base = 0; base < args.num_groups; base += 32) {
      const int g = base + lane;
      int b = 0, e = 0;
      if (g < args.num_groups) {
        // Clamped so that inconsistent offsets cannot send a block outside x or y.
        b = min(max(args.offsets[g], 0), args.num_rows);
        e = min(max(args.offsets[g + 1], b), args.num_rows);
      }
      const bool nonempty = e > b;
      const unsigned mask = __ballot_sync(0xffffffffu, nonempty);
      const int count = __popc(mask);
      if (want < count) {
        const int before = __popc(mask & ((1u << lane) - 1u));
        const unsigned hit = __ballot_sync(0xffffffffu, nonempty && before == want);
        const int src = __ffs(hit) - 1;
        found = base + src;
        begin = __shfl_sync(0xffffffffu, b, src);
        end = __shfl_sync(0xffffffffu, e, src);
        break;
      }
      want -= count;
    }
    if (lane == 0) {
      s_group = found;
      s_begin = begin;
      s_end = end;
    }
  }
  __syncthreads();
  const int group = s_group;
  if (group < 0 || weights.w[group] == nullptr) return;  // uniform over the block
  const int row_begin = s_begin;
  const int rows = min(s_end - s_begin, kTokenTiles * 8);
  const int active_tiles = (rows + 7) / 8;

  const int n = args.n, k = args.k;
  const int g = lane >> 2;  // MMA group: weight row g (and g + 8) of a tile, token g of a tile
  const int t = lane & 3;   // position in the group: which 16 bytes of the step
  const int n_base = blockIdx.x * kSkinnyBlockRows;
  const bool tile_ok[2] = {n_base < n, n_base + 16 < n};  // n is a multiple of 16

  const uint8_t* w_bytes = static_cast<const uint8_t*>(weights.w[group]);
  const uint8_t* w_row[2][2];  // [tile][row g, row g + 8]
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = tile_ok[a] ? n_base + a * 16 + h * 8 + g : 0;
      w_row[a][h] = w_bytes + row * k * kElemBytes;
    }
  }
  const __nv_bfloat16* x_row[kTokenTiles];
  bool token_ok[kTokenTiles];
#pragma unroll
  for (int j = 0; j < kTokenTiles; ++j) {
    const int token = j * 8 + g;
    token_ok[j] = token < rows;
    x_row[j] = args.x + static_cast<int64_t>(row_begin + (token_ok[j] ? token : 0)) * k;
  }

  float acc[2][kTokenTiles][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int j = 0; j < kTokenTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][j][c] = 0.f;

  // Fragment layout of m16n8k16 (PTX ISA): lane (g, t) holds A[g][2t..2t+1], A[g+8][2t..2t+1],
  // A[g][2t+8..2t+9], A[g+8][2t+8..2t+9] and B[2t..2t+1][g], B[2t+8..2t+9][g]. Here lane (g, t)
  // loads the 16 bytes at K offset t * kElemsPerLoad of weight rows g and g + 8 and of token g;
  // of each 8-element piece, elements 0-1 and 2-3 go to the first MMA's column pairs 2t and
  // 2t + 8, elements 4-5 and 6-7 to the second's. Both operands get the same K permutation, so
  // the two MMAs sum the products over the 32 K positions of the piece's four lanes. (Checked
  // against the layout above by a host emulation over both dtypes.)
  const int num_steps = (k + kStepK - 1) / kStepK;
  for (int s0 = warp; s0 < num_steps; s0 += kSkinnyWarps * kUnroll) {
    uint4 wv[kUnroll][2][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int step = s0 + u * kSkinnyWarps;
      const int k_off = step * kStepK + t * kElemsPerLoad;
      const bool k_ok = step < num_steps && k_off < k;
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wv[u][a][h] = Load16<true>(w_row[a][h] + static_cast<int64_t>(k_off) * kElemBytes,
                                     k_ok && tile_ok[a]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int step = s0 + u * kSkinnyWarps;
      const int k_off = step * kStepK + t * kElemsPerLoad;
      const bool k_ok = step < num_steps && k_off < k;
      uint4 xv[kTokenTiles][kHalves];
#pragma unroll
      for (int j = 0; j < kTokenTiles; ++j)
#pragma unroll
        for (int hh = 0; hh < kHalves; ++hh)
          xv[j][hh] =
              Load16<false>(x_row[j] + k_off + hh * 8, k_ok && token_ok[j] && j < active_tiles);
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        if (!tile_ok[a]) continue;  // uniform over the block
#pragma unroll
        for (int hh = 0; hh < kHalves; ++hh) {
          uint32_t wa[4], wb[4];  // bf16 pairs of rows g and g + 8, elements (0,1) .. (6,7)
          if constexpr (kFp8) {
            const uint4& ra = wv[u][a][0];
            const uint4& rb = wv[u][a][1];
            E4m3x4ToBf16(hh == 0 ? ra.x : ra.z, wa[0], wa[1]);
            E4m3x4ToBf16(hh == 0 ? ra.y : ra.w, wa[2], wa[3]);
            E4m3x4ToBf16(hh == 0 ? rb.x : rb.z, wb[0], wb[1]);
            E4m3x4ToBf16(hh == 0 ? rb.y : rb.w, wb[2], wb[3]);
          } else {
            wa[0] = wv[u][a][0].x, wa[1] = wv[u][a][0].y, wa[2] = wv[u][a][0].z;
            wa[3] = wv[u][a][0].w;
            wb[0] = wv[u][a][1].x, wb[1] = wv[u][a][1].y, wb[2] = wv[u][a][1].z;
            wb[3] = wv[u][a][1].w;
          }
#pragma unroll
          for (int j = 0; j < kTokenTiles; ++j) {
            if (j >= active_tiles) break;  // uniform over the block
            MmaBf16(acc[a][j], wa[0], wb[0], wa[1], wb[1], xv[j][hh].x, xv[j][hh].y);
            MmaBf16(acc[a][j], wa[2], wb[2], wa[3], wb[3], xv[j][hh].z, xv[j][hh].w);
          }
        }
      }
    }
  }

  // Sum the 8 warps' partials in warp order (deterministic), kReduceTiles token tiles at a time.
  // Accumulator c of tile (a, j) is weight row a*16 + g + 8*(c/2), token j*8 + 2t + c%2.
  const float* scale = kFp8 ? weights.scale[group] : nullptr;
#pragma unroll
  for (int chunk = 0; chunk < kTokenTiles; chunk += kReduceTiles) {
    if (chunk >= active_tiles) break;  // uniform over the block
    __syncthreads();                   // the previous chunk's readers are done
#pragma unroll
    for (int jj = 0; jj < kReduceTiles; ++jj) {
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          s_partial[warp][jj * 8 + 2 * t + (c & 1)][a * 16 + g + (c >> 1) * 8] =
              acc[a][chunk + jj][c];
    }
    __syncthreads();
    for (int o = threadIdx.x; o < kReduceTiles * 8 * kSkinnyBlockRows; o += kSkinnyThreads) {
      const int row = o % kSkinnyBlockRows;  // consecutive threads: consecutive output columns
      const int token = o / kSkinnyBlockRows;
      const int col = n_base + row;
      const int r = chunk * 8 + token;
      if (r >= rows || col >= n) continue;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kSkinnyWarps; ++w) v += s_partial[w][token][row];
      if constexpr (kFp8) v *= scale[col];
      args.y[static_cast<int64_t>(row_begin + r) * n + col] = __float2bfloat16_rn(v);
    }
  }
}

template <bool kFp8, int kTokenTiles>
void LaunchSkinnyTiles(dim3 grid, const SkinnyArgs& args, const SkinnyWeights& weights,
                       cudaStream_t stream) {
  SkinnyGroupedGemmKernel<kFp8, kTokenTiles><<<grid, kSkinnyThreads, 0, stream>>>(args, weights);
}

// One skinny GEMM over all groups. REQUIRES: 1 <= num_rows <= kSkinnyMaxRows.
absl::Status LaunchSkinny(bool fp8, const SkinnyArgs& args, const SkinnyWeights& weights,
                          cudaStream_t stream) {
  const int tiles = (args.num_rows + 7) / 8;
  // No more groups can have rows than there are rows.
  const dim3 grid((args.n + kSkinnyBlockRows - 1) / kSkinnyBlockRows,
                  std::min(args.num_groups, args.num_rows));
  if (fp8) {
    if (tiles <= 1)
      LaunchSkinnyTiles<true, 1>(grid, args, weights, stream);
    else if (tiles <= 2)
      LaunchSkinnyTiles<true, 2>(grid, args, weights, stream);
    else if (tiles <= 4)
      LaunchSkinnyTiles<true, 4>(grid, args, weights, stream);
    else
      LaunchSkinnyTiles<true, 8>(grid, args, weights, stream);
  } else {
    if (tiles <= 1)
      LaunchSkinnyTiles<false, 1>(grid, args, weights, stream);
    else if (tiles <= 2)
      LaunchSkinnyTiles<false, 2>(grid, args, weights, stream);
    else if (tiles <= 4)
      LaunchSkinnyTiles<false, 4>(grid, args, weights, stream);
    else
      LaunchSkinnyTiles<false, 8>(grid, args, weights, stream);
  }
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// FP8 helpers

// out[r, :] = bf16(fp8[r, :] * scale[r]), 8 elements per thread step. k: a multiple of 16.
__global__ void DequantFp8Kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale,
                                 int64_t k, int64_t num_chunks, __nv_bfloat16* __restrict__ out) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < num_chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = c * 8;
    const float s = scale[e / k];
    const uint2 v = *reinterpret_cast<const uint2*>(q + e);
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t src = i < 2 ? v.x : v.y;
      const auto pair = static_cast<__nv_fp8x2_storage_t>((src >> (16 * (i & 1))) & 0xffffu);
      const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
      const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * s, f.y * s);
      words[i] = *reinterpret_cast<const uint32_t*>(&b);
    }
    *reinterpret_cast<uint4*>(out + e) = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

absl::Status DequantFp8(const TensorView& q, const TensorView& scale, void* out,
                        cudaStream_t stream) {
  const int64_t num_chunks = q.numel() / 8;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((num_chunks + kThreads - 1) / kThreads, 8192);
  DequantFp8Kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      q.data<const uint8_t>(), scale.data<const float>(), q.dim(1), num_chunks,
      static_cast<__nv_bfloat16*>(out));
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

constexpr int kQuantizeThreads = 256;

// One block per row: amax (max is exact and order-free, so any reduction tree gives the host's
// value), then q = e4m3(w / scale) with an IEEE division, as common/tensor.cc does.
__global__ void __launch_bounds__(kQuantizeThreads)
    QuantizeFp8RowWiseKernel(const __nv_bfloat16* __restrict__ w, int64_t k,
                             uint8_t* __restrict__ q, float* __restrict__ scale) {
  __shared__ float s_warp_max[kQuantizeThreads / 32];
  __shared__ float s_scale;
  const __nv_bfloat16* src = w + static_cast<int64_t>(blockIdx.x) * k;
  uint8_t* dst = q + static_cast<int64_t>(blockIdx.x) * k;
  // fmaxf ignores NaN like the host's std::max(amax, |x|) with amax first.
  float amax = 0.f;
  for (int64_t i = threadIdx.x; i < k; i += kQuantizeThreads)
    amax = fmaxf(amax, fabsf(__bfloat162float(src[i])));
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  if ((threadIdx.x & 31) == 0) s_warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = 0.f;
    for (int i = 0; i < kQuantizeThreads / 32; ++i) m = fmaxf(m, s_warp_max[i]);
    const float s = m > 0.f ? __fdiv_rn(m, 448.f) : 1.f;
    s_scale = s;
    scale[blockIdx.x] = s;
  }
  __syncthreads();
  const float s = s_scale;
  for (int64_t i = threadIdx.x; i < k; i += kQuantizeThreads)
    dst[i] =
        __nv_cvt_float_to_fp8(__fdiv_rn(__bfloat162float(src[i]), s), __NV_SATFINITE, __NV_E4M3);
}

// ---------------------------------------------------------------------------------------------
// Grouped SwiGLU: shared validation and the scratch layout

// Groups per cublasGemmGroupedBatchedEx call: the pointer table travels as one kernel parameter
// (6 * 64 pointers = 3 KiB).
constexpr int kGroupedChunk = 64;
constexpr int kGroupedPointerArrays = 6;  // A, B, C of the w13 GEMM, then of the w2 GEMM

struct ScratchLayout {
  size_t gate_up = 0;   // [num_rows, 2 * intermediate] BF16
  size_t act = 0;       // [num_rows, intermediate] BF16
  size_t pointers = 0;  // kGroupedPointerArrays x kGroupedChunk device pointers
  size_t dequant = 0;   // [2 * intermediate, hidden] BF16, FP8 weights only
  size_t total = 0;

  static ScratchLayout Make(int64_t num_rows, int64_t hidden, int64_t intermediate, DType dtype) {
    const size_t rows = static_cast<size_t>(std::max<int64_t>(num_rows, 0));
    const size_t h = static_cast<size_t>(std::max<int64_t>(hidden, 0));
    const size_t inter = static_cast<size_t>(std::max<int64_t>(intermediate, 0));
    ScratchLayout l;
    l.gate_up = 0;
    l.act = l.gate_up + AlignUp(rows * 2 * inter * 2);
    l.pointers = l.act + AlignUp(rows * inter * 2);
    l.dequant = l.pointers + AlignUp(kGroupedPointerArrays * kGroupedChunk * sizeof(void*));
    // One expert matrix at a time: w13 is the larger (2 * I * H), w2 (H * I) reuses it after
    // the w13 GEMM has consumed it (stream order).
    l.total = l.dequant + (dtype == DType::kF8E4M3 ? AlignUp(2 * inter * h * 2) : 0);
    return l;
  }
};

struct ExpertShape {
  bool any_loaded = false;
  DType dtype = DType::kBF16;
  int64_t intermediate = 0;
};

absl::StatusOr<ExpertShape> CheckExperts(absl::Span<const DeviceExpert> experts, int64_t hidden) {
  ExpertShape shape;
  for (size_t e = 0; e < experts.size(); ++e) {
    const DeviceExpert& ex = experts[e];
    if (!ex.loaded()) continue;
    const std::string op = absl::StrCat("GroupedSwiGlu: expert ", e);
    const std::string where = op + ": ";
    if (!shape.any_loaded) {
      if (ex.w13.dtype() != DType::kBF16 && ex.w13.dtype() != DType::kF8E4M3)
        return absl::InvalidArgumentError(
            absl::StrCat(where, "w13 must be BF16 or F8E4M3, got ", Describe(ex.w13)));
      if (ex.w13.rank() != 2 || ex.w13.dim(0) % 2 != 0)
        return absl::InvalidArgumentError(
            absl::StrCat(where, "w13 must be [2 * intermediate, hidden], got ", Describe(ex.w13)));
      shape.any_loaded = true;
      shape.dtype = ex.w13.dtype();
      shape.intermediate = ex.w13.dim(0) / 2;
      if (shape.intermediate <= 0 || shape.intermediate % 16 != 0 ||
          !FitsInt(2 * shape.intermediate))
        return absl::InvalidArgumentError(absl::StrCat(
            where, "intermediate must be a positive multiple of 16 (16-byte loads), got ",
            shape.intermediate));
    }
    const int64_t inter = shape.intermediate;
    if (ex.w13.dtype() != shape.dtype || ex.w13.shape() != Shape{2 * inter, hidden})
      return absl::InvalidArgumentError(
          absl::StrCat(where, "w13 must be ", DTypeName(shape.dtype), " [", 2 * inter, ", ", hidden,
                       "] like the other experts and x, got ", Describe(ex.w13)));
    // w13 has data (that is what loaded() means); w2 must have it too.
    EPX_RETURN_IF_ERROR(CheckTensor(op.c_str(), "w2", ex.w2, shape.dtype, {hidden, inter}));
    if (!Aligned16(ex.w13.raw()) || !Aligned16(ex.w2.raw()))
      return absl::InvalidArgumentError(absl::StrCat(where, "weights must be 16-byte aligned"));
    if (shape.dtype == DType::kF8E4M3) {
      if (ex.w13_scale.empty() || ex.w13_scale.dtype() != DType::kF32 ||
          ex.w13_scale.shape() != Shape{2 * inter})
        return absl::InvalidArgumentError(
            absl::StrCat(where, "FP8 w13 needs w13_scale F32 [", 2 * inter, "], got ",
                         ex.w13_scale.empty() ? std::string("none") : Describe(ex.w13_scale)));
      if (ex.w2_scale.empty() || ex.w2_scale.dtype() != DType::kF32 ||
          ex.w2_scale.shape() != Shape{hidden})
        return absl::InvalidArgumentError(
            absl::StrCat(where, "FP8 w2 needs w2_scale F32 [", hidden, "], got ",
                         ex.w2_scale.empty() ? std::string("none") : Describe(ex.w2_scale)));
    }
  }
  return shape;
}

// The per-call state the three forms share.
struct GroupedCall {
  const TensorView& x;
  const TensorView& out;
  absl::Span<const int64_t> host_offsets;
  absl::Span<const DeviceExpert> experts;
  int64_t num_rows, hidden, intermediate;
  bool fp8;
  TensorView gate_up, act;  // scratch views over all rows
  void** pointers;          // scratch: kGroupedPointerArrays x kGroupedChunk
  void* dequant;            // scratch, FP8 only
  const Blas& blas;

  cudaStream_t stream() const { return blas.stream(); }
  // Row `row` of a [rows, cols] view (views hold non-const pointers, like TensorView::raw()).
  uint8_t* RowOf(const TensorView& t, int64_t row) const {
    return static_cast<uint8_t*>(t.raw()) + row * t.dim(1) * DTypeSize(t.dtype());
  }
};

absl::Status RunSkinny(const GroupedCall& call, const TensorView& offsets) {
  SkinnyWeights w13 = {}, w2 = {};
  for (size_t g = 0; g < call.experts.size(); ++g) {
    const DeviceExpert& e = call.experts[g];
    if (!e.loaded()) continue;
    w13.w[g] = e.w13.raw();
    w2.w[g] = e.w2.raw();
    if (call.fp8) {
      w13.scale[g] = e.w13_scale.data<const float>();
      w2.scale[g] = e.w2_scale.data<const float>();
    }
  }
  SkinnyArgs args;
  args.offsets = offsets.data<const int32_t>();
  args.num_groups = static_cast<int>(call.experts.size());
  args.num_rows = static_cast<int>(call.num_rows);
  args.x = call.x.data<const __nv_bfloat16>();
  args.y = call.gate_up.data<__nv_bfloat16>();
  args.n = static_cast<int>(2 * call.intermediate);
  args.k = static_cast<int>(call.hidden);
  EPX_RETURN_IF_ERROR(LaunchSkinny(call.fp8, args, w13, call.stream()));
  EPX_RETURN_IF_ERROR(SiluMul(call.gate_up, call.act, call.stream()));
  args.x = call.act.data<const __nv_bfloat16>();
  args.y = call.out.data<__nv_bfloat16>();
  args.n = static_cast<int>(call.hidden);
  args.k = static_cast<int>(call.intermediate);
  return LaunchSkinny(call.fp8, args, w2, call.stream());
}

// The BF16 weight cuBLAS reads for one expert matrix: the weight itself, or its FP8 form
// dequantised into scratch.
absl::StatusOr<const void*> Bf16Weight(const GroupedCall& call, const TensorView& w,
                                       const TensorView& scale) {
  if (!call.fp8) return w.raw();
  EPX_RETURN_IF_ERROR(DequantFp8(w, scale, call.dequant, call.stream()));
  return static_cast<const void*>(call.dequant);
}

absl::Status RunCublasLoop(const GroupedCall& call) {
  const int64_t h = call.hidden, inter = call.intermediate;
  for (size_t g = 0; g < call.experts.size(); ++g) {
    const int64_t begin = call.host_offsets[g], end = call.host_offsets[g + 1];
    if (begin == end) continue;
    const DeviceExpert& e = call.experts[g];
    const int64_t rows = end - begin;
    EPX_ASSIGN_OR_RETURN(const void* w13, Bf16Weight(call, e.w13, e.w13_scale));
    EPX_RETURN_IF_ERROR(GemmXWt(call.blas, call.RowOf(call.x, begin), h, w13, h,
                                call.RowOf(call.gate_up, begin), CUDA_R_16BF, 2 * inter, rows,
                                2 * inter, h, 0.f));
    EPX_RETURN_IF_ERROR(
        SiluMul(call.gate_up.Slice(begin, end), call.act.Slice(begin, end), call.stream()));
    EPX_ASSIGN_OR_RETURN(const void* w2, Bf16Weight(call, e.w2, e.w2_scale));
    EPX_RETURN_IF_ERROR(GemmXWt(call.blas, call.RowOf(call.act, begin), inter, w2, inter,
                                call.RowOf(call.out, begin), CUDA_R_16BF, h, rows, h, inter, 0.f));
  }
  return absl::OkStatus();
}

struct GroupedPointerTable {
  const void* p[kGroupedPointerArrays][kGroupedChunk];
};

__global__ void StoreGroupedPointersKernel(const __grid_constant__ GroupedPointerTable table,
                                           int count, void** dst) {
  const int i = threadIdx.x;
  if (i >= count) return;
#pragma unroll
  for (int a = 0; a < kGroupedPointerArrays; ++a)
    dst[a * kGroupedChunk + i] = const_cast<void*>(table.p[a][i]);
}

// One grouped cuBLAS call: out_i = in_i @ w_i^T for the `count` problems whose device pointer
// arrays start at a (weights), b (inputs), c (outputs).
absl::Status GroupedGemm(const GroupedCall& call, void** a, void** b, void** c,
                         const std::vector<int>& rows, int n, int k) {
  const int count = static_cast<int>(rows.size());
  const std::vector<cublasOperation_t> trans_a(count, CUBLAS_OP_T), trans_b(count, CUBLAS_OP_N);
  const std::vector<int> m_array(count, n), k_array(count, k), ld_w(count, k), ld_x(count, k),
      ld_y(count, n), group_size(count, 1);
  const std::vector<float> alpha(count, 1.f), beta(count, 0.f);
  EPX_CUBLAS_RETURN_IF_ERROR(cublasGemmGroupedBatchedEx(
      call.blas.handle(), trans_a.data(), trans_b.data(), m_array.data(), rows.data(),
      k_array.data(), alpha.data(), a, CUDA_R_16BF, ld_w.data(), b, CUDA_R_16BF, ld_x.data(),
      beta.data(), c, CUDA_R_16BF, ld_y.data(), count, group_size.data(), CUBLAS_COMPUTE_32F));
  return absl::OkStatus();
}

absl::Status RunCublasGrouped(const GroupedCall& call) {
  // A dequantised copy of every expert would not fit the scratch (see the file comment).
  if (call.fp8) return RunCublasLoop(call);
  const int64_t h = call.hidden, inter = call.intermediate;
  std::vector<size_t> groups;
  for (size_t g = 0; g < call.experts.size(); ++g)
    if (call.host_offsets[g + 1] > call.host_offsets[g]) groups.push_back(g);
  for (size_t first = 0; first < groups.size(); first += kGroupedChunk) {
    const int count = static_cast<int>(std::min<size_t>(kGroupedChunk, groups.size() - first));
    GroupedPointerTable table = {};
    std::vector<int> rows(count);
    for (int i = 0; i < count; ++i) {
      const size_t g = groups[first + i];
      const int64_t begin = call.host_offsets[g];
      rows[i] = static_cast<int>(call.host_offsets[g + 1] - begin);
      table.p[0][i] = call.experts[g].w13.raw();
      table.p[1][i] = call.RowOf(call.x, begin);
      table.p[2][i] = call.RowOf(call.gate_up, begin);
      table.p[3][i] = call.experts[g].w2.raw();
      table.p[4][i] = call.RowOf(call.act, begin);
      table.p[5][i] = call.RowOf(call.out, begin);
    }
    // The previous chunk's GEMMs read the table before this kernel overwrites it (one stream).
    StoreGroupedPointersKernel<<<1, kGroupedChunk, 0, call.stream()>>>(table, count, call.pointers);
    EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
    void** p = call.pointers;
    EPX_RETURN_IF_ERROR(GroupedGemm(call, p, p + kGroupedChunk, p + 2 * kGroupedChunk, rows,
                                    static_cast<int>(2 * inter), static_cast<int>(h)));
    // The chunk's groups are consecutive, so their rows are one range.
    const int64_t row_begin = call.host_offsets[groups[first]];
    const int64_t row_end = call.host_offsets[groups[first + count - 1] + 1];
    EPX_RETURN_IF_ERROR(SiluMul(call.gate_up.Slice(row_begin, row_end),
                                call.act.Slice(row_begin, row_end), call.stream()));
    EPX_RETURN_IF_ERROR(GroupedGemm(call, p + 3 * kGroupedChunk, p + 4 * kGroupedChunk,
                                    p + 5 * kGroupedChunk, rows, static_cast<int>(h),
                                    static_cast<int>(inter)));
  }
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public launchers

absl::Status Linear(const TensorView& x, const TensorView& w, const TensorView& y, bool accumulate,
                    const Blas& blas) {
  constexpr const char* kOp = "Linear";
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "x", x, DType::kBF16, {-1, -1}));
  const int64_t m = x.dim(0), k = x.dim(1);
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "w", w, DType::kBF16, {-1, k}));
  const int64_t n = w.dim(0);
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "y", y, {DType::kBF16, DType::kF32}, {m, n}));
  if (accumulate && y.dtype() != DType::kF32)
    return absl::InvalidArgumentError(absl::StrCat(
        "Linear: accumulate needs an F32 y (BF16 would round the running sum), got ", Describe(y)));
  if (!FitsInt(m) || !FitsInt(n) || !FitsInt(k))
    return absl::InvalidArgumentError(absl::StrCat(
        "Linear: dimensions must fit in int for cuBLAS, got m=", m, " n=", n, " k=", k));
  if (m == 0 || n == 0) return absl::OkStatus();
  EPX_RETURN_IF_ERROR(CheckBlas(kOp, blas));
  if (k == 0) {  // an empty sum: y = 0, or y unchanged when accumulating
    if (accumulate) return absl::OkStatus();
    return MemsetAsync(y.raw(), 0, y.nbytes(), blas.stream());
  }
  return GemmXWt(blas, x.raw(), k, w.raw(), k, y.raw(),
                 y.dtype() == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF, n, m, n, k,
                 accumulate ? 1.f : 0.f);
}

const char* GroupedGemmImplName(GroupedGemmImpl impl) {
  switch (impl) {
    case GroupedGemmImpl::kAuto:
      return "auto";
    case GroupedGemmImpl::kSkinny:
      return "skinny";
    case GroupedGemmImpl::kCublasLoop:
      return "cublas-loop";
    case GroupedGemmImpl::kCublasGrouped:
      return "cublas-grouped";
  }
  return "unknown";
}

absl::StatusOr<GroupedGemmImpl> ParseGroupedGemmImpl(const std::string& name) {
  for (GroupedGemmImpl impl : {GroupedGemmImpl::kAuto, GroupedGemmImpl::kSkinny,
                               GroupedGemmImpl::kCublasLoop, GroupedGemmImpl::kCublasGrouped}) {
    if (name == GroupedGemmImplName(impl)) return impl;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown grouped GEMM \"", name, "\" (auto, skinny, cublas-loop, cublas-grouped)"));
}

size_t GroupedSwiGluScratchBytes(int64_t num_rows, int64_t hidden, int64_t intermediate,
                                 DType weight_dtype) {
  return ScratchLayout::Make(num_rows, hidden, intermediate, weight_dtype).total;
}

absl::Status GroupedSwiGlu(const TensorView& x, const TensorView& offsets,
                           absl::Span<const int64_t> host_offsets,
                           absl::Span<const DeviceExpert> experts, GroupedGemmImpl impl,
                           const TensorView& scratch, const TensorView& out, const Blas& blas) {
  constexpr const char* kOp = "GroupedSwiGlu";
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "x", x, DType::kBF16, {-1, -1}));
  const int64_t num_rows = x.dim(0), hidden = x.dim(1);
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, DType::kBF16, {num_rows, hidden}));
  if (hidden <= 0 || hidden % 16 != 0 || !FitsInt(hidden))
    return absl::InvalidArgumentError(absl::StrCat(
        "GroupedSwiGlu: hidden must be a positive multiple of 16 (16-byte loads), got ", hidden));
  // Row indices are int on the device (I32 offsets) and in the cuBLAS calls.
  if (!FitsInt(num_rows))
    return absl::InvalidArgumentError(
        absl::StrCat("GroupedSwiGlu: x has ", num_rows, " rows, more than ", INT_MAX));
  // The kernels load x and out 16 bytes at a time; the scratch buffers are carved from scratch at
  // 256-byte offsets and keep its alignment.
  const auto check_aligned = [](const char* name, const TensorView& t) {
    return Aligned16(t.raw()) ? absl::OkStatus()
                              : absl::InvalidArgumentError(absl::StrCat(
                                    "GroupedSwiGlu: ", name, " must be 16-byte aligned"));
  };
  EPX_RETURN_IF_ERROR(check_aligned("x", x));
  EPX_RETURN_IF_ERROR(check_aligned("out", out));
  EPX_RETURN_IF_ERROR(check_aligned("scratch", scratch));
  const int64_t num_groups = static_cast<int64_t>(experts.size());
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "offsets", offsets, DType::kI32, {num_groups + 1}));
  if (!host_offsets.empty()) {
    if (static_cast<int64_t>(host_offsets.size()) != num_groups + 1)
      return absl::InvalidArgumentError(absl::StrCat("GroupedSwiGlu: host_offsets must have ",
                                                     num_groups + 1, " entries (experts + 1), got ",
                                                     host_offsets.size()));
    for (int64_t g = 0; g <= num_groups; ++g) {
      const int64_t prev = g == 0 ? 0 : host_offsets[g - 1];
      if (host_offsets[g] < prev || host_offsets[g] > num_rows)
        return absl::InvalidArgumentError(
            absl::StrCat("GroupedSwiGlu: host_offsets must ascend within [0, ", num_rows,
                         "]; entry ", g, " is ", host_offsets[g]));
    }
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t rows = host_offsets[g + 1] - host_offsets[g];
      if (rows > 0 && !experts[g].loaded())
        return absl::FailedPreconditionError(absl::StrCat("GroupedSwiGlu: expert group ", g,
                                                          " has ", rows,
                                                          " rows but its expert is not loaded"));
    }
  }
  EPX_ASSIGN_OR_RETURN(const ExpertShape shape, CheckExperts(experts, hidden));

  // kAuto: the skinny kernel while it streams the weights once for all rows, cuBLAS above
  // (ResolveGroupedGemmImpl, ops.h). kSkinnyMaxRows and the kCublasLoop choice come from
  // bench/cuda_moe_layer_bench, which times every form per token count; change them together
  // with its numbers.
  if (impl == GroupedGemmImpl::kAuto) impl = ResolveGroupedGemmImpl(impl, num_rows);
  if (impl == GroupedGemmImpl::kSkinny) {
    if (num_rows > kSkinnyMaxRows)
      return absl::InvalidArgumentError(
          absl::StrCat("GroupedSwiGlu: the skinny kernel takes at most ", kSkinnyMaxRows,
                       " rows, got ", num_rows));
    if (num_groups > kSkinnyMaxGroups)
      return absl::InvalidArgumentError(
          absl::StrCat("GroupedSwiGlu: the skinny kernel takes at most ", kSkinnyMaxGroups,
                       " experts, got ", num_groups));
  } else if (host_offsets.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedSwiGlu: ", GroupedGemmImplName(impl),
                                                   " needs host_offsets (row counts on the host)"));
  }
  if (num_rows == 0) return absl::OkStatus();
  if (!shape.any_loaded) {
    // With host offsets every group is empty (checked above); without them, nothing can run.
    if (!host_offsets.empty()) return absl::OkStatus();
    return absl::FailedPreconditionError(
        absl::StrCat("GroupedSwiGlu: ", num_rows, " rows but no expert is loaded"));
  }
  const int64_t inter = shape.intermediate;
  const bool fp8 = shape.dtype == DType::kF8E4M3;
  const ScratchLayout layout = ScratchLayout::Make(num_rows, hidden, inter, shape.dtype);
  // A scratch without data holds nothing, whatever its shape says.
  const size_t scratch_bytes = scratch.empty() ? 0 : scratch.nbytes();
  if (scratch_bytes < layout.total)
    return absl::InvalidArgumentError(absl::StrCat("GroupedSwiGlu: scratch has ", scratch_bytes,
                                                   " bytes, needs ", layout.total,
                                                   " (GroupedSwiGluScratchBytes)"));
  EPX_RETURN_IF_ERROR(CheckBlas(kOp, blas));

  uint8_t* base = static_cast<uint8_t*>(scratch.raw());
  const GroupedCall call{x,
                         out,
                         host_offsets,
                         experts,
                         num_rows,
                         hidden,
                         inter,
                         fp8,
                         TensorView(base + layout.gate_up, DType::kBF16, {num_rows, 2 * inter}),
                         TensorView(base + layout.act, DType::kBF16, {num_rows, inter}),
                         reinterpret_cast<void**>(base + layout.pointers),
                         fp8 ? base + layout.dequant : nullptr,
                         blas};
  switch (impl) {
    case GroupedGemmImpl::kSkinny:
      return RunSkinny(call, offsets);
    case GroupedGemmImpl::kCublasLoop:
      return RunCublasLoop(call);
    case GroupedGemmImpl::kCublasGrouped:
      return RunCublasGrouped(call);
    case GroupedGemmImpl::kAuto:
      break;
  }
  return absl::InternalError("GroupedSwiGlu: unresolved implementation");
}

absl::Status QuantizeFp8RowWise(const TensorView& w, const TensorView& q, const TensorView& scale,
                                StreamHandle stream) {
  constexpr const char* kOp = "QuantizeFp8RowWise";
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "w", w, DType::kBF16, {-1, -1}));
  const int64_t n = w.dim(0), k = w.dim(1);
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "q", q, DType::kF8E4M3, {n, k}));
  EPX_RETURN_IF_ERROR(CheckTensor(kOp, "scale", scale, DType::kF32, {n}));
  if (n > INT_MAX)
    return absl::InvalidArgumentError(
        absl::StrCat("QuantizeFp8RowWise: at most ", INT_MAX, " rows, got ", n));
  if (n == 0) return absl::OkStatus();
  QuantizeFp8RowWiseKernel<<<static_cast<unsigned>(n), kQuantizeThreads, 0, stream>>>(
      w.data<const __nv_bfloat16>(), k, q.data<uint8_t>(), scale.data<float>());
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

}  // namespace epx::cuda
