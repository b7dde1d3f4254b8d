#include "common/model_weights.h"

#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace epx {
namespace {

class Loader {
 public:
  Loader(Checkpoint* ckpt, std::string config_path, std::vector<Tensor>* copies)
      : ckpt_(ckpt), config_path_(std::move(config_path)), copies_(copies) {}

  // A matrix or vector view with the expected shape and a floating-point dtype.
  absl::StatusOr<TensorView> Get(const std::string& name, Shape expected, const char* meaning) {
    if (!ckpt_->Contains(name))
      return absl::NotFoundError(absl::StrCat(ckpt_->dir(), ": the checkpoint has no tensor '",
                                              name, "' (", meaning, ")"));
    const std::string file = (std::filesystem::path(ckpt_->dir()) / ckpt_->FileOf(name)).string();
    EPX_ASSIGN_OR_RETURN(TensorView view, ckpt_->Get(name));
    if (view.dtype() != DType::kBF16 && view.dtype() != DType::kF16 && view.dtype() != DType::kF32)
      return absl::InvalidArgumentError(absl::StrCat(file, ": tensor '", name, "' has dtype ",
                                                     DTypeName(view.dtype()),
                                                     "; weights must be BF16, F16 or F32"));
    if (view.shape() != expected)
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": tensor '", name, "' has shape ", ShapeString(view.shape()), " but ",
                       config_path_, " implies ", ShapeString(expected), " (", meaning, ")"));
    // The format does not align data to the element size; kernels read whole elements, so a
    // misaligned tensor is copied once.
    if (reinterpret_cast<uintptr_t>(view.raw()) % DTypeSize(view.dtype()) != 0) {
      Tensor copy = Tensor::Empty(view.dtype(), view.shape());
      std::memcpy(copy.data<uint8_t>(), view.raw(), view.nbytes());
      view = copy.view();
      copies_->push_back(std::move(copy));
    }
    return view;
  }

  absl::StatusOr<Tensor> GetF32(const std::string& name, Shape expected, const char* meaning) {
    EPX_ASSIGN_OR_RETURN(TensorView view, Get(name, std::move(expected), meaning));
    return ToF32(view);
  }

 private:
  Checkpoint* ckpt_;
  std::string config_path_;
  std::vector<Tensor>* copies_;
};

}  // namespace

WeightSelection WeightSelection::All(const ModelConfig& config) {
  WeightSelection s;
  for (int e = 0; e < config.num_local_experts; ++e) s.experts.push_back(e);
  return s;
}

absl::StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Load(const std::string& dir,
                                                                 const ModelConfig& config,
                                                                 const WeightSelection& selection) {
  EPX_RETURN_IF_ERROR(config.Validate());
  for (int e : selection.experts) {
    if (e < 0 || e >= config.num_local_experts)
      return absl::InvalidArgumentError(absl::StrCat(
          "expert ", e, " does not exist (the model has ", config.num_local_experts, " experts)"));
  }
  auto w = std::unique_ptr<ModelWeights>(new ModelWeights());
  w->config_ = config;
  w->selection_ = selection;
  EPX_ASSIGN_OR_RETURN(w->checkpoint_, Checkpoint::Open(dir));
  Loader l(w->checkpoint_.get(), (std::filesystem::path(dir) / "config.json").string(),
           &w->aligned_copies_);
  const int64_t H = config.hidden_size, V = config.vocab_size, I = config.intermediate_size;
  const int64_t Q = config.q_size(), KV = config.kv_size(), E = config.num_local_experts;

  if (selection.non_expert) {
    EPX_ASSIGN_OR_RETURN(w->embed_tokens_,
                         l.Get("model.embed_tokens.weight", {V, H}, "vocab_size, hidden_size"));
    EPX_ASSIGN_OR_RETURN(w->final_norm_, l.GetF32("model.norm.weight", {H}, "hidden_size"));
    if (config.tie_word_embeddings) {  // as Hugging Face ties them, even if lm_head is stored
      w->lm_head_ = w->embed_tokens_;
    } else {
      EPX_ASSIGN_OR_RETURN(w->lm_head_, l.Get("lm_head.weight", {V, H}, "vocab_size, hidden_size"));
    }
  }
  w->layers_.resize(config.num_hidden_layers);
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    LayerWeights& layer = w->layers_[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    if (selection.non_expert) {
      EPX_ASSIGN_OR_RETURN(layer.input_norm,
                           l.GetF32(p + "input_layernorm.weight", {H}, "hidden_size"));
      EPX_ASSIGN_OR_RETURN(layer.post_attention_norm,
                           l.GetF32(p + "post_attention_layernorm.weight", {H}, "hidden_size"));
      EPX_ASSIGN_OR_RETURN(layer.q_proj, l.Get(p + "self_attn.q_proj.weight", {Q, H},
                                               "num_attention_heads * head_dim, hidden_size"));
      EPX_ASSIGN_OR_RETURN(layer.k_proj, l.Get(p + "self_attn.k_proj.weight", {KV, H},
                                               "num_key_value_heads * head_dim, hidden_size"));
      EPX_ASSIGN_OR_RETURN(layer.v_proj, l.Get(p + "self_attn.v_proj.weight", {KV, H},
                                               "num_key_value_heads * head_dim, hidden_size"));
      EPX_ASSIGN_OR_RETURN(layer.o_proj, l.Get(p + "self_attn.o_proj.weight", {H, Q},
                                               "hidden_size, num_attention_heads * head_dim"));
      EPX_ASSIGN_OR_RETURN(layer.gate, l.Get(p + "block_sparse_moe.gate.weight", {E, H},
                                             "num_local_experts, hidden_size"));
    }
    layer.experts.resize(E);
    for (int e : selection.experts) {
      const std::string q = absl::StrCat(p, "block_sparse_moe.experts.", e, ".");
      ExpertWeights& ew = layer.experts[e];
      EPX_ASSIGN_OR_RETURN(ew.w1, l.Get(q + "w1.weight", {I, H}, "intermediate_size, hidden_size"));
      EPX_ASSIGN_OR_RETURN(ew.w2, l.Get(q + "w2.weight", {H, I}, "hidden_size, intermediate_size"));
      EPX_ASSIGN_OR_RETURN(ew.w3, l.Get(q + "w3.weight", {I, H}, "intermediate_size, hidden_size"));
    }
  }
  return w;
}

}  // namespace epx
