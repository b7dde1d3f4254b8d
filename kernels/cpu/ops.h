// CPU kernels: the reference implementation of every model op, and the oracle the CUDA kernels
// are tested against. Host functions over non-owning views returning absl::Status; outputs are
// caller-allocated. Threaded with OpenMP; vectorised with fixed-width vector types.
//
// Determinism contract: every output element is computed by the same sequence of fp32 operations
// whatever the number of rows, the thread count or the other rows of the batch. This is what
// makes a sequence's logits bitwise identical alone or in any batch, and across worker counts.
//
// Activations are fp32. Weight matrices may be BF16, F16 or F32 and are widened on the fly.
#ifndef EPX_KERNELS_CPU_OPS_H_
#define EPX_KERNELS_CPU_OPS_H_

#include <cstdint>
#include <random>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/tensor.h"

namespace epx::cpu {

// y = x @ w^T.  x: [num_rows, k] F32; w: [n, k] F32/BF16/F16; y: [num_rows, n] F32.
absl::Status Linear(const TensorView& x, const TensorView& w, const TensorView& y);

// out[i] = table[ids[i]] widened to fp32. ids: [num_tokens] I32; table: [vocab, hidden];
// out: [num_tokens, hidden] F32. InvalidArgument names an id outside the table.
absl::Status Embedding(absl::Span<const int32_t> ids, const TensorView& table,
                       const TensorView& out);

// out = w * x * rsqrt(mean(x^2) + eps), per row. x, out: [num_tokens, hidden] F32 (may alias);
// w: [hidden] F32.
absl::Status RmsNorm(const TensorView& x, const TensorView& w, float eps, const TensorView& out);

// cos/sin of position * theta^(-2i/head_dim), computed in double. out: [num_tokens, head_dim]
// F32 with cos in [:, :head_dim/2] and sin in [:, head_dim/2:].
absl::Status RopeTable(absl::Span<const int64_t> positions, int64_t head_dim, double theta,
                       const TensorView& out);
// In place, Hugging Face rotate_half layout. x: [num_tokens, num_heads * head_dim] F32;
// table: from RopeTable for the same tokens.
absl::Status ApplyRope(const TensorView& x, int64_t head_dim, const TensorView& table);

// The keys and values one query token attends to: its sequence's cache rows for positions
// [0, position], each row [num_kv_heads * head_dim] F32, `row_stride` floats apart. Paged caches
// give a block table: position p is row block_table[p / block_size] * block_size + p % block_size
// of k and v; with an empty table, row p.
struct AttentionKv {
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t row_stride = 0;
  int64_t position = 0;  // the query's own position; keys 0..position are visible (causal)
  absl::Span<const int32_t> block_table;
  int64_t block_size = 0;

