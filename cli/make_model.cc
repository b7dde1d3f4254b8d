#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/commands.h"
#include "common/hash.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "nlohmann/json.hpp"

namespace epx {
namespace {

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform values with mean `mean` and standard deviation `stddev`, from a stream keyed by the
// tensor name and seed: the same tensor gets the same values whatever the sharding or threads.
absl::Status FillRandom(const std::string& name, uint64_t seed, float mean, float stddev,
                        DType dtype, uint8_t* dst, size_t nbytes) {
  const int64_t n = static_cast<int64_t>(nbytes / DTypeSize(dtype));
  const int64_t kChunk = 1 << 16;
  const float half_width = stddev * std::sqrt(3.f);
  const uint64_t key = Fnv1a64(name, kFnv1aOffset ^ seed);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < (n + kChunk - 1) / kChunk; ++c) {
    uint64_t state = key ^ (static_cast<uint64_t>(c) * 0xd1342543de82ef95ull);
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) {
      const float u = static_cast<float>(SplitMix64(state) >> 40) * 0x1.0p-24f;  // [0, 1)
      const float v = mean + (2.f * u - 1.f) * half_width;
      switch (dtype) {
        case DType::kF32:
          reinterpret_cast<float*>(dst)[i] = v;
          break;
        case DType::kBF16:
          reinterpret_cast<uint16_t*>(dst)[i] = F32ToBf16(v);
          break;
        default:
          reinterpret_cast<uint16_t*>(dst)[i] = F32ToF16(v);
          break;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status WriteText(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat(path.string(), ": write failed"));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DType> ParseWeightDType(const std::string& name) {
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "fp16" || name == "float16") return DType::kF16;
  if (name == "fp32" || name == "float32") return DType::kF32;
  return absl::InvalidArgumentError(
      absl::StrCat("--dtype must be bf16, fp16 or fp32, got \"", name, "\""));
}

absl::StatusOr<ModelConfig> PresetConfig(const std::string& preset) {
  ModelConfig c;
  c.rope_theta = 1e6;
  c.rms_norm_eps = 1e-5;
  c.num_local_experts = 8;
  c.num_experts_per_tok = 2;
  if (preset == "tiny") {  // the layout of tests/data/tiny-mixtral
    c.vocab_size = 512, c.hidden_size = 128, c.intermediate_size = 448, c.num_hidden_layers = 3;
    c.num_attention_heads = 4, c.num_key_value_heads = 2, c.head_dim = 32;
    c.max_position_embeddings = 4096;
  } else if (preset == "small") {  // ~180 MB: quickstart and demos. The vocabulary is the
    // built-in tokenizer's, so every sampled id decodes to text.
    c.vocab_size = 512, c.hidden_size = 512, c.intermediate_size = 1792;
    c.num_hidden_layers = 4, c.num_attention_heads = 8, c.num_key_value_heads = 2;
    c.head_dim = 64, c.max_position_embeddings = 32768, c.sliding_window = 4096;
  } else if (preset == "mixtral-8x7b") {
    c.vocab_size = 32000, c.hidden_size = 4096, c.intermediate_size = 14336;
    c.num_hidden_layers = 32, c.num_attention_heads = 32, c.num_key_value_heads = 8;
    c.head_dim = 128, c.max_position_embeddings = 32768;
  } else if (preset == "mixtral-8x22b") {
    c.vocab_size = 32768, c.hidden_size = 6144, c.intermediate_size = 16384;
    c.num_hidden_layers = 56, c.num_attention_heads = 48, c.num_key_value_heads = 8;
    c.head_dim = 128, c.max_position_embeddings = 65536;
  } else {
    return absl::NotFoundError(absl::StrCat(
        "unknown preset \"", preset, "\" (known: tiny, small, mixtral-8x7b, mixtral-8x22b)"));
  }
  return c;
}

absl::Status RunMakeModel(const MakeModelOptions& o, std::ostream& log) {
  namespace fs = std::filesystem;
  if (o.out_dir.empty()) return absl::InvalidArgumentError("--out is required");
  if (o.shards < 0) return absl::InvalidArgumentError("--shards must be >= 0 (0: automatic)");
  if (o.dtype != DType::kBF16 && o.dtype != DType::kF16 && o.dtype != DType::kF32)
    return absl::InvalidArgumentError("--dtype must be bf16, fp16 or fp32");
  EPX_ASSIGN_OR_RETURN(ModelConfig c, PresetConfig(o.preset));
  if (o.num_layers) c.num_hidden_layers = *o.num_layers;
  if (o.vocab_size) c.vocab_size = *o.vocab_size;
  if (o.intermediate_size) c.intermediate_size = *o.intermediate_size;
  if (o.num_heads) c.num_attention_heads = *o.num_heads;
  if (o.num_kv_heads) c.num_key_value_heads = *o.num_kv_heads;
  if (o.hidden_size) c.hidden_size = *o.hidden_size;
  if (o.head_dim) c.head_dim = *o.head_dim;
  if (o.num_experts) c.num_local_experts = *o.num_experts;
  if (o.num_experts_per_tok) c.num_experts_per_tok = *o.num_experts_per_tok;
  if (o.max_position_embeddings) c.max_position_embeddings = *o.max_position_embeddings;
  if (o.sliding_window) {
    if (*o.sliding_window == 0)
      c.sliding_window.reset();
    else
      c.sliding_window = *o.sliding_window;
  }
  c.torch_dtype = o.dtype;
  EPX_RETURN_IF_ERROR(c.Validate("make-model"));
  EPX_ASSIGN_OR_RETURN(std::string tokenizer, BuiltinTokenizerModel(c.vocab_size));

  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(o.out_dir, ": ", ec.message()));
  const fs::path dir(o.out_dir);

  // Tensors in HF order; weights ~ U with std 1/sqrt(fan_in) keep activations O(1) through
  // random layers, norms ~ 1 +- 0.1.
  struct Spec {
    std::string name;
    Shape shape;
    float mean, stddev;
  };
  std::vector<Spec> specs;
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const float sh = 1.f / std::sqrt(static_cast<float>(H));
  specs.push_back({"model.embed_tokens.weight", {c.vocab_size, H}, 0.f, 1.f});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    specs.push_back({p + "input_layernorm.weight", {H}, 1.f, 0.1f});
    specs.push_back({p + "self_attn.q_proj.weight", {c.q_size(), H}, 0.f, sh});
    specs.push_back({p + "self_attn.k_proj.weight", {c.kv_size(), H}, 0.f, sh});
    specs.push_back({p + "self_attn.v_proj.weight", {c.kv_size(), H}, 0.f, sh});
    specs.push_back({p + "self_attn.o_proj.weight",
                     {H, c.q_size()},
                     0.f,
                     1.f / std::sqrt(static_cast<float>(c.q_size()))});
    specs.push_back({p + "post_attention_layernorm.weight", {H}, 1.f, 0.1f});
    specs.push_back({p + "block_sparse_moe.gate.weight", {c.num_local_experts, H}, 0.f, sh});
    for (int64_t e = 0; e < c.num_local_experts; ++e) {
      const std::string q = absl::StrCat(p, "block_sparse_moe.experts.", e, ".");
      specs.push_back({q + "w1.weight", {I, H}, 0.f, sh});
      specs.push_back({q + "w2.weight", {H, I}, 0.f, 1.f / std::sqrt(static_cast<float>(I))});
      specs.push_back({q + "w3.weight", {I, H}, 0.f, sh});
    }
  }
  specs.push_back({"model.norm.weight", {H}, 1.f, 0.1f});
  specs.push_back({"lm_head.weight", {c.vocab_size, H}, 0.f, sh});

