// CUDA kernels: one host-callable launcher per model op, over non-owning views of device memory,
// stream (or the Blas bound to one) last, returning absl::Status. Each launcher checks dtypes and
// shapes (InvalidArgument naming the argument) before it launches anything, and needs no device
// to refuse a bad call (the gpu tests check this over host memory); it reports a failed launch
// with its CUDA error; kernels run asynchronously on the stream, so an error inside a kernel
// surfaces at the next synchronisation. Scratch memory is sized by a separate ...ScratchBytes()
// call and owned by the caller.
//
// Numerics (kernels/cpu/ops.h is the oracle every launcher is tested against): weights and GEMM
// inputs are BF16 (or FP8 e4m3 expert weights with one fp32 scale per output row); every sum is
// accumulated in fp32; the residual stream, norms, softmaxes and router are fp32. Integer outputs
// (routing ids, permutations, argmax) equal the oracle's exactly when the inputs are the same.
//
// This header includes no CUDA header (see runtime.h).
#ifndef EPX_KERNELS_CUDA_OPS_H_
#define EPX_KERNELS_CUDA_OPS_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/tensor.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/runtime.h"

namespace epx::cuda {

// ---- elementwise (elementwise.cu) ----

// dst = src converted. src: F32, F16 or BF16; dst: BF16 or F32; same number of elements.
absl::Status Convert(const TensorView& src, const TensorView& dst, StreamHandle stream);

// Deterministic pseudo-random fill for synthetic weights: element i becomes
// offset + scale * DummyUniform(seed, i) (common/dummy_weights.h), rounded to dst's dtype.
// dst: BF16 or F32.
absl::Status FillDummy(const TensorView& dst, uint64_t seed, float scale, float offset,
                       StreamHandle stream);

// out[i] = table[ids[i]] widened to fp32. ids: [num_tokens] I32 (device, in range: the engine
// validates ids on the host); table: [vocab, hidden] BF16; out: [num_tokens, hidden] F32.
absl::Status Embedding(const TensorView& ids, const TensorView& table, const TensorView& out,
                       StreamHandle stream);

// out = w * x * rsqrt(mean(x^2) + eps), per row, in fp32. x: [num_tokens, hidden] F32;
// w: [hidden] F32; out: [num_tokens, hidden] BF16 or F32.
absl::Status RmsNorm(const TensorView& x, const TensorView& w, float eps, const TensorView& out,
                     StreamHandle stream);

// Fused residual add and norm: x += delta, then out = RmsNorm(x). x: [num_tokens, hidden] F32
// (updated in place); delta: same shape, F32; out: [num_tokens, hidden] BF16 or F32.
absl::Status AddRmsNorm(const TensorView& x, const TensorView& delta, const TensorView& w,
                        float eps, const TensorView& out, StreamHandle stream);

// The attention inputs of a step: qkv [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
// F32 (q | k | v, from one GEMM); rope: [num_tokens, head_dim] F32 from cpu::RopeTable (cos |
// sin). Applies RoPE (rotate_half) to q and k, writes q as BF16 to q_out [num_tokens, num_heads *
// head_dim], and k and v as BF16 to row kv_rows[t] of k_cache and v_cache
// ([num_cache_rows, num_kv_heads * head_dim]). kv_rows: [num_tokens] I32 (device).
absl::Status RopeQkvToCache(const TensorView& qkv, const TensorView& rope,
                            const TensorView& kv_rows, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, const TensorView& q_out, const TensorView& k_cache,
                            const TensorView& v_cache, StreamHandle stream);

// x[t] += sum_{j = 0..num_topk-1} weights[t, j] * expert_out[row(t, j)], the sum formed in j
// order in fp32 before it is added, as cpu::MoeCombine does. row(t, j) = row_of_slot[t * num_topk
// + j], or t * num_topk + j when row_of_slot is empty (slot order). x: [num_tokens, hidden] F32;
// expert_out: [num_rows, hidden] BF16 or F32; weights: [num_tokens, num_topk] F32; row_of_slot:
// [num_tokens * num_topk] I32 or empty.
absl::Status MoeCombine(const TensorView& x, const TensorView& expert_out,
                        const TensorView& row_of_slot, const TensorView& weights,
                        StreamHandle stream);

// out[r] = silu(gate_up[r, :I]) * gate_up[r, I:], in fp32, rounded to BF16.
// gate_up: [num_rows, 2 * I] BF16; out: [num_rows, I] BF16.
absl::Status SiluMul(const TensorView& gate_up, const TensorView& out, StreamHandle stream);

// ---- router and permutation (moe_routing.cu) ----

// p = softmax(logits) in fp32, top num_topk (ties: lower expert first), renormalised; one warp per
// token. logits: [num_tokens, num_experts] F32 (num_experts <= 256); topk_ids: [num_tokens,
// num_topk] I32; topk_weights: [num_tokens, num_topk] F32 (num_topk <= 8).
absl::Status RouterTopK(const TensorView& logits, const TensorView& topk_ids,
                        const TensorView& topk_weights, StreamHandle stream);

size_t ExpertPermutationScratchBytes(int64_t num_tokens, int64_t num_topk, int64_t num_experts);
// Groups the routed slots (slot = t * num_topk + j) by expert, tokens ascending within each
// expert, exactly as cpu::ExpertPermutation. topk_ids: [num_tokens, num_topk] I32;
// expert_offsets: [num_experts + 1] I32; slots: [num_tokens * num_topk] I32, the slot of each
// permuted row; row_of_slot: [num_tokens * num_topk] I32, its inverse.
absl::Status ExpertPermutation(const TensorView& topk_ids, int64_t num_experts,
                               const TensorView& expert_offsets, const TensorView& slots,
                               const TensorView& row_of_slot, const TensorView& scratch,
                               StreamHandle stream);

// The (worker, local expert) group each routed slot goes to when the experts live on workers
// with replicas: groups[s] = expert_groups[e, (s + rotation) % replica_counts[e]] for
// e = topk_ids[s]. Slots of a replicated expert are dealt to its replicas by slot index, turned
// by `rotation` (the step and layer) so that one-row decode steps reach every replica; an id
// outside [0, num_experts) becomes num_groups, which ExpertPermutation sorts after every group.
// topk_ids: [num_tokens, num_topk] I32; expert_groups: [num_experts, max_replicas] I32 (device,
// each in [0, num_groups)); replica_counts: [num_experts] I32 in [1, max_replicas]; groups: like
// topk_ids.
absl::Status AssignGroups(const TensorView& topk_ids, const TensorView& expert_groups,
                          const TensorView& replica_counts, int64_t rotation, int64_t num_groups,
                          const TensorView& groups, StreamHandle stream);

// permuted[r] = x[slots[r] / num_topk]. x: [num_tokens, hidden] BF16; slots: [num_rows] I32;
// permuted: [num_rows, hidden] BF16.
absl::Status PermuteRows(const TensorView& x, const TensorView& slots, int64_t num_topk,
                         const TensorView& permuted, StreamHandle stream);

// ---- attention (attention.cu) ----

// The paged KV cache of one layer. Position p of sequence s is row
// block_tables[s, p / block_size] * block_size + p % block_size.
struct PagedKv {
  TensorView k_cache;       // [num_blocks * block_size, num_kv_heads * head_dim] BF16
  TensorView v_cache;       // same
  TensorView block_tables;  // [num_seqs, max_blocks_per_seq] I32
  int64_t block_size = 0;
};

// How a step's query rows map to sequences (device arrays, with host-known bounds).
struct AttentionBatch {
  TensorView q_start;         // [num_seqs + 1] I32: sequence s owns rows [q_start[s], q_start[s+1])
  TensorView first_position;  // [num_seqs] I32: position of the sequence's first row; row i of it
                              // is at first_position + i and sees keys 0..that position
  int64_t num_seqs = 0;
  int64_t max_queries = 0;  // most rows of one sequence
  int64_t max_kv_len = 0;   // most keys one row sees (first_position + rows, at most)
};

size_t AttentionScratchBytes(const AttentionBatch& batch, const cpu::AttentionParams& params);
// GQA attention with causal mask and optional sliding window over the paged cache (keys of the
// step already written), softmax in fp32 with online (flash) rescaling. Batches whose sequences
// all have one row take the split-KV decode kernel; others the tiled prefill kernel.
// q: [num_tokens, num_heads * head_dim] BF16; out: same shape, BF16. head_dim: 32, 64, 128 or 256.
absl::Status Attention(const TensorView& q, const PagedKv& kv, const AttentionBatch& batch,
                       const cpu::AttentionParams& params, const TensorView& scratch,
                       const TensorView& out, StreamHandle stream);

// ---- GEMMs (gemm.cu) ----

// y = x @ w^T (+ y when accumulate), fp32 accumulation. x: [m, k] BF16; w: [n, k] BF16;
// y: [m, n] BF16 or F32 (accumulate needs F32). A call with work to do (m, n >= 1) needs a Blas
// made by Blas::Create(): one without a cuBLAS handle is FailedPrecondition, after the argument
// checks.
absl::Status Linear(const TensorView& x, const TensorView& w, const TensorView& y,
                    bool accumulate, const Blas& blas);

// One expert FFN on the device. w13 stacks w1 (rows [0, I)) over w3 (rows [I, 2I)) so that one
// GEMM gives gate and up. BF16, or FP8 e4m3 (DType::kF8E4M3) with per-row F32 scales:
// w[n, k] = fp8[n, k] * scale[n].
struct DeviceExpert {
  TensorView w13;        // [2 * intermediate, hidden]
  TensorView w2;         // [hidden, intermediate]
  TensorView w13_scale;  // [2 * intermediate] F32; FP8 only
  TensorView w2_scale;   // [hidden] F32; FP8 only
  bool loaded() const { return !w13.empty(); }
};

enum class GroupedGemmImpl {
  kAuto,           // skinny for small row counts, else the faster cuBLAS form (bench/)
  kSkinny,         // own kernel: each weight row read once for all of a group's rows
  kCublasLoop,     // one cuBLAS GEMM per non-empty group
  kCublasGrouped,  // cublasGemmGroupedBatchedEx, one call per GEMM of the FFN
};
const char* GroupedGemmImplName(GroupedGemmImpl impl);
// The inverse of GroupedGemmImplName; InvalidArgument listing the names for anything else.
absl::StatusOr<GroupedGemmImpl> ParseGroupedGemmImpl(const std::string& name);
// Rows at or below which kAuto takes the skinny kernel.
inline constexpr int64_t kSkinnyMaxRows = 64;
// The form that runs `num_rows` rows for a caller that takes any form: kAuto as GroupedSwiGlu
// resolves it, and kSkinny the same way, since the skinny kernel takes at most kSkinnyMaxRows rows
// (a forced `skinny`, meant for decode, runs prefill and big batches with the cuBLAS loop rather
// than failing them). Never kAuto; anything but kSkinny needs host_offsets.
inline GroupedGemmImpl ResolveGroupedGemmImpl(GroupedGemmImpl impl, int64_t num_rows) {
  if (impl != GroupedGemmImpl::kAuto && impl != GroupedGemmImpl::kSkinny) return impl;
  return num_rows <= kSkinnyMaxRows ? GroupedGemmImpl::kSkinny : GroupedGemmImpl::kCublasLoop;
}

size_t GroupedSwiGluScratchBytes(int64_t num_rows, int64_t hidden, int64_t intermediate,
                                 DType weight_dtype);
// Rows grouped by expert: group g, rows [offsets[g], offsets[g + 1]) of x, goes through
// experts[g] into the same rows of out. offsets: [num_groups + 1] I32 on the device;
// host_offsets: the same values on the host, needed by the cuBLAS forms (may be empty for
// kSkinny, and for kAuto when num_rows <= kSkinnyMaxRows). A non-empty group whose expert is not
// loaded is FailedPrecondition (checked when host_offsets are given). x: [num_rows, hidden] BF16;
// out: [num_rows, hidden] BF16. As for Linear, a call with rows to run needs a Blas made by
// Blas::Create() (FailedPrecondition after the argument checks otherwise).
absl::Status GroupedSwiGlu(const TensorView& x, const TensorView& offsets,
                           absl::Span<const int64_t> host_offsets,
                           absl::Span<const DeviceExpert> experts, GroupedGemmImpl impl,
                           const TensorView& scratch, const TensorView& out, const Blas& blas);

// Row-wise FP8 e4m3 quantisation of a weight: scale[n] = max|w[n, :]| / 448 (1 for a zero row),
// q[n, k] = e4m3(w[n, k] / scale[n]) round-to-nearest-even, saturating. w: [n, k] BF16;
// q: [n, k] F8E4M3; scale: [n] F32. Matches QuantizeFp8RowWise in common/tensor.h.
absl::Status QuantizeFp8RowWise(const TensorView& w, const TensorView& q, const TensorView& scale,
                                StreamHandle stream);

// ---- sampling (sampling.cu) ----

// out[r] = index of the largest logit of row r, ties to the lower index. logits: [num_rows,
// vocab] F32; out: [num_rows] I32.
absl::Status ArgMax(const TensorView& logits, const TensorView& out, StreamHandle stream);

// Per-row sampling parameters and the uniform draw in [0, 1) the row's generator produced
// (cpu::SamplingRng::Uniform), all device arrays of [num_rows].
struct SampleArgs {
  TensorView temperature;  // F32; 0: greedy
  TensorView top_k;        // I32; 0 or -1: all
  TensorView top_p;        // F32 in (0, 1]
  TensorView uniform;      // F64
};
size_t SampleScratchBytes(int64_t num_rows, int64_t vocab);
// cpu::Sample for every row, on the device: candidates by descending logit (ties: lower id),
// top-k, softmax with temperature, top-p, then the draw. The same token as the oracle except
// where the fp64 prefix sums round differently at a boundary. logits: [num_rows, vocab] F32;
// out: [num_rows] I32.
absl::Status Sample(const TensorView& logits, const SampleArgs& args, const TensorView& scratch,
                    const TensorView& out, StreamHandle stream);

}  // namespace epx::cuda

#endif  // EPX_KERNELS_CUDA_OPS_H_
