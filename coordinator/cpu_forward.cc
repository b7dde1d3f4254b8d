// The CPU backend of ModelForward: the reference forward pass over kernels/cpu, fp32 throughout.
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/stopwatch.h"
#include "coordinator/model_forward.h"
#include "kernels/cpu/ops.h"

namespace epx {
namespace {

class CpuForward : public ModelForward {
 public:
  CpuForward(const ModelWeights* weights, ExpertExecutor* experts)
      : weights_(weights), experts_(experts), attention_(AttentionParamsOf(weights->config())) {}

  int64_t kv_element_bytes() const override { return sizeof(float); }
  std::string device() const override { return "cpu"; }
  bool reports_routing() const override { return true; }

  absl::Status AllocateKv(int64_t num_blocks, int64_t block_size) override {
    const ModelConfig& c = weights_->config();
    const int64_t floats = num_blocks * block_size * c.kv_size();
    try {
      // Left uninitialised: a row is written before it is read, and untouched pages of a large
      // pool cost no memory.
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        keys_.emplace_back(new float[floats]);
        values_.emplace_back(new float[floats]);
      }
    } catch (const std::bad_alloc&) {
      keys_.clear();
      values_.clear();
      return absl::ResourceExhaustedError(
          absl::StrCat("KV cache: cannot allocate ", num_blocks, " blocks (",
                       2 * c.num_hidden_layers * floats * int64_t{sizeof(float)} >> 20, " MiB)"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Tensor> Forward(const ForwardBatch& batch, EngineStats& stats) override;

 private:
  const ModelWeights* weights_;
  ExpertExecutor* experts_;
  const cpu::AttentionParams attention_;
  std::vector<std::unique_ptr<float[]>> keys_;    // [layer][num_blocks * block_size * kv_size]
  std::vector<std::unique_ptr<float[]>> values_;  // [layer][num_blocks * block_size * kv_size]
};

absl::StatusOr<Tensor> CpuForward::Forward(const ForwardBatch& batch, EngineStats& stats) {
  const ModelConfig& c = weights_->config();
  const int64_t H = c.hidden_size, Q = c.q_size(), KV = c.kv_size(), K = c.num_experts_per_tok;
  const int64_t T = static_cast<int64_t>(batch.ids.size());
  if (experts_->memory() != MemoryKind::kHost)
    return absl::FailedPreconditionError("the CPU forward needs an expert executor on the host");
  EPX_RETURN_IF_ERROR(experts_->BeginStep());

  Tensor x = Tensor::Empty(DType::kF32, {T, H});
  Tensor xn = Tensor::Empty(DType::kF32, {T, H});
  Tensor q = Tensor::Empty(DType::kF32, {T, Q});
  Tensor k = Tensor::Empty(DType::kF32, {T, KV});
  Tensor v = Tensor::Empty(DType::kF32, {T, KV});
  Tensor attn = Tensor::Empty(DType::kF32, {T, Q});
  Tensor proj = Tensor::Empty(DType::kF32, {T, H});
  Tensor router_logits = Tensor::Empty(DType::kF32, {T, c.num_local_experts});
  Tensor topk_ids = Tensor::Empty(DType::kI32, {T, K});
  Tensor topk_weights = Tensor::Empty(DType::kF32, {T, K});
  Tensor rope = Tensor::Empty(DType::kF32, {T, c.head_dim});
  EPX_RETURN_IF_ERROR(cpu::Embedding(batch.ids, weights_->embed_tokens(), x));
  EPX_RETURN_IF_ERROR(cpu::RopeTable(batch.positions, c.head_dim, c.rope_theta, rope));

  // Which keys each token reads: the same in every layer but for the pools.
  std::vector<cpu::AttentionKv> kv(T);
  for (const ForwardBatch::Sequence& s : batch.sequences) {
    for (int64_t i = 0; i < s.num_tokens; ++i)
      kv[s.first_token + i] = {.row_stride = KV, .position = s.first_position + i,
                               .block_table = s.block_table, .block_size = batch.block_size};
  }
  const float eps = static_cast<float>(c.rms_norm_eps);

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = weights_->layer(l);
    Stopwatch watch;
    EPX_RETURN_IF_ERROR(cpu::RmsNorm(x, lw.input_norm, eps, xn));
    EPX_RETURN_IF_ERROR(cpu::Linear(xn, lw.q_proj, q));
    EPX_RETURN_IF_ERROR(cpu::Linear(xn, lw.k_proj, k));
    EPX_RETURN_IF_ERROR(cpu::Linear(xn, lw.v_proj, v));
    EPX_RETURN_IF_ERROR(cpu::ApplyRope(q, c.head_dim, rope));
    EPX_RETURN_IF_ERROR(cpu::ApplyRope(k, c.head_dim, rope));
    float* keys = keys_[l].get();
    float* values = values_[l].get();
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(keys + batch.kv_rows[t] * KV, k.data<float>() + t * KV, KV * sizeof(float));
      std::memcpy(values + batch.kv_rows[t] * KV, v.data<float>() + t * KV, KV * sizeof(float));
      kv[t].k = keys;
      kv[t].v = values;
    }
    EPX_RETURN_IF_ERROR(cpu::Attention(q, kv, attention_, attn));
    EPX_RETURN_IF_ERROR(cpu::Linear(attn, lw.o_proj, proj));
    EPX_RETURN_IF_ERROR(cpu::Add(x, proj, x));  // x now holds h
    stats.attention_us[l] += watch.Micros();

    watch.Restart();
    EPX_RETURN_IF_ERROR(cpu::RmsNorm(x, lw.post_attention_norm, eps, xn));
    EPX_RETURN_IF_ERROR(cpu::Linear(xn, lw.gate, router_logits));
    EPX_RETURN_IF_ERROR(cpu::RouterTopK(router_logits, topk_ids, topk_weights));
    EPX_ASSIGN_OR_RETURN(ExpertOutput out,
                         experts_->Run(static_cast<int>(l), {.x = xn, .topk_ids = topk_ids}));
    // The host executors return slot order.
    if (!out.row_of_slot.empty() || out.rows.dtype() != DType::kF32)
      return absl::InternalError("the CPU forward takes F32 expert outputs in slot order");
    EPX_RETURN_IF_ERROR(cpu::MoeCombine(x, out.rows, topk_weights, x));
    stats.moe_us[l] += watch.Micros();
    const int32_t* routed = topk_ids.data<const int32_t>();
    for (int64_t i = 0; i < T * K; ++i) ++stats.expert_tokens[l][routed[i]];
    if (!batch.routed.empty())
      std::memcpy(batch.routed.data() + l * T * K, routed, T * K * sizeof(int32_t));
  }

  const int64_t R = static_cast<int64_t>(batch.logit_rows.size());
  Tensor last = Tensor::Empty(DType::kF32, {R, H});
  for (int64_t r = 0; r < R; ++r)
    std::memcpy(last.data<float>() + r * H, x.data<float>() + batch.logit_rows[r] * H,
                H * sizeof(float));
  EPX_RETURN_IF_ERROR(cpu::RmsNorm(last, weights_->final_norm(), eps, last));
  Tensor logits = Tensor::Empty(DType::kF32, {R, c.vocab_size});
  EPX_RETURN_IF_ERROR(cpu::Linear(last, weights_->lm_head(), logits));
  return logits;
}

}  // namespace

std::unique_ptr<ModelForward> NewCpuForward(const ModelWeights* weights, ExpertExecutor* experts) {
  return std::make_unique<CpuForward>(weights, experts);
}

}  // namespace epx
