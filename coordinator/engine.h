// The model forward pass for a batch that mixes prefill chunks and decode tokens of many
// sequences. The engine owns the KV cache bookkeeping; each Step appends the given tokens to
// their sequences and returns logits. The compute runs on a ModelForward backend (CPU, or CUDA
// with `--device cuda`); the expert FFNs run through an ExpertExecutor, local by default, so
// that the same code drives single-process and distributed runs.
//
// Batch invariance: on the CPU, a sequence's logits are bitwise identical whatever else is in
// the batch (every kernel computes a row independently of the others; see kernels/cpu/ops.h).
//
// Not thread-safe: one thread calls Step at a time.
#ifndef EPX_COORDINATOR_ENGINE_H_
#define EPX_COORDINATOR_ENGINE_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/model_weights.h"
#include "common/tensor.h"
#include "coordinator/expert_executor.h"
#include "coordinator/kv_cache.h"
#include "coordinator/model_forward.h"

namespace epx {

// One sequence's part of a step.
struct SequenceInput {
  int64_t seq_id = 0;
  absl::Span<const int32_t> tokens;  // appended at the sequence's current length
  bool all_logits = false;           // logits for every token, or only for the last
};

struct EngineOptions {
  int64_t kv_block_size = 16;               // tokens per KV cache block
  int64_t kv_blocks = 0;                    // blocks in the cache; 0: as many as kv_cache_bytes fit
  int64_t kv_cache_bytes = int64_t{2} << 30;  // reserved, not touched until used
  // EngineStats::recent_expert_tokens covers this many of the last steps.
  int64_t routing_window_steps = 64;

  // Blocks of the cache for elements of `element_bytes` (the backend's KV dtype).
  int64_t KvBlocks(const ModelConfig& config, int64_t element_bytes) const;
};

class Engine {
 public:
  // `weights` must hold the non-expert tensors; `experts` runs the FFNs (nullptr: local, which
  // needs every expert in `weights`). Both must outlive the engine. Errors: missing weights,
  // bad KV cache options (InvalidArgument), a cache that cannot be allocated (ResourceExhausted).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const ModelWeights* weights,
                                                        ExpertExecutor* experts = nullptr,
                                                        const EngineOptions& options = {});
  // An engine over any backend (e.g. NewCudaForward), which it takes over; allocates the
  // backend's KV storage. Errors: bad KV cache options, a cache that does not fit.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const ModelConfig& config,
                                                        std::unique_ptr<ModelForward> forward,
                                                        const EngineOptions& options = {});

  // AlreadyExists if the id is taken.
  absl::Status AddSequence(int64_t seq_id);
  // Frees the sequence's cache (and its routing counts). NotFound if absent.
  absl::Status RemoveSequence(int64_t seq_id);
  // [layer][expert]: the rows of the sequence's tokens routed to each expert so far (zeros with
  // a backend that does not report routing); empty if the sequence does not exist.
  std::vector<std::vector<int64_t>> SequenceRouting(int64_t seq_id) const;
  // Committed tokens; -1 if the sequence does not exist.
  int64_t SequenceLength(int64_t seq_id) const { return cache_.Length(seq_id); }

  // Runs one forward step. Returns logits [num_rows, vocab] F32: for each input in order, one
  // row per token if all_logits, else one row for its last token. On an invalid input (unknown
  // sequence, empty tokens, a sequence twice, token id outside the vocabulary, positions beyond
  // max_position_embeddings) returns InvalidArgument/NotFound and changes nothing; when the KV
  // cache has too few free blocks, ResourceExhausted and changes nothing. A step whose forward
  // fails (a worker lost) commits nothing either: the same batch may run again.
  absl::StatusOr<Tensor> Step(absl::Span<const SequenceInput> batch);

  const EngineStats& stats() const { return stats_; }
  // Tokens that went through the layers since creation: prefill and decode tokens, each once.
  int64_t tokens_computed() const { return stats_.tokens; }
  const ModelConfig& config() const { return config_; }
  const KvCache& kv_cache() const { return cache_; }
  // "cpu" or the GPU's name.
  std::string device() const { return forward_->device(); }

 private:
  Engine(const ModelConfig& config, std::unique_ptr<ModelForward> forward, KvCache cache,
         int64_t window_steps);
  absl::Status Validate(absl::Span<const SequenceInput> batch) const;
  // Adds a committed step's routing (routed_, [layer][token][k]) to the window and to its
  // sequences' counts.
  void CountRouting(absl::Span<const SequenceInput> batch, int64_t tokens);

  ModelConfig config_;
  std::unique_ptr<ExpertExecutor> owned_experts_;  // a local executor the CPU backend uses
  std::unique_ptr<ModelForward> forward_;
  KvCache cache_;
  EngineStats stats_;
  std::vector<int32_t> routed_;  // the step's top-k ids, [layer][token][k]
  // The window's steps, oldest first: [layer * experts + expert] rows; their sum is in stats_.
  std::deque<std::vector<int32_t>> window_;
  absl::flat_hash_map<int64_t, std::vector<int64_t>> routing_;  // seq -> [layer * E + expert]
};

}  // namespace epx

#endif  // EPX_COORDINATOR_ENGINE_H_
