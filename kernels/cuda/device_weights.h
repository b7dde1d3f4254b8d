// A model's weights on the GPU, by role: the coordinator's non-expert tensors (embedding,
// attention, norms, router, lm_head) and the experts this process computes. Matrices are BF16
// (fp16 and fp32 checkpoints are converted on the device as they are uploaded); q/k/v are stacked
// into one [q + 2 kv, hidden] matrix and w1/w3 into one [2 * intermediate, hidden] matrix per
// expert so that each takes one GEMM; norm vectors are F32. Expert weights may instead be FP8
// e4m3 with a per-row scale (quantised on the device), which halves their memory and the bytes a
// decode step reads. Dummy weights are filled on the device (common/dummy_weights.h) at the
// config's shapes, with no checkpoint.
//
// Immutable after creation; the views are safe to read from any thread.
#ifndef EPX_KERNELS_CUDA_DEVICE_WEIGHTS_H_
#define EPX_KERNELS_CUDA_DEVICE_WEIGHTS_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/model_weights.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"

namespace epx {

struct DeviceLayerWeights {
  TensorView input_norm;           // [hidden] F32
  TensorView post_attention_norm;  // [hidden] F32
  TensorView qkv_proj;             // [q_size + 2 * kv_size, hidden] BF16
  TensorView o_proj;               // [hidden, q_size] BF16
  TensorView gate;                 // [num_experts, hidden] BF16
  std::vector<cuda::DeviceExpert> experts;  // [num_experts]; unloaded entries are empty
};

struct DeviceWeightOptions {
  bool non_expert = true;          // upload the coordinator's tensors
  std::vector<int> experts;        // experts to upload (all layers)
  DType expert_dtype = DType::kBF16;  // kBF16 or kF8E4M3
  uint64_t dummy_seed = 0;         // Dummy(): the model's seed
};

class DeviceModelWeights {
 public:
  // Uploads the selected tensors of `host` (which must hold them). Errors: a tensor the selection
  // needs is not in `host` (FailedPrecondition), the GPU is full (ResourceExhausted, naming what
  // was being uploaded), CUDA errors.
  static absl::StatusOr<std::unique_ptr<DeviceModelWeights>> Upload(
      const ModelWeights& host, const DeviceWeightOptions& options, cuda::StreamHandle stream);
  // Synthetic weights for `config`, generated on the device.
  static absl::StatusOr<std::unique_ptr<DeviceModelWeights>> Dummy(
      const ModelConfig& config, const DeviceWeightOptions& options, cuda::StreamHandle stream);

  const ModelConfig& config() const { return config_; }
  const DeviceWeightOptions& options() const { return options_; }
  TensorView embed_tokens() const { return embed_tokens_; }  // [vocab, hidden] BF16
  TensorView final_norm() const { return final_norm_; }      // [hidden] F32
  TensorView lm_head() const { return lm_head_; }            // [vocab, hidden] BF16
  const DeviceLayerWeights& layer(int64_t i) const { return layers_[i]; }
  // Device bytes held.
  int64_t bytes() const { return bytes_; }

 private:
  class Builder;
  DeviceModelWeights() = default;

  ModelConfig config_;
  DeviceWeightOptions options_;
  std::vector<cuda::DeviceBuffer> buffers_;
  TensorView embed_tokens_, final_norm_, lm_head_;
  std::vector<DeviceLayerWeights> layers_;
  int64_t bytes_ = 0;
};

}  // namespace epx

#endif  // EPX_KERNELS_CUDA_DEVICE_WEIGHTS_H_
