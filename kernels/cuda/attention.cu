// GQA attention over the paged BF16 KV cache: a tensor-core prefill kernel and a split-KV decode
// kernel, both with the causal mask and the optional sliding window (key k is visible from a row
// at position p when 0 <= p - k < window) of cpu::Attention, softmax statistics in fp32.
//
// Prefill (some sequence has more than one row; one-row sequences in the same batch go here too).
// FlashAttention-2 tiling. The query heads that share a KV head are packed into the M dimension:
// packed row r of a sequence is (query row r / group, head kv_head * group + r % group), so one
// CTA loads each K/V tile once for the whole GQA group, and a one-row sequence still fills
// `group` rows of the MMA rather than one. A CTA owns 64 packed rows of one (sequence, KV head),
// four warps of 16 rows each, and walks 64-key tiles of K and V (32 for head_dim 256), gathered
// through the block table with cp.async into double-buffered shared memory (the next tile loads
// while this one is used). Only the tiles that hold a key visible to some row of the CTA are
// visited; the per-element mask is applied only in tiles that straddle the diagonal or the window's
// edge. Keys outside the CTA's [kv_lo, kv_hi) are zero-filled instead of read: cache rows past the
// sequence's end may hold anything, and one NaN in V would poison P*V even where P is 0.
//
// The MMAs are mma.sync.m16n8k16 (BF16 in, fp32 accumulate) through inline PTX, with ldmatrix
// loads. wmma would be simpler to write, but its accumulator layout is unspecified, so the
// per-row online-softmax rescaling of S and O would need a shared-memory round trip on every KV
// tile; the mma.sync fragment layouts are fixed by the PTX ISA, so S, the running max/sum and O
// stay in registers and S's accumulator fragments become P's A fragments without moving. Shared
// rows are padded by 16 bytes so that the eight rows an ldmatrix phase reads fall in distinct
// banks. Q's fragments stay in registers for head_dim <= 128; for 256 they are re-read from
// shared memory each tile, which keeps O (128 floats a thread) from spilling.
//
// Decode (every sequence has one row). Flash-decoding: grid (sequence, group of query heads of
// one KV head, split of the keys). Each CTA reads its chunk of K and V once for all the query
// heads it serves (the whole GQA group when that is 1, 2, 4, 6 or 8 heads), with 16-byte loads:
// a row of head_dim bf16 is covered by head_dim / 8 lanes, each pass of the CTA reads
// 128 * 8 / head_dim keys and each thread keeps several keys' loads in flight. This runs on CUDA
// cores: one query row per head gives the MMA almost nothing to do, and the kernel is bound by
// reading the cache. Each lane group keeps its own running (max, sum, acc) so the key loop needs
// no barrier; the groups merge in shared memory at the end. With one split the CTA writes the
// output; otherwise it writes its partial (max, sum, unnormalised acc) to scratch and a second
// kernel combines the splits. Splits are chosen so that sequences * head groups * splits covers
// two CTAs per SM, but with at least kMinKeysPerSplit keys each, so small batches over long
// contexts still use the whole GPU.
//
// Numerics: scores are formed in fp32 and moved to the log2 domain (scale * log2 e) so that the
// exponentials are exp2f; max and sum are fp32. The prefill kernel rounds P to BF16 for the P*V
// MMA (the sum uses the unrounded P), a relative error of at most 2^-9 per weight; the output is
// rounded to BF16. Otherwise results differ from the oracle only in summation order.
//
// Device-side indices: q_start and first_position are trusted (the engine builds them, and
// max_queries / max_kv_len must bound them); block-table entries that point outside the cache
// are not followed (the key reads as zeros), so a bad table gives wrong numbers, not a fault.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops.h"

namespace epx::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;

// Decode split heuristic: aim for this many CTAs per SM, each with at least this many keys (fewer
// keys per CTA and the partials' traffic and the merge cost more than they hide).
constexpr int64_t kDecodeCtasPerSm = 2;
constexpr int64_t kMinKeysPerSplit = 128;
constexpr int64_t kMaxSplits = 128;

// Everything the kernels need, passed by value.
struct AttentionArgs {
  const bf16* q;                  // [num_tokens, num_heads * head_dim]
  bf16* out;                      // [num_tokens, num_heads * head_dim]
  const bf16* k_cache;            // [num_cache_rows, num_kv_heads * head_dim]
  const bf16* v_cache;            // [num_cache_rows, num_kv_heads * head_dim]
  const int32_t* block_tables;    // [num_seqs, max_blocks]
  const int32_t* q_start;         // [num_seqs + 1]
  const int32_t* first_position;  // [num_seqs]
  float* partial_acc;             // [num_seqs, num_heads, num_splits, head_dim]; decode only
  float* partial_ml;              // [num_seqs, num_heads, num_splits, 2]: max (log2), sum
  int64_t q_stride;               // num_heads * head_dim
  int64_t kv_stride;              // num_kv_heads * head_dim
  int64_t num_cache_rows;
  int max_blocks;
  int block_size;
  int num_heads;
  int group;       // num_heads / num_kv_heads
  int window;      // 0: none
  int num_splits;  // decode only
  float scale_log2;
};

