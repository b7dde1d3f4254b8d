// The weights of a Mixtral model, loaded by role from a Hugging Face checkpoint directory.
//
// Matrices stay in the checkpoint's dtype (BF16, F16 or F32) as views into the read-only mapping:
// nothing is copied, and only the tensors a role asks for are ever read. Norm vectors are
// converted to fp32 at load. Every tensor's dtype and shape is checked against the config; a
// mismatch is InvalidArgument naming the file and the tensor. Immutable after Load(); thread-safe
// to read.
#ifndef EPX_COMMON_MODEL_WEIGHTS_H_
#define EPX_COMMON_MODEL_WEIGHTS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "common/safetensors.h"
#include "common/tensor.h"

namespace epx {

// Which tensors a process loads.
struct WeightSelection {
  bool non_expert = true;    // embedding, attention, norms, router, lm_head
  std::vector<int> experts;  // experts whose FFNs this process holds (all layers)

  static WeightSelection All(const ModelConfig& config);
  static WeightSelection Coordinator() { return {true, {}}; }
  static WeightSelection Experts(std::vector<int> experts) { return {false, std::move(experts)}; }
  // What rank `rank` of an expert-parallel job needs: rank 0 the non-expert tensors, a worker
  // the experts its placement gives it.
  static WeightSelection ForRank(const Placement& placement, int rank) {
    return rank == 0 ? Coordinator() : Experts(placement.experts_of(rank));
  }
};

struct ExpertWeights {
  TensorView w1;  // [intermediate, hidden]  gate projection
  TensorView w2;  // [hidden, intermediate]  down projection
  TensorView w3;  // [intermediate, hidden]  up projection
  bool loaded() const { return !w1.empty(); }
};

struct LayerWeights {
  Tensor input_norm;                   // [hidden] fp32
  Tensor post_attention_norm;          // [hidden] fp32
  TensorView q_proj;                   // [num_heads * head_dim, hidden]
  TensorView k_proj;                   // [num_kv_heads * head_dim, hidden]
  TensorView v_proj;                   // [num_kv_heads * head_dim, hidden]
  TensorView o_proj;                   // [hidden, num_heads * head_dim]
  TensorView gate;                     // [num_experts, hidden]
  std::vector<ExpertWeights> experts;  // [num_experts]; unloaded entries are empty
};

class ModelWeights {
 public:
  static absl::StatusOr<std::unique_ptr<ModelWeights>> Load(const std::string& dir,
                                                            const ModelConfig& config,
                                                            const WeightSelection& selection);

  const ModelConfig& config() const { return config_; }
  const WeightSelection& selection() const { return selection_; }
  TensorView embed_tokens() const { return embed_tokens_; }  // [vocab, hidden]
  const Tensor& final_norm() const { return final_norm_; }   // [hidden] fp32
  TensorView lm_head() const { return lm_head_; }            // [vocab, hidden]
  const LayerWeights& layer(int i) const { return layers_[i]; }
  // Bytes of tensor data this process asked the checkpoint for.
  uint64_t bytes_mapped() const { return checkpoint_->bytes_mapped(); }

 private:
  ModelWeights() = default;
  ModelConfig config_;
  WeightSelection selection_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::vector<Tensor> aligned_copies_;  // tensors whose mapped data was misaligned for its dtype
  TensorView embed_tokens_;
  Tensor final_norm_;
  TensorView lm_head_;
  std::vector<LayerWeights> layers_;
};

}  // namespace epx

#endif  // EPX_COMMON_MODEL_WEIGHTS_H_
