// The model forward pass on the CPU for a batch that mixes prefill chunks and decode tokens of
// many sequences. The engine owns the KV cache; each Step appends the given tokens to their
// sequences and returns logits. The expert FFNs run through an ExpertExecutor, local by default,
// so that the same code drives single-process and distributed runs.
//
// Batch invariance: a sequence's logits are bitwise identical whatever else is in the batch
// (every kernel computes a row independently of the others; see kernels/cpu/ops.h).
//
// Not thread-safe: one thread calls Step at a time.
#ifndef EPX_COORDINATOR_ENGINE_H_
#define EPX_COORDINATOR_ENGINE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/model_weights.h"
#include "common/tensor.h"
#include "coordinator/expert_executor.h"
#include "coordinator/kv_cache.h"

namespace epx {

// One sequence's part of a step.
struct SequenceInput {
  int64_t seq_id = 0;
  absl::Span<const int32_t> tokens;  // appended at the sequence's current length
  bool all_logits = false;           // logits for every token, or only for the last
};

// Per-layer totals since the engine was created.
struct EngineStats {
  int64_t steps = 0;
  int64_t tokens = 0;                // tokens through the layers (prefill + decode)
  std::vector<double> attention_us;  // [layer] norm, q/k/v, RoPE, attention, o_proj, residual
  std::vector<double> moe_us;        // [layer] norm, router, experts (wherever they run), combine
  std::vector<std::vector<int64_t>> expert_tokens;  // [layer][expert] rows routed
};

struct EngineOptions {
  int64_t kv_block_size = 16;               // tokens per KV cache block
  int64_t kv_blocks = 0;                    // blocks in the cache; 0: as many as kv_cache_bytes fit
  int64_t kv_cache_bytes = int64_t{2} << 30;  // reserved, not touched until used

  int64_t KvBlocks(const ModelConfig& config) const;
};

class Engine {
 public:
  // `weights` must hold the non-expert tensors; `experts` runs the FFNs (nullptr: local, which
  // needs every expert in `weights`). Both must outlive the engine. Errors: missing weights,
  // bad KV cache options (InvalidArgument), a cache that cannot be allocated (ResourceExhausted).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const ModelWeights* weights,
                                                        ExpertExecutor* experts = nullptr,
                                                        const EngineOptions& options = {});

  // AlreadyExists if the id is taken.
  absl::Status AddSequence(int64_t seq_id);
  // Frees the sequence's cache. NotFound if absent.
  absl::Status RemoveSequence(int64_t seq_id);
  // Committed tokens; -1 if the sequence does not exist.
  int64_t SequenceLength(int64_t seq_id) const { return cache_.Length(seq_id); }

  // Runs one forward step. Returns logits [num_rows, vocab] F32: for each input in order, one
  // row per token if all_logits, else one row for its last token. On an invalid input (unknown
  // sequence, empty tokens, a sequence twice, token id outside the vocabulary, positions beyond
  // max_position_embeddings) returns InvalidArgument/NotFound and changes nothing; when the KV
  // cache has too few free blocks, ResourceExhausted and changes nothing.
  absl::StatusOr<Tensor> Step(absl::Span<const SequenceInput> batch);

  const EngineStats& stats() const { return stats_; }
  // Tokens that went through the layers since creation: prefill and decode tokens, each once.
  int64_t tokens_computed() const { return stats_.tokens; }
  const ModelConfig& config() const { return weights_->config(); }
  const KvCache& kv_cache() const { return cache_; }

 private:
  Engine(const ModelWeights* weights, ExpertExecutor* experts, KvCache cache);
  absl::Status Validate(absl::Span<const SequenceInput> batch) const;

  const ModelWeights* weights_;
  std::unique_ptr<ExpertExecutor> owned_experts_;
  ExpertExecutor* experts_;
  KvCache cache_;
  EngineStats stats_;
};

}  // namespace epx

#endif  // EPX_COORDINATOR_ENGINE_H_