// ---- device helpers ----

__device__ __forceinline__ uint32_t SmemAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; with valid == false nothing is read (src-size 0)
// and the destination is zero-filled.
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddress(smem)),
               "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i of
// lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i (transposed: row
// and column swap).
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const bf16* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddress(smem))
               : "memory");
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const bf16* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddress(smem))
               : "memory");
}

// c += a * b for a 16x16 (row-major) A, a 16x8 (column-major) B and a 16x8 fp32 C. With
// g = lane / 4 and t = lane % 4: a = {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)};
// b = {(k 2t..2t+1, n g), (k 2t+8.., n g)}; c = {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a bf16x2 word, `lo` in the low half (the lower column of a fragment).
__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The 8 bf16 of a 16-byte word as floats (element 0 in the low half of word 0).
__device__ __forceinline__ void UnpackBf16x8(const uint4& w, float (&f)[8]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(words[i] << 16);
    f[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// Row of the paged cache holding `position` of the sequence whose block table is `table`, or -1
// where the table does not map it into the cache. The engine validates tables on the host; this
// only keeps a bad one from reading out of bounds (such a key is read as zeros, or skipped).
__device__ __forceinline__ int64_t CacheRow(const AttentionArgs& a, const int32_t* table,
                                            int position) {
  const int block = position / a.block_size;
  if (block >= a.max_blocks) return -1;
  const int64_t row = static_cast<int64_t>(table[block]) * a.block_size + position % a.block_size;
  return row >= 0 && row < a.num_cache_rows ? row : -1;
}

// ---- prefill ----

template <int kHeadDim>
struct PrefillTile {
  static constexpr int kRows = 64;  // packed (query row, head) rows per CTA
  // Keys per K/V tile: 32 for head_dim 256, whose O accumulators alone take 128 registers a
  // thread; with 64 the S fragments push it into spills.
  static constexpr int kKeys = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kWarps = kRows / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStride = kHeadDim + 8;  // shared row stride in bf16: +16 bytes of padding
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr bool kQInRegisters = kHeadDim <= 128;
  // Q, then K and V with two stages each.
  static constexpr int kSmemBytes = (kRows + 4 * kKeys) * kStride * static_cast<int>(sizeof(bf16));
  static_assert((kRows * kChunks) % kThreads == 0 && (kKeys * kChunks) % kThreads == 0);
};

// Grid: (query tiles, sequences, KV heads); tiles counted from the last so that the tiles with the
// most keys start first. REQUIRES: every sequence has at most gridDim.x * 64 / group rows.
template <int kHeadDim>
__global__ void __launch_bounds__(PrefillTile<kHeadDim>::kThreads)
    PrefillKernel(const AttentionArgs a) {
  using T = PrefillTile<kHeadDim>;
  extern __shared__ uint4 smem[];
  bf16* const sq = reinterpret_cast<bf16*>(smem);   // [kRows][kStride]; output staging at the end
  bf16* const sk = sq + T::kRows * T::kStride;      // [2][kKeys][kStride]
  bf16* const sv = sk + 2 * T::kKeys * T::kStride;  // [2][kKeys][kStride]

  const int seq = blockIdx.y;
  const int kv_head = blockIdx.z;
  const int group = a.group;
  const int q_begin = a.q_start[seq];
  const int packed_rows = (a.q_start[seq + 1] - q_begin) * group;
  const int r0 = (gridDim.x - 1 - blockIdx.x) * T::kRows;
  if (r0 >= packed_rows) return;
  const int r1 = min(r0 + T::kRows, packed_rows);

  // Keys any valid row of the CTA sees: [kv_lo, kv_hi).
  const int window = a.window;
  const int first_pos = a.first_position[seq];
  const int min_pos = first_pos + r0 / group;
  const int max_pos = first_pos + (r1 - 1) / group;
  const int kv_lo = window > 0 ? max(0, min_pos - window + 1) : 0;
  const int kv_hi = max_pos + 1;
  const int tile_first = kv_lo / T::kKeys;
  const int num_tiles = (kv_hi - 1) / T::kKeys - tile_first + 1;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  // Q: packed row r is head kv_head * group + r % group of query row r / group. Rows past the
  // sequence are zero, so their (unused) scores stay finite.
#pragma unroll
  for (int it = 0; it < T::kRows * T::kChunks / T::kThreads; ++it) {
    const int i = tid + it * T::kThreads;
    const int r = i / T::kChunks, c = i % T::kChunks;
    const int pr = r0 + r;
    const bool valid = pr < r1;
    const bf16* src = a.q;
    if (valid) {
      src += static_cast<int64_t>(q_begin + pr / group) * a.q_stride +
             static_cast<int64_t>(kv_head * group + pr % group) * kHeadDim + c * 8;
    }
    CpAsync16(sq + r * T::kStride + c * 8, src, valid);
  }

  const int32_t* const table = a.block_tables + static_cast<int64_t>(seq) * a.max_blocks;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * kHeadDim;
  auto load_kv_tile = [&](int tile, int stage) {
    const int k0 = tile * T::kKeys;
    // Not unrolled: unrolled, the tile-invariant parts of each iteration's addresses are hoisted
    // out of the tile loop and stay live through the MMAs (~70 registers for head_dim 128, and
    // spills for 256).
#pragma unroll 1
    for (int it = 0; it < T::kKeys * T::kChunks / T::kThreads; ++it) {
      const int i = tid + it * T::kThreads;
      const int r = i / T::kChunks, c = i % T::kChunks;
      const int key = k0 + r;
      const int64_t cache_row = key >= kv_lo && key < kv_hi ? CacheRow(a, table, key) : -1;
      const bool valid = cache_row >= 0;
      const int64_t offset = valid ? cache_row * a.kv_stride + head_offset + c * 8 : 0;
      const int dst = (stage * T::kKeys + r) * T::kStride + c * 8;
      CpAsync16(sk + dst, a.k_cache + offset, valid);
      CpAsync16(sv + dst, a.v_cache + offset, valid);
    }
  };
  load_kv_tile(tile_first, 0);
  CpAsyncCommit();  // group 0: Q and the first K/V tile

  // This thread's accumulator rows (CTA-local) are row_lo and row_lo + 8; their positions.
  const int g = lane / 4, tq = lane % 4;
  const int row_lo = warp * 16 + g;
  const int pos_lo = first_pos + (r0 + row_lo) / group;
  const int pos_hi = first_pos + (r0 + row_lo + 8) / group;
  // Warps whose 16 rows are all past the sequence (short sequences, one-row sequences) only help
  // to load.
  const bool warp_active = r0 + warp * 16 < r1;

  // ldmatrix row addresses: lane l gives row l % 8 of matrix l / 8.
  const int lm = lane / 8, lr = lane % 8;
  // A (Q): matrices (rows 0-7, d 0-7), (rows 8-15, d 0-7), (rows 0-7, d 8-15), (rows 8-15, d 8-15).
  const bf16* const q_frag = sq + (warp * 16 + (lm % 2) * 8 + lr) * T::kStride + (lm / 2) * 8;
  // B of Q K^T from K[key][d]: (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7),
  // (keys 8-15, d 8-15): b0, b1 of key block 0, then b0, b1 of key block 1.
  const int k_frag = ((lm / 2) * 8 + lr) * T::kStride + (lm % 2) * 8;
  // B of P V from V[key][d], transposed: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7,
  // d 8-15), (keys 8-15, d 8-15): b0, b1 of d block 0, then b0, b1 of d block 1.
  const int v_frag = ((lm % 2) * 8 + lr) * T::kStride + (lm / 2) * 8;

  float o[kHeadDim / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units
  float row_sum[2] = {0.f, 0.f};              // this thread's share; the quad's sum at the end
  uint32_t qf[T::kQInRegisters ? kHeadDim / 16 : 1][4];

  for (int t = 0; t < num_tiles; ++t) {
    const int stage = t % 2;
    if (t + 1 < num_tiles) {
      load_kv_tile(tile_first + t + 1, stage ^ 1);
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();

    if (warp_active) {
      if constexpr (T::kQInRegisters) {
        if (t == 0) {
#pragma unroll
          for (int kk = 0; kk < kHeadDim / 16; ++kk) LdMatrixX4(qf[kk], q_frag + kk * 16);
        }
      }
      const bf16* const ks = sk + stage * T::kKeys * T::kStride;
      const bf16* const vs = sv + stage * T::kKeys * T::kStride;

      // S = Q K^T for this tile: s[j] is key block j (keys 8j..8j+7).
      float s[T::kKeys / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        uint32_t af[4];
        if constexpr (T::kQInRegisters) {
#pragma unroll
          for (int i = 0; i < 4; ++i) af[i] = qf[kk][i];
        } else {
          LdMatrixX4(af, q_frag + kk * 16);
        }
#pragma unroll
        for (int jp = 0; jp < T::kKeys / 16; ++jp) {
          uint32_t b[4];
          LdMatrixX4(b, ks + jp * 16 * T::kStride + kk * 16 + k_frag);
          Mma16816(s[2 * jp], af, b[0], b[1]);
          Mma16816(s[2 * jp + 1], af, b[2], b[3]);
        }
      }

      // Scale to log2 units; mask only where the tile is not visible to every valid row.
      const int k0 = (tile_first + t) * T::kKeys;
      const bool all_visible =
          k0 + T::kKeys - 1 <= min_pos && (window == 0 || max_pos - k0 < window);
#pragma unroll
      for (int j = 0; j < T::kKeys / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[j][e] * a.scale_log2;
          if (!all_visible) {
            const int key = k0 + j * 8 + tq * 2 + e % 2;
            const int pos = e < 2 ? pos_lo : pos_hi;
            if (key > pos || (window > 0 && pos - key >= window)) x = -INFINITY;
          }
          s[j][e] = x;
        }
      }

      // Online softmax per row; the four lanes of a quad hold one row between them.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = row_max[h];
#pragma unroll
        for (int j = 0; j < T::kKeys / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row with no visible key yet keeps max -inf; subtracting 0 instead keeps exp2f(-inf)
        // = 0 rather than NaN.
        const float base = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(row_max[h] - base);
        row_max[h] = mx;
        row_sum[h] *= alpha;
#pragma unroll
        for (int nb = 0; nb < kHeadDim / 8; ++nb) {
          o[nb][2 * h] *= alpha;
          o[nb][2 * h + 1] *= alpha;
        }
#pragma unroll
        for (int j = 0; j < T::kKeys / 8; ++j) {
          s[j][2 * h] = exp2f(s[j][2 * h] - base);
          s[j][2 * h + 1] = exp2f(s[j][2 * h + 1] - base);
          row_sum[h] += s[j][2 * h] + s[j][2 * h + 1];
        }
      }

      // O += P V. The C fragments of key blocks 2kk and 2kk + 1 are exactly the A fragment of
      // the 16 keys 16kk..16kk+15.
#pragma unroll
      for (int kk = 0; kk < T::kKeys / 16; ++kk) {
        const uint32_t pf[4] = {PackBf16x2(s[2 * kk][0], s[2 * kk][1]),
                                PackBf16x2(s[2 * kk][2], s[2 * kk][3]),
                                PackBf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                PackBf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < kHeadDim / 16; ++dp) {
          uint32_t b[4];
          LdMatrixX4Trans(b, vs + kk * 16 * T::kStride + dp * 16 + v_frag);
          Mma16816(o[2 * dp], pf, b[0], b[1]);
          Mma16816(o[2 * dp + 1], pf, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the stage just read is the one the next iteration loads into
  }

  if (!warp_active) return;
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = row_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[h] = sum > 0.f ? 1.f / sum : 0.f;  // 0 only for rows past the sequence
  }
  // Stage the warp's 16 rows in its own (no longer needed) Q rows, then store 16-byte chunks.
  bf16* const staged = sq + warp * 16 * T::kStride;
#pragma unroll
  for (int nb = 0; nb < kHeadDim / 8; ++nb) {
    *reinterpret_cast<uint32_t*>(staged + g * T::kStride + nb * 8 + tq * 2) =
        PackBf16x2(o[nb][0] * inv[0], o[nb][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(staged + (g + 8) * T::kStride + nb * 8 + tq * 2) =
        PackBf16x2(o[nb][2] * inv[1], o[nb][3] * inv[1]);
  }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < 16 * T::kChunks / 32; ++it) {
    const int i = lane + it * 32;
    const int r = i / T::kChunks, c = i % T::kChunks;
    const int pr = r0 + warp * 16 + r;
    if (pr < r1) {
      bf16* dst = a.out + static_cast<int64_t>(q_begin + pr / group) * a.q_stride +
                  static_cast<int64_t>(kv_head * group + pr % group) * kHeadDim + c * 8;
      *reinterpret_cast<uint4*>(dst) =
          *reinterpret_cast<const uint4*>(staged + r * T::kStride + c * 8);
    }
  }
}

// ---- decode ----

template <int kHeadDim, int kHeads>
struct DecodeTile {
  static constexpr int kThreads = 128;
  static constexpr int kLanesPerKey = kHeadDim / 8;  // 16 bytes of the row each
  static constexpr int kKeysPerPass = kThreads / kLanesPerKey;
  // Keys whose K and V loads each thread has in flight at once; fewer for 6 and 8 heads, whose q
  // and acc alone take 96 and 128 registers (8 heads with 2 keys reach 255).
  static constexpr int kUnroll = kHeads <= 4 ? 4 : kHeads <= 6 ? 2 : 1;
  static constexpr int kKeysPerStep = kKeysPerPass * kUnroll;
  static_assert(kLanesPerKey <= 32 && 32 % kLanesPerKey == 0);
};

// Grid: (sequence, head group of kHeads query heads of one KV head, split). With one split the
// CTA writes `out`; otherwise its partial (max, sum, unnormalised acc) per head. REQUIRES: every
// sequence has at most one row.
template <int kHeadDim, int kHeads>
__global__ void __launch_bounds__(128) DecodeKernel(const AttentionArgs a) {
  using T = DecodeTile<kHeadDim, kHeads>;
  __shared__ float s_max[T::kKeysPerPass][kHeads];
  __shared__ float s_sum[T::kKeysPerPass][kHeads];
  __shared__ __align__(16) float s_acc[T::kKeysPerPass][kHeads][kHeadDim];

  const int seq = blockIdx.x;
  const int head0 = blockIdx.y * kHeads;
  const int split = blockIdx.z;
  const int token = a.q_start[seq];
  if (a.q_start[seq + 1] == token) return;
  const int kv_head = head0 / a.group;
  const int pos = a.first_position[seq];
  const int kv_lo = a.window > 0 ? max(0, pos - a.window + 1) : 0;
  const int kv_hi = pos + 1;
  // Chunks are cut from the sequence's own key count, so a max_kv_len that is too small only
  // costs balance, never keys. A split past the end is empty and reports max -inf.
  const int chunk = (kv_hi - kv_lo + a.num_splits - 1) / a.num_splits;
  const int begin = kv_lo + split * chunk;
  const int end = min(begin + chunk, kv_hi);

  const int tid = threadIdx.x;
  const int sub = tid % T::kLanesPerKey;   // which 8 elements of a row
  const int slot = tid / T::kLanesPerKey;  // which key of a pass

  float q[kHeads][8];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    const uint4 raw =
        *reinterpret_cast<const uint4*>(a.q + static_cast<int64_t>(token) * a.q_stride +
                                        static_cast<int64_t>(head0 + h) * kHeadDim + sub * 8);
    UnpackBf16x8(raw, q[h]);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[h][i] *= a.scale_log2;
  }

  float m[kHeads], l[kHeads], acc[kHeads][8];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.f;
  }

  const int32_t* const table = a.block_tables + static_cast<int64_t>(seq) * a.max_blocks;
  const bf16* const k_base = a.k_cache + static_cast<int64_t>(kv_head) * kHeadDim + sub * 8;
  const bf16* const v_base = a.v_cache + static_cast<int64_t>(kv_head) * kHeadDim + sub * 8;

  // The bounds are the same for every thread, so all lanes reach the shuffles.
  for (int step = begin; step < end; step += T::kKeysPerStep) {
    uint4 kr[T::kUnroll], vr[T::kUnroll];
    bool valid[T::kUnroll];
#pragma unroll
    for (int u = 0; u < T::kUnroll; ++u) {
      const int key = step + u * T::kKeysPerPass + slot;
      const int64_t cache_row = key < end ? CacheRow(a, table, key) : -1;
      valid[u] = cache_row >= 0;
      kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
      if (valid[u]) {
        const int64_t offset = cache_row * a.kv_stride;
        kr[u] = __ldg(reinterpret_cast<const uint4*>(k_base + offset));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(v_base + offset));
      }
    }

    float s[T::kUnroll][kHeads];
#pragma unroll
    for (int u = 0; u < T::kUnroll; ++u) {
      float kf[8];
      UnpackBf16x8(kr[u], kf);
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot = fmaf(q[h][i], kf[i], dot);
        s[u][h] = dot;
      }
    }
    // Sum over the lanes of a key (aligned, contiguous lanes, so xor stays inside the group).
#pragma unroll
    for (int offset = T::kLanesPerKey / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int u = 0; u < T::kUnroll; ++u) {
#pragma unroll
        for (int h = 0; h < kHeads; ++h) s[u][h] += __shfl_xor_sync(0xffffffffu, s[u][h], offset);
      }
    }

    float vf[T::kUnroll][8];
#pragma unroll
    for (int u = 0; u < T::kUnroll; ++u) UnpackBf16x8(vr[u], vf[u]);
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      float mx = m[h];
#pragma unroll
      for (int u = 0; u < T::kUnroll; ++u)
        if (valid[u]) mx = fmaxf(mx, s[u][h]);
      const float base = mx == -INFINITY ? 0.f : mx;  // no key yet: keep exp2f finite
      const float alpha = exp2f(m[h] - base);
      m[h] = mx;
      float p[T::kUnroll];
      float p_sum = 0.f;
#pragma unroll
      for (int u = 0; u < T::kUnroll; ++u) {
        p[u] = valid[u] ? exp2f(s[u][h] - base) : 0.f;
        p_sum += p[u];
      }
      l[h] = l[h] * alpha + p_sum;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float x = acc[h][i] * alpha;
#pragma unroll
        for (int u = 0; u < T::kUnroll; ++u) x = fmaf(p[u], vf[u][i], x);
        acc[h][i] = x;
      }
    }
  }

  // Merge the key slots' states.
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    if (sub == 0) {
      s_max[slot][h] = m[h];
      s_sum[slot][h] = l[h];
    }
    float4* dst = reinterpret_cast<float4*>(&s_acc[slot][h][sub * 8]);
    dst[0] = make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
    dst[1] = make_float4(acc[h][4], acc[h][5], acc[h][6], acc[h][7]);
  }
  __syncthreads();
  for (int i = tid; i < kHeads * kHeadDim; i += T::kThreads) {
    const int h = i / kHeadDim, d = i % kHeadDim;
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < T::kKeysPerPass; ++k) mx = fmaxf(mx, s_max[k][h]);
    float sum = 0.f, val = 0.f;
