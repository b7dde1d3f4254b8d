// The model hyper-parameters of a Mixtral-family checkpoint, parsed from a Hugging Face
// config.json. Immutable after parsing; thread-safe to share.
#ifndef EPX_COMMON_MODEL_CONFIG_H_
#define EPX_COMMON_MODEL_CONFIG_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace epx {

struct ModelConfig {
  std::string model_type = "mixtral";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // defaults to num_attention_heads
  int64_t head_dim = 0;             // defaults to hidden_size / num_attention_heads
  int64_t num_local_experts = 0;
  int64_t num_experts_per_tok = 0;
  double rope_theta = 1e6;
  double rms_norm_eps = 1e-5;
  std::optional<int64_t> sliding_window;     // null or absent: full causal attention
  int64_t max_position_embeddings = 131072;  // Hugging Face MixtralConfig's default
  int32_t bos_token_id = 1;
  std::vector<int32_t> eos_token_ids = {2};
  bool tie_word_embeddings = false;
  DType torch_dtype = DType::kBF16;

  // Parses and validates; errors name the file and the key (InvalidArgument).
  static absl::StatusOr<ModelConfig> FromJson(const std::string& text,
                                              const std::string& source = "config.json");
  static absl::StatusOr<ModelConfig> FromFile(const std::string& path);
  // `dir`/config.json.
  static absl::StatusOr<ModelConfig> FromDir(const std::string& dir);

  // Applies the token ids of an optional `generation_config.json` (bos_token_id, eos_token_id
  // as an integer or a list), as Hugging Face generate() does. A missing file is OK; a malformed
  // one is InvalidArgument naming it.
  absl::Status ApplyGenerationConfig(const std::string& path);

  // Checks the relations between fields (positivity, divisibility, top-k <= experts, ...).
  absl::Status Validate(const std::string& source = "config") const;
  // The HF config.json for this configuration (what make-model writes).
  std::string ToJson() const;
  // A stable 64-bit fingerprint of the fields that define the computation (for rank agreement).
  uint64_t Hash() const;

  int64_t q_size() const { return num_attention_heads * head_dim; }
  int64_t kv_size() const { return num_key_value_heads * head_dim; }
  int64_t gqa_group() const { return num_attention_heads / num_key_value_heads; }
};

}  // namespace epx

#endif  // EPX_COMMON_MODEL_CONFIG_H_