  uint64_t total_bytes = 0;
  for (const Spec& s : specs) total_bytes += NumElements(s.shape) * DTypeSize(o.dtype);
  // Shards: with --shards N, a contiguous split into N parts of about equal bytes; by default,
  // files packed up to 5 GB, as Hugging Face checkpoints are. Only non-empty shards are written
  // and numbered.
  constexpr uint64_t kAutoShardBytes = uint64_t{5} << 30;
  const int64_t wanted = std::min<int64_t>(o.shards, static_cast<int64_t>(specs.size()));
  std::vector<std::vector<SafetensorsWriteEntry>> per_shard(1);
  uint64_t running = 0, in_shard = 0;
  for (const Spec& s : specs) {
    const uint64_t bytes = NumElements(s.shape) * DTypeSize(o.dtype);
    const bool next =
        wanted > 0 ? static_cast<int64_t>(per_shard.size()) < wanted &&
                         running * wanted >= per_shard.size() * std::max<uint64_t>(total_bytes, 1)
                   : in_shard > 0 && in_shard + bytes > kAutoShardBytes;
    if (next && !per_shard.back().empty()) {
      per_shard.emplace_back();
      in_shard = 0;
    }
    running += bytes;
    in_shard += bytes;
    const uint64_t seed = o.seed;
    const DType dtype = o.dtype;
    per_shard.back().push_back({s.name, o.dtype, s.shape, [s, seed, dtype](uint8_t* dst, size_t n) {
                                  return FillRandom(s.name, seed, s.mean, s.stddev, dtype, dst, n);
                                }});
  }
  const int64_t shards = static_cast<int64_t>(per_shard.size());
  // Weights of an earlier run in the same directory must not mix with these.
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name == "model.safetensors" || name == "model.safetensors.index.json" ||
        (name.rfind("model-", 0) == 0 && name.size() > 12 &&
         name.compare(name.size() - 12, 12, ".safetensors") == 0))
      fs::remove(entry.path(), ec);
  }
  nlohmann::json weight_map = nlohmann::json::object();
  for (int64_t k = 0; k < shards && !o.config_only; ++k) {
    const std::string file = shards == 1
                                 ? "model.safetensors"
                                 : absl::StrFormat("model-%05d-of-%05d.safetensors", k + 1, shards);
    EPX_RETURN_IF_ERROR(WriteSafetensors((dir / file).string(), per_shard[k], {{"format", "pt"}}));
    for (const auto& e : per_shard[k]) weight_map[e.name] = file;
    log << "wrote " << (dir / file).string() << "\n";
  }
  if (shards > 1 && !o.config_only) {
    nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}},
                            {"weight_map", weight_map}};
    EPX_RETURN_IF_ERROR(WriteText(dir / "model.safetensors.index.json", index.dump(2) + "\n"));
  }
  EPX_RETURN_IF_ERROR(WriteText(dir / "config.json", c.ToJson()));
  nlohmann::json gen = {{"bos_token_id", c.bos_token_id}, {"eos_token_id", c.eos_token_ids[0]}};
  EPX_RETURN_IF_ERROR(WriteText(dir / "generation_config.json", gen.dump(2) + "\n"));
  EPX_RETURN_IF_ERROR(WriteText(dir / "tokenizer.model", tokenizer));
  if (o.config_only) {
    log << "made the " << o.preset << " config and tokenizer in " << o.out_dir
        << " without weights: run it with --device cuda --load-format dummy\n";
    return absl::OkStatus();
  }
  log << "made " << o.preset << " model in " << o.out_dir << ": " << total_bytes / 1e6 << " MB of "
      << DTypeName(o.dtype) << " weights in " << shards << " file(s)\n";
  return absl::OkStatus();
}

}  // namespace epx