#pragma unroll
    for (int k = 0; k < T::kKeysPerPass; ++k) {
      const float mk = s_max[k][h];
      const float w = mk == -INFINITY ? 0.f : exp2f(mk - mx);
      sum += w * s_sum[k][h];
      val += w * s_acc[k][h][d];
    }
    const int head = head0 + h;
    if (a.num_splits == 1) {
      a.out[static_cast<int64_t>(token) * a.q_stride + static_cast<int64_t>(head) * kHeadDim + d] =
          __float2bfloat16_rn(val / sum);
    } else {
      const int64_t part = (static_cast<int64_t>(seq) * a.num_heads + head) * a.num_splits + split;
      a.partial_acc[part * kHeadDim + d] = val;
      if (d == 0) {
        a.partial_ml[2 * part] = mx;
        a.partial_ml[2 * part + 1] = sum;
      }
    }
  }
}

// Grid: (sequence, heads / 4); one warp per (sequence, head) folds the splits' partials.
template <int kHeadDim>
__global__ void __launch_bounds__(128) DecodeCombineKernel(const AttentionArgs a) {
  const int seq = blockIdx.x;
  const int head = blockIdx.y * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int token = a.q_start[seq];
  if (head >= a.num_heads || a.q_start[seq + 1] == token) return;
  const int64_t part0 = (static_cast<int64_t>(seq) * a.num_heads + head) * a.num_splits;

  float mx = -INFINITY;
  for (int i = lane; i < a.num_splits; i += 32) mx = fmaxf(mx, a.partial_ml[2 * (part0 + i)]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));

  float sum = 0.f;
  float acc[kHeadDim / 32] = {};
  for (int i = 0; i < a.num_splits; ++i) {
    const float mi = a.partial_ml[2 * (part0 + i)];
    if (mi == -INFINITY) continue;  // an empty split (fewer keys than splits)
    const float w = exp2f(mi - mx);
    sum += w * a.partial_ml[2 * (part0 + i) + 1];
    const float* p = a.partial_acc + (part0 + i) * kHeadDim;
#pragma unroll
    for (int j = 0; j < kHeadDim / 32; ++j) acc[j] = fmaf(w, p[lane + 32 * j], acc[j]);
  }
  const float inv = 1.f / sum;
  bf16* dst =
      a.out + static_cast<int64_t>(token) * a.q_stride + static_cast<int64_t>(head) * kHeadDim;
