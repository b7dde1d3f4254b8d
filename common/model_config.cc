#include "common/model_config.h"

#include <bit>
#include <cmath>
#include <filesystem>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/hash.h"
#include "common/json.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace epx {
namespace {

using nlohmann::json;

absl::Status Bad(const std::string& source, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
}

// Reads an optional integer key; null counts as absent.
absl::Status ReadInt(const json& j, const std::string& source, const char* key, bool required,
                     int64_t* out) {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) return Bad(source, absl::StrCat("missing required key \"", key, "\""));
    return absl::OkStatus();
  }
  const json& v = j[key];
  if (v.is_number_integer()) {
    *out = v.get<int64_t>();
  } else if (v.is_number_float() && std::abs(v.get<double>()) < 0x1p62 &&
             v.get<double>() == std::floor(v.get<double>())) {  // e.g. 4096.0; range first
    *out = static_cast<int64_t>(v.get<double>());
  } else {
    return Bad(source, absl::StrCat("\"", key, "\" must be an integer, got ", v.dump()));
  }
  return absl::OkStatus();
}

absl::Status ReadDouble(const json& j, const std::string& source, const char* key, double* out) {
  if (!j.contains(key) || j[key].is_null()) return absl::OkStatus();
  if (!j[key].is_number())
    return Bad(source, absl::StrCat("\"", key, "\" must be a number, got ", j[key].dump()));
  *out = j[key].get<double>();
  return absl::OkStatus();
}