  int64_t Row(int64_t p) const {
    return block_table.empty() ? p
                               : int64_t{block_table[p / block_size]} * block_size + p % block_size;
  }
};

struct AttentionParams {
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  float scale = 0.f;           // softmax scale, head_dim^-0.5 for Mixtral
  int64_t sliding_window = 0;  // 0: none; else key k visible from q when q - k < window
};

// GQA attention with causal mask and optional sliding window, softmax in fp32.
// q: [num_tokens, num_heads * head_dim] F32; kv: one entry per token;
// out: [num_tokens, num_heads * head_dim] F32.
absl::Status Attention(const TensorView& q, absl::Span<const AttentionKv> kv,
                       const AttentionParams& params, const TensorView& out);

// Router: p = softmax(logits) in fp32, top `num_topk` of p (ties: lower expert index first),
// renormalised to sum to 1. logits: [num_tokens, num_experts] F32; topk_ids: [num_tokens,
// num_topk] I32; topk_weights: [num_tokens, num_topk] F32.
absl::Status RouterTopK(const TensorView& logits, const TensorView& topk_ids,
                        const TensorView& topk_weights);

// Groups routed slots (token t, choice j; slot = t * num_topk + j) by expert, tokens ascending
// within each expert. expert_offsets: [num_experts + 1]; slots: [num_tokens * num_topk], the
// slot of each row of the permuted (expert-grouped) buffer.
absl::Status ExpertPermutation(const TensorView& topk_ids, int64_t num_experts,
                               absl::Span<int64_t> expert_offsets, absl::Span<int64_t> slots);

// permuted[r] = x[slots[r] / num_topk]. x: [num_tokens, hidden]; permuted: [num_slots, hidden].
absl::Status PermuteRows(const TensorView& x, absl::Span<const int64_t> slots, int64_t num_topk,
                         const TensorView& permuted);

// out[slots[r]] = permuted[r]. permuted: [num_rows, hidden]; out: [num_slots, hidden] with
// num_slots >= num_rows (a block of the permuted rows may be scattered on its own).
absl::Status UnpermuteRows(const TensorView& permuted, absl::Span<const int64_t> slots,
                           const TensorView& out);

// Scratch floats SwiGluExpert needs for `num_rows` rows.
int64_t SwiGluScratchFloats(int64_t num_rows, int64_t intermediate);
// out = w2(silu(w1 x) * (w3 x)). x: [num_rows, hidden] F32; w1, w3: [intermediate, hidden];
// w2: [hidden, intermediate]; scratch: SwiGluScratchFloats floats; out: [num_rows, hidden].
absl::Status SwiGluExpert(const TensorView& x, const TensorView& w1, const TensorView& w2,
                          const TensorView& w3, absl::Span<float> scratch, const TensorView& out);

// The weights of one expert FFN, as SwiGluExpert takes them.
struct SwiGluWeights {
  TensorView w1, w2, w3;
};
// Scratch floats GroupedSwiGlu needs: SwiGluScratchFloats of the largest group.
int64_t GroupedSwiGluScratchFloats(absl::Span<const int64_t> offsets, int64_t intermediate);
// Rows grouped by expert: group g, rows [offsets[g], offsets[g + 1]) of x, goes through
// weights[g] into the same rows of out. Empty groups are skipped (their weights may be empty); a
// non-empty group without weights is FailedPrecondition naming it. x, out: [offsets.back(),
// hidden], both F32, or both BF16 (rows from a GPU coordinator: widened exactly, computed in
// fp32, rounded to nearest even); offsets: [num_groups + 1]; weights: [num_groups].
absl::Status GroupedSwiGlu(const TensorView& x, absl::Span<const int64_t> offsets,
                           absl::Span<const SwiGluWeights> weights, absl::Span<float> scratch,
                           const TensorView& out);

// x_out[t] = h[t] + sum_{j = 0..num_topk-1} weights[t, j] * expert_out[t * num_topk + j], the
// sum in j order. h, x_out: [num_tokens, hidden] (may alias); expert_out: [num_tokens * num_topk,
// hidden]; weights: [num_tokens, num_topk] F32.
absl::Status MoeCombine(const TensorView& h, const TensorView& expert_out,
                        const TensorView& weights, const TensorView& x_out);

// out = a + b elementwise (F32, same shape; out may alias either).
absl::Status Add(const TensorView& a, const TensorView& b, const TensorView& out);

// Sampling.
struct SamplingParams {
  float temperature = 0.f;  // 0: greedy
  int32_t top_k = 0;        // 0 or -1: all tokens
  float top_p = 1.f;        // (0, 1]
  absl::Status Validate() const;
};

// Index of the largest value; ties go to the lower index.
int32_t ArgMax(absl::Span<const float> logits);

// A reproducible generator: the same seed gives the same draws on every platform.
class SamplingRng {
 public:
  explicit SamplingRng(uint64_t seed) : engine_(seed) {}
  // Uniform in [0, 1) with 53 random bits.
  double Uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

 private:
  std::mt19937_64 engine_;
};

// Greedy when temperature is 0; otherwise temperature, then top-k, then top-p (smallest set of
// most likely tokens whose probability reaches top_p), then one draw from `rng`.
absl::StatusOr<int32_t> Sample(absl::Span<const float> logits, const SamplingParams& params,
                               SamplingRng& rng);

}  // namespace epx::cpu

#endif  // EPX_KERNELS_CPU_OPS_H_