#pragma unroll
  for (int j = 0; j < kHeadDim / 32; ++j) dst[lane + 32 * j] = __float2bfloat16_rn(acc[j] * inv);
}

// ---- host side ----

// Query heads one decode CTA serves: the whole GQA group when a kernel is instantiated for it,
// else the largest instantiated divisor (each K/V chunk is then read group / heads times, the
// repeats mostly from L2).
int DecodeHeadsPerCta(int64_t group) {
  for (int h : {8, 6, 4, 2})
    if (group % h == 0) return h;
  return 1;
}

// The current device's SM count, cached per device (the attribute query costs a driver call).
int MultiProcessorCount() {
  constexpr int kMaxDevices = 64;
  constexpr int kFallback = 132;  // an H100 SXM, if the query fails
  static std::atomic<int> cached[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return kFallback;
  }
  if (device >= 0 && device < kMaxDevices) {
    const int n = cached[device].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    cudaGetLastError();
    return kFallback;
  }
  if (device >= 0 && device < kMaxDevices) cached[device].store(n, std::memory_order_relaxed);
  return n;
}

bool IsDecode(const AttentionBatch& batch) { return batch.max_queries <= 1; }

// Splits of the decode grid. REQUIRES: the head counts are valid.
int DecodeSplits(const AttentionBatch& batch, const cpu::AttentionParams& params) {
  const int64_t heads_per_cta = DecodeHeadsPerCta(params.num_heads / params.num_kv_heads);
  const int64_t ctas = std::max<int64_t>(1, batch.num_seqs * (params.num_heads / heads_per_cta));
  const int64_t target = kDecodeCtasPerSm * MultiProcessorCount();
  if (ctas >= target) return 1;
  int64_t keys = std::max<int64_t>(1, batch.max_kv_len);
  if (params.sliding_window > 0) keys = std::min(keys, params.sliding_window);
  const int64_t by_load = (target + ctas - 1) / ctas;
  const int64_t by_keys = (keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
  return static_cast<int>(std::clamp<int64_t>(std::min(by_load, by_keys), 1, kMaxSplits));
}

bool ValidHeads(const cpu::AttentionParams& p) {
  return p.num_heads > 0 && p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0 &&
         (p.head_dim == 32 || p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256);
}

std::string Describe(const TensorView& t) {
  return absl::StrCat(DTypeName(t.dtype()), " ", ShapeString(t.shape()));
}

bool Aligned16(const TensorView& t) { return reinterpret_cast<uintptr_t>(t.raw()) % 16 == 0; }

absl::Status Invalid(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("Attention: ", what));
}

