// The compute of one engine step, behind an interface so that the same Engine (validation, KV
// bookkeeping, batching, stats) drives the CPU backend and the CUDA backend. The engine flattens a
// step into a ForwardBatch; the backend runs the layers on it, writes the step's keys and values
// into its own KV storage at the rows the engine chose, and returns the logits on the host.
//
// Backends are used from one thread (the engine's step thread).
#ifndef EPX_COORDINATOR_MODEL_FORWARD_H_
#define EPX_COORDINATOR_MODEL_FORWARD_H_

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/model_config.h"
#include "common/model_weights.h"
#include "common/tensor.h"
#include "coordinator/expert_executor.h"
#include "kernels/cpu/ops.h"

namespace epx {

// Per-layer totals since the engine was created. The CUDA backend fuses each norm into the op
// before it, so there the MoE input norm counts as attention time and the next layer's input norm
// as MoE time.
struct EngineStats {
  int64_t steps = 0;
  int64_t tokens = 0;                // tokens through the layers (prefill + decode)
  std::vector<double> attention_us;  // [layer] norm, q/k/v, RoPE, attention, o_proj, residual
  std::vector<double> moe_us;        // [layer] norm, router, experts (wherever they run), combine
  std::vector<std::vector<int64_t>> expert_tokens;  // [layer][expert] rows routed
  // The same over the last `window_steps` steps (the engine keeps it; backends leave it alone).
  std::vector<std::vector<int64_t>> recent_expert_tokens;
  int64_t window_steps = 0;
};

// One step, flattened: token t has id ids[t] at positions[t] and its K/V go to cache row
// kv_rows[t]. The tokens of each sequence are contiguous and in position order.
struct ForwardBatch {
  struct Sequence {
    int64_t first_token = 0;     // index of its first token in ids
    int64_t num_tokens = 0;
    int64_t first_position = 0;  // position of its first token
    absl::Span<const int32_t> block_table;
  };
  absl::Span<const int32_t> ids;          // [num_tokens]
  absl::Span<const int64_t> positions;    // [num_tokens]
  absl::Span<const int64_t> kv_rows;      // [num_tokens]
  absl::Span<const Sequence> sequences;
  absl::Span<const int64_t> logit_rows;   // tokens whose logits are returned, in order
  int64_t block_size = 0;
  // Out, unless empty: each layer's top-k expert ids of every token, [layer][token][k]
  // (backends whose reports_routing() is true fill it).
  absl::Span<int32_t> routed;
};

// The model's attention shape, as both backends' attention ops take it.
inline cpu::AttentionParams AttentionParamsOf(const ModelConfig& c) {
  cpu::AttentionParams p;
  p.num_heads = c.num_attention_heads;
  p.num_kv_heads = c.num_key_value_heads;
  p.head_dim = c.head_dim;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
  p.sliding_window = c.sliding_window.value_or(0);
  return p;
}

class ModelForward {
 public:
  virtual ~ModelForward() = default;
  // Bytes one element of the KV storage takes (4 for fp32, 2 for bf16).
  virtual int64_t kv_element_bytes() const = 0;
  // Allocates the KV storage: per layer, keys and values of [num_blocks * block_size,
  // kv_size] elements. Called once, before the first Forward. ResourceExhausted if it does not
  // fit.
  virtual absl::Status AllocateKv(int64_t num_blocks, int64_t block_size) = 0;
  // Runs the layers; returns logits [logit_rows.size(), vocab] F32 on the host and adds the
  // step's per-layer time and routed rows to `stats`. Errors come from the expert executor
  // (communication) or the device; the engine then does not commit the step.
  virtual absl::StatusOr<Tensor> Forward(const ForwardBatch& batch, EngineStats& stats) = 0;
  // "cpu", or the device's name.
  virtual std::string device() const = 0;
  // Whether Forward fills ForwardBatch::routed.
  virtual bool reports_routing() const { return false; }
};

// The CPU backend (kernels/cpu): fp32 activations, fp32 KV cache, weights read in their
// checkpoint dtype. `weights` must hold the non-expert tensors; `experts` runs the FFNs. Both
// must outlive the backend.
std::unique_ptr<ModelForward> NewCpuForward(const ModelWeights* weights, ExpertExecutor* experts);

}  // namespace epx

#endif  // EPX_COORDINATOR_MODEL_FORWARD_H_