// bos_token_id and eos_token_id (an integer or a list); absent keys leave `c` as it is.
absl::Status ReadTokenIds(const json& j, const std::string& source, ModelConfig* config) {
  ModelConfig& c = *config;
  // Token ids are stored as int32: a wider value must not wrap into the vocabulary. Validate()
  // checks the range.
  auto token_id = [&](const char* key, int64_t id) -> absl::StatusOr<int32_t> {
    if (id < std::numeric_limits<int32_t>::min() || id > std::numeric_limits<int32_t>::max())
      return Bad(source, absl::StrCat(key, " ", id, " does not fit in 32 bits"));
    return static_cast<int32_t>(id);
  };
  int64_t bos = c.bos_token_id;
  EPX_RETURN_IF_ERROR(ReadInt(j, source, "bos_token_id", false, &bos));
  EPX_ASSIGN_OR_RETURN(c.bos_token_id, token_id("bos_token_id", bos));
  if (j.contains("eos_token_id") && !j["eos_token_id"].is_null()) {
    const json& e = j["eos_token_id"];
    c.eos_token_ids.clear();
    if (e.is_number_integer()) {
      EPX_ASSIGN_OR_RETURN(int32_t eos, token_id("eos_token_id", e.get<int64_t>()));
      c.eos_token_ids.push_back(eos);
    } else if (e.is_array()) {
      for (const json& id : e) {
        if (!id.is_number_integer())
          return Bad(source,
                     absl::StrCat("\"eos_token_id\" entries must be integers, got ", e.dump()));
        EPX_ASSIGN_OR_RETURN(int32_t eos, token_id("eos_token_id", id.get<int64_t>()));
        c.eos_token_ids.push_back(eos);
      }
    } else {
      return Bad(source,
                 absl::StrCat("\"eos_token_id\" must be an integer or a list, got ", e.dump()));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfig::FromJson(const std::string& text,
                                                  const std::string& source) {
  EPX_ASSIGN_OR_RETURN(json j, ParseJson(text, source));
  if (!j.is_object()) return Bad(source, "not a JSON object");
  ModelConfig c;
  if (j.contains("model_type")) {
    if (!j["model_type"].is_string()) return Bad(source, "\"model_type\" must be a string");
    c.model_type = j["model_type"].get<std::string>();
    if (c.model_type != "mixtral")
      return Bad(source, absl::StrCat("model_type \"", c.model_type,
                                      "\" is not supported (epx runs \"mixtral\")"));
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
    return Bad(source, absl::StrCat("rope_scaling ", j["rope_scaling"].dump(),
                                    " is not supported (Mixtral uses plain RoPE)"));
  if (j.contains("hidden_act") && j["hidden_act"] != "silu")
    return Bad(source, absl::StrCat("hidden_act ", j["hidden_act"].dump(),
                                    " is not supported (Mixtral experts use \"silu\")"));
  EPX_RETURN_IF_ERROR(ReadInt(j, source, "vocab_size", true, &c.vocab_size));
  EPX_RETURN_IF_ERROR(ReadInt(j, source, "hidden_size", true, &c.hidden_size));
  EPX_RETURN_IF_ERROR(ReadInt(j, source, "intermediate_size", true, &c.intermediate_size));
  EPX_RETURN_IF_ERROR(ReadInt(j, source, "num_hidden_layers", true, &c.num_hidden_layers));
  EPX_RETURN_IF_ERROR(ReadInt(j, source, "num_attention_heads", true, &c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  EPX_RETURN_IF_ERROR(ReadInt(j, source, "num_key_value_heads", false, &c.num_key_value_heads));
  if (c.num_attention_heads > 0) c.head_dim = c.hidden_size / c.num_attention_heads;
  EPX_RETURN_IF_ERROR(ReadInt(j, source, "head_dim", false, &c.head_dim));
  EPX_RETURN_IF_ERROR(ReadInt(j, source, "num_local_experts", true, &c.num_local_experts));
  EPX_RETURN_IF_ERROR(ReadInt(j, source, "num_experts_per_tok", true, &c.num_experts_per_tok));
  EPX_RETURN_IF_ERROR(ReadDouble(j, source, "rope_theta", &c.rope_theta));
  EPX_RETURN_IF_ERROR(ReadDouble(j, source, "rms_norm_eps", &c.rms_norm_eps));
  if (j.contains("sliding_window") && !j["sliding_window"].is_null()) {
    int64_t w = 0;
    EPX_RETURN_IF_ERROR(ReadInt(j, source, "sliding_window", false, &w));
    c.sliding_window = w;
  }
  EPX_RETURN_IF_ERROR(
      ReadInt(j, source, "max_position_embeddings", false, &c.max_position_embeddings));
  EPX_RETURN_IF_ERROR(ReadTokenIds(j, source, &c));
  if (j.contains("tie_word_embeddings") && !j["tie_word_embeddings"].is_null()) {
    if (!j["tie_word_embeddings"].is_boolean())
      return Bad(source, "\"tie_word_embeddings\" must be true or false");
    c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  }
  if (j.contains("torch_dtype") && j["torch_dtype"].is_string()) {
    const std::string d = j["torch_dtype"].get<std::string>();
    if (d == "bfloat16") {
      c.torch_dtype = DType::kBF16;
    } else if (d == "float16") {
      c.torch_dtype = DType::kF16;
    } else if (d == "float32") {
      c.torch_dtype = DType::kF32;
    } else {
      return Bad(source, absl::StrCat("torch_dtype \"", d,
                                      "\" is not supported (bfloat16, float16, float32)"));
    }
  }
  EPX_RETURN_IF_ERROR(c.Validate(source));
  return c;
}

absl::Status ModelConfig::Validate(const std::string& source) const {
  // Positive and bounded: far above any real model, low enough that no size computed from them
  // overflows (the largest product, vocab * hidden, stays below 2^44).
  auto in_range = [&](const char* key, int64_t v, int64_t max) -> absl::Status {
    if (v <= 0) return Bad(source, absl::StrCat("\"", key, "\" must be positive, got ", v));
    if (v > max)
      return Bad(source, absl::StrCat("\"", key, "\" = ", v, " exceeds the supported ", max));
    return absl::OkStatus();
  };
  EPX_RETURN_IF_ERROR(in_range("vocab_size", vocab_size, int64_t{1} << 24));
  EPX_RETURN_IF_ERROR(in_range("hidden_size", hidden_size, int64_t{1} << 20));
  EPX_RETURN_IF_ERROR(in_range("intermediate_size", intermediate_size, int64_t{1} << 22));
  EPX_RETURN_IF_ERROR(in_range("num_hidden_layers", num_hidden_layers, 4096));
  EPX_RETURN_IF_ERROR(in_range("num_attention_heads", num_attention_heads, 4096));
  EPX_RETURN_IF_ERROR(in_range("num_key_value_heads", num_key_value_heads, 4096));
  EPX_RETURN_IF_ERROR(in_range("head_dim", head_dim, 65536));
  EPX_RETURN_IF_ERROR(in_range("num_local_experts", num_local_experts, 4096));
  EPX_RETURN_IF_ERROR(in_range("num_experts_per_tok", num_experts_per_tok, 4096));
  EPX_RETURN_IF_ERROR(
      in_range("max_position_embeddings", max_position_embeddings, int64_t{1} << 26));
  if (num_attention_heads % num_key_value_heads != 0)
    return Bad(source, absl::StrCat("num_attention_heads (", num_attention_heads,
                                    ") must be a multiple of num_key_value_heads (",
                                    num_key_value_heads, ")"));
  if (head_dim % 2 != 0)
    return Bad(source, absl::StrCat("head_dim (", head_dim, ") must be even for RoPE"));
  if (num_experts_per_tok > num_local_experts)
    return Bad(source, absl::StrCat("num_experts_per_tok (", num_experts_per_tok,
                                    ") exceeds num_local_experts (", num_local_experts, ")"));
  if (q_size() > (int64_t{1} << 24))
    return Bad(source, absl::StrCat("num_attention_heads * head_dim = ", q_size(),
                                    " exceeds the supported ", int64_t{1} << 24));
  if (sliding_window.has_value() && *sliding_window <= 0)
    return Bad(source,
               absl::StrCat("\"sliding_window\" must be positive or null, got ", *sliding_window));
  if (!(rope_theta > 0)) return Bad(source, "\"rope_theta\" must be positive");
  if (!(rms_norm_eps > 0)) return Bad(source, "\"rms_norm_eps\" must be positive");
  if (bos_token_id < 0 || bos_token_id >= vocab_size)
    return Bad(source, absl::StrCat("bos_token_id ", bos_token_id,
                                    " is outside the vocabulary [0, ", vocab_size, ")"));
  for (int32_t eos : eos_token_ids) {
    if (eos < 0 || eos >= vocab_size)
      return Bad(source, absl::StrCat("eos_token_id ", eos, " is outside the vocabulary [0, ",
                                      vocab_size, ")"));
  }
  return absl::OkStatus();
}

absl::Status ModelConfig::ApplyGenerationConfig(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec) && !ec) return absl::OkStatus();
  EPX_ASSIGN_OR_RETURN(json j, ParseJsonFile(path));
  if (!j.is_object()) return Bad(path, "not a JSON object");
  ModelConfig updated = *this;
  EPX_RETURN_IF_ERROR(ReadTokenIds(j, path, &updated));
  EPX_RETURN_IF_ERROR(updated.Validate(path));
  *this = std::move(updated);
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ModelConfig::FromFile(const std::string& path) {
  EPX_ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
  return FromJson(text, path);
}

absl::StatusOr<ModelConfig> ModelConfig::FromDir(const std::string& dir) {
  return FromFile(dir + "/config.json");
}

std::string ModelConfig::ToJson() const {
  json j;
  j["architectures"] = {"MixtralForCausalLM"};
  j["model_type"] = "mixtral";
  j["hidden_act"] = "silu";
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["num_local_experts"] = num_local_experts;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["rope_theta"] = rope_theta;
  j["rms_norm_eps"] = rms_norm_eps;
  j["sliding_window"] = sliding_window.has_value() ? json(*sliding_window) : json(nullptr);
  j["max_position_embeddings"] = max_position_embeddings;
  j["bos_token_id"] = bos_token_id;
  j["eos_token_id"] = eos_token_ids.size() == 1 ? json(eos_token_ids[0]) : json(eos_token_ids);
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["torch_dtype"] = torch_dtype == DType::kBF16  ? "bfloat16"
                     : torch_dtype == DType::kF16 ? "float16"
                                                  : "float32";
  j["use_cache"] = true;
  return j.dump(2) + "\n";
}

uint64_t ModelConfig::Hash() const {
  // FNV-1a over a canonical text of the computation-defining fields. Doubles enter as their bit
  // patterns: StrCat would print only six significant digits.
  const std::string canon =
      absl::StrCat(vocab_size, ",", hidden_size, ",", intermediate_size, ",", num_hidden_layers,
                   ",", num_attention_heads, ",", num_key_value_heads, ",", head_dim, ",",
                   num_local_experts, ",", num_experts_per_tok, ",",
                   std::bit_cast<uint64_t>(rope_theta), ",", std::bit_cast<uint64_t>(rms_norm_eps),
                   ",", sliding_window.value_or(-1), ",", tie_word_embeddings);
  return Fnv1a64(canon);
}

}  // namespace epx