absl::Status CheckArguments(const TensorView& q, const PagedKv& kv, const AttentionBatch& batch,
                            const cpu::AttentionParams& p) {
  const int64_t num_tokens = q.dim(0);
  if (num_tokens > INT_MAX) return Invalid("more than 2^31 - 1 query rows");
  if (p.sliding_window < 0) return Invalid(absl::StrCat("sliding_window ", p.sliding_window));
  const int64_t row = p.num_kv_heads * p.head_dim;
  auto check_cache = [row](const char* name, const TensorView& cache) -> absl::Status {
    if (cache.empty() || cache.rank() != 2 || cache.dtype() != DType::kBF16 || cache.dim(1) != row)
      return Invalid(absl::StrCat(name, " must be BF16 [num_cache_rows, num_kv_heads * head_dim = ",
                                  row, "], got ", Describe(cache)));
    // The kernels read 16-byte chunks of rows.
    if (!Aligned16(cache)) return Invalid(absl::StrCat(name, " is not 16-byte aligned"));
    return absl::OkStatus();
  };
  EPX_RETURN_IF_ERROR(check_cache("k_cache", kv.k_cache));
  EPX_RETURN_IF_ERROR(check_cache("v_cache", kv.v_cache));
  if (kv.v_cache.dim(0) != kv.k_cache.dim(0))
    return Invalid(absl::StrCat("k_cache ", Describe(kv.k_cache), " and v_cache ",
                                Describe(kv.v_cache), " differ"));
  if (batch.num_seqs <= 0 || batch.num_seqs > 65535)
    return Invalid(absl::StrCat("num_seqs ", batch.num_seqs, " is not in [1, 65535]"));
  if (batch.max_queries < 1 || batch.max_queries > num_tokens)
    return Invalid(absl::StrCat("max_queries ", batch.max_queries,
                                " is not in [1, num_tokens = ", num_tokens, "]"));
  if (batch.max_kv_len < 1 || batch.max_kv_len > INT_MAX)
    return Invalid(absl::StrCat("max_kv_len ", batch.max_kv_len, " is out of range"));
  const TensorView& tables = kv.block_tables;
  if (tables.empty() || tables.rank() != 2 || tables.dtype() != DType::kI32 ||
      tables.dim(0) != batch.num_seqs || tables.dim(1) < 1 || tables.dim(1) > INT_MAX)
    return Invalid(absl::StrCat("block_tables must be I32 [num_seqs = ", batch.num_seqs,
                                ", max_blocks_per_seq], got ", Describe(tables)));
  if (kv.block_size < 1 || kv.block_size > (1 << 24))
    return Invalid(absl::StrCat("block_size ", kv.block_size));
  if (tables.dim(1) * kv.block_size < batch.max_kv_len)
    return Invalid(absl::StrCat("block_tables hold ", tables.dim(1) * kv.block_size,
                                " positions a sequence, fewer than max_kv_len ", batch.max_kv_len));
  if (batch.q_start.empty() || batch.q_start.dtype() != DType::kI32 ||
      batch.q_start.shape() != Shape{batch.num_seqs + 1})
    return Invalid(absl::StrCat("q_start must be I32 [num_seqs + 1 = ", batch.num_seqs + 1,
                                "], got ", Describe(batch.q_start)));
  if (batch.first_position.empty() || batch.first_position.dtype() != DType::kI32 ||
      batch.first_position.shape() != Shape{batch.num_seqs})
    return Invalid(absl::StrCat("first_position must be I32 [num_seqs = ", batch.num_seqs,
                                "], got ", Describe(batch.first_position)));
  return absl::OkStatus();
}

template <int kHeadDim>
absl::Status LaunchPrefill(const AttentionArgs& args, const AttentionBatch& batch,
                           int64_t num_kv_heads, StreamHandle stream) {
  using T = PrefillTile<kHeadDim>;
  const int64_t tiles = (batch.max_queries * args.group + T::kRows - 1) / T::kRows;
  // Above 48 KiB dynamic shared memory needs the opt-in; it is per function and device, and
  // cheap enough to repeat rather than track.
  EPX_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      PrefillKernel<kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(batch.num_seqs),
                  static_cast<unsigned>(num_kv_heads));
  PrefillKernel<kHeadDim><<<grid, T::kThreads, T::kSmemBytes, stream>>>(args);
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  return absl::OkStatus();
}

template <int kHeadDim>
absl::Status LaunchDecode(const AttentionArgs& args, const AttentionBatch& batch,
                          StreamHandle stream) {
  const int heads_per_cta = DecodeHeadsPerCta(args.group);
  const dim3 grid(static_cast<unsigned>(batch.num_seqs),
                  static_cast<unsigned>(args.num_heads / heads_per_cta),
                  static_cast<unsigned>(args.num_splits));
  switch (heads_per_cta) {
    case 8:
      DecodeKernel<kHeadDim, 8><<<grid, 128, 0, stream>>>(args);
      break;
    case 6:
      DecodeKernel<kHeadDim, 6><<<grid, 128, 0, stream>>>(args);
      break;
    case 4:
      DecodeKernel<kHeadDim, 4><<<grid, 128, 0, stream>>>(args);
      break;
    case 2:
      DecodeKernel<kHeadDim, 2><<<grid, 128, 0, stream>>>(args);
      break;
    default:
      DecodeKernel<kHeadDim, 1><<<grid, 128, 0, stream>>>(args);
      break;
  }
  EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  if (args.num_splits > 1) {
    const dim3 combine_grid(static_cast<unsigned>(batch.num_seqs),
                            static_cast<unsigned>((args.num_heads + 3) / 4));
    DecodeCombineKernel<kHeadDim><<<combine_grid, 128, 0, stream>>>(args);
    EPX_CUDA_RETURN_IF_LAUNCH_FAILED();
  }
  return absl::OkStatus();
}

}  // namespace

size_t AttentionScratchBytes(const AttentionBatch& batch, const cpu::AttentionParams& params) {
  if (!IsDecode(batch) || !ValidHeads(params) || batch.num_seqs <= 0) return 0;
  const int splits = DecodeSplits(batch, params);
  if (splits == 1) return 0;
  return static_cast<size_t>(batch.num_seqs) * params.num_heads * splits * (params.head_dim + 2) *
         sizeof(float);
}

absl::Status Attention(const TensorView& q, const PagedKv& kv, const AttentionBatch& batch,
                       const cpu::AttentionParams& params, const TensorView& scratch,
                       const TensorView& out, StreamHandle stream) {
  if (!ValidHeads(params))
    return Invalid(absl::StrCat("num_heads ", params.num_heads, " and num_kv_heads ",
                                params.num_kv_heads,
                                " must be positive with num_heads % num_kv_heads == 0, and "
                                "head_dim (",
                                params.head_dim, ") 32, 64, 128 or 256"));
  const int64_t q_cols = params.num_heads * params.head_dim;
  if (q.rank() != 2 || q.dtype() != DType::kBF16 || q.dim(1) != q_cols)
    return Invalid(absl::StrCat("q must be BF16 [num_tokens, num_heads * head_dim = ", q_cols,
                                "], got ", Describe(q)));
  if (out.dtype() != DType::kBF16 || out.shape() != q.shape())
    return Invalid(
        absl::StrCat("out must be BF16 ", ShapeString(q.shape()), " like q, got ", Describe(out)));
  if (q.dim(0) == 0) return absl::OkStatus();
  if (q.empty() || out.empty() || !Aligned16(q) || !Aligned16(out))
    return Invalid("q and out must be non-null and 16-byte aligned");
  EPX_RETURN_IF_ERROR(CheckArguments(q, kv, batch, params));

  AttentionArgs args{};
  args.q = q.data<const bf16>();
  args.out = out.data<bf16>();
  args.k_cache = kv.k_cache.data<const bf16>();
  args.v_cache = kv.v_cache.data<const bf16>();
  args.block_tables = kv.block_tables.data<const int32_t>();
  args.q_start = batch.q_start.data<const int32_t>();
  args.first_position = batch.first_position.data<const int32_t>();
  args.q_stride = q_cols;
  args.kv_stride = params.num_kv_heads * params.head_dim;
  args.num_cache_rows = kv.k_cache.dim(0);
  args.max_blocks = static_cast<int>(kv.block_tables.dim(1));
  args.block_size = static_cast<int>(kv.block_size);
  args.num_heads = static_cast<int>(params.num_heads);
  args.group = static_cast<int>(params.num_heads / params.num_kv_heads);
  // Positions are int32, so a longer window masks nothing more than this one.
  args.window = static_cast<int>(std::min<int64_t>(params.sliding_window, INT_MAX));
  args.scale_log2 = params.scale * kLog2e;

  if (!IsDecode(batch)) {
    args.num_splits = 1;
    switch (params.head_dim) {
      case 32:
        return LaunchPrefill<32>(args, batch, params.num_kv_heads, stream);
      case 64:
        return LaunchPrefill<64>(args, batch, params.num_kv_heads, stream);
      case 128:
        return LaunchPrefill<128>(args, batch, params.num_kv_heads, stream);
      default:
        return LaunchPrefill<256>(args, batch, params.num_kv_heads, stream);
    }
  }

  args.num_splits = DecodeSplits(batch, params);
  if (args.num_splits > 1) {
    const size_t need = AttentionScratchBytes(batch, params);
    if (scratch.empty() || scratch.nbytes() < need)
      return Invalid(absl::StrCat("scratch holds ", scratch.empty() ? 0 : scratch.nbytes(),
                                  " bytes; this batch needs ", need, " (AttentionScratchBytes)"));
    if (reinterpret_cast<uintptr_t>(scratch.raw()) % alignof(float) != 0)
      return Invalid("scratch is not 4-byte aligned");
    args.partial_acc = scratch.data<float>();
    args.partial_ml =
        args.partial_acc + batch.num_seqs * params.num_heads * args.num_splits * params.head_dim;
  }
  switch (params.head_dim) {
    case 32:
      return LaunchDecode<32>(args, batch, stream);
    case 64:
      return LaunchDecode<64>(args, batch, stream);
    case 128:
      return LaunchDecode<128>(args, batch, stream);
    default:
      return LaunchDecode<256>(args, batch, stream);
  }
}

}  // namespace epx::cuda
