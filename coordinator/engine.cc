#include "coordinator/engine.h"

#include <cmath>
#include <cstring>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/stopwatch.h"
#include "kernels/cpu/ops.h"

namespace epx {
int64_t EngineOptions::KvBlocks(const ModelConfig& config) const {
  if (kv_blocks > 0) return kv_blocks;
  return KvCacheOptions::BlocksForBytes(kv_cache_bytes, config.num_hidden_layers,
                                        config.kv_size(), kv_block_size);
}

Engine::Engine(const ModelWeights* weights, ExpertExecutor* experts, KvCache cache)
    : weights_(weights), experts_(experts), cache_(std::move(cache)) {
  const ModelConfig& c = weights->config();
  stats_.attention_us.assign(c.num_hidden_layers, 0);
  stats_.moe_us.assign(c.num_hidden_layers, 0);
  stats_.expert_tokens.assign(c.num_hidden_layers, std::vector<int64_t>(c.num_local_experts, 0));
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const ModelWeights* weights,
                                                       ExpertExecutor* experts,
                                                       const EngineOptions& options) {
  if (weights == nullptr || !weights->selection().non_expert)
    return absl::InvalidArgumentError(
        "Engine needs the non-expert weights (embedding, attention, router, lm_head)");
  const ModelConfig& c = weights->config();
  KvCacheOptions kv;
  kv.num_layers = c.num_hidden_layers;
  kv.row_size = c.kv_size();
  kv.block_size = options.kv_block_size;
  kv.num_blocks = options.KvBlocks(c);
  EPX_ASSIGN_OR_RETURN(KvCache cache, KvCache::Create(kv));
  auto engine = std::unique_ptr<Engine>(new Engine(weights, experts, std::move(cache)));
  if (experts == nullptr) {
    if (static_cast<int64_t>(weights->selection().experts.size()) !=
        weights->config().num_local_experts)
      return absl::InvalidArgumentError(
          "a local Engine needs every expert loaded (or pass an ExpertExecutor)");
    engine->owned_experts_ = NewLocalExpertExecutor(weights);
    engine->experts_ = engine->owned_experts_.get();
  }
  return engine;
}

absl::Status Engine::AddSequence(int64_t seq_id) { return cache_.Add(seq_id); }
absl::Status Engine::RemoveSequence(int64_t seq_id) { return cache_.Remove(seq_id); }

absl::Status Engine::Validate(absl::Span<const SequenceInput> batch) const {
  const ModelConfig& c = config();
  std::set<int64_t> seen;
  for (const SequenceInput& in : batch) {
    const int64_t length = cache_.Length(in.seq_id);
    if (length < 0)
      return absl::NotFoundError(absl::StrCat("sequence ", in.seq_id, " does not exist"));
    if (!seen.insert(in.seq_id).second)
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", in.seq_id, " appears twice in one step"));
    if (in.tokens.empty())
      return absl::InvalidArgumentError(absl::StrCat("sequence ", in.seq_id, " has no tokens"));
    for (size_t i = 0; i < in.tokens.size(); ++i) {
      if (in.tokens[i] < 0 || in.tokens[i] >= c.vocab_size)
        return absl::InvalidArgumentError(
            absl::StrCat("sequence ", in.seq_id, ": token id ", in.tokens[i], " at index ", i,
                         " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
    if (length + static_cast<int64_t>(in.tokens.size()) > c.max_position_embeddings)
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", in.seq_id, ": ", length, " + ", in.tokens.size(),
                       " tokens exceed max_position_embeddings ", c.max_position_embeddings));
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Engine::Step(absl::Span<const SequenceInput> batch) {
  EPX_RETURN_IF_ERROR(Validate(batch));
  std::vector<std::pair<int64_t, int64_t>> lengths;
  for (const SequenceInput& in : batch)
    lengths.emplace_back(in.seq_id, cache_.Length(in.seq_id) + int64_t(in.tokens.size()));
  EPX_RETURN_IF_ERROR(cache_.Reserve(lengths));
  EPX_RETURN_IF_ERROR(experts_->BeginStep());
  const ModelConfig& c = config();
  const int64_t H = c.hidden_size, Q = c.q_size(), KV = c.kv_size(), K = c.num_experts_per_tok;

  // Flatten the batch: token t belongs to input seq_of[t] at position positions[t].
  std::vector<int32_t> ids;
  std::vector<int64_t> positions;
  std::vector<size_t> seq_of;
  std::vector<int64_t> logit_rows;
  for (size_t s = 0; s < batch.size(); ++s) {
    const int64_t start = cache_.Length(batch[s].seq_id);
    for (size_t i = 0; i < batch[s].tokens.size(); ++i) {
      if (batch[s].all_logits || i + 1 == batch[s].tokens.size())
        logit_rows.push_back(static_cast<int64_t>(ids.size()));
      ids.push_back(batch[s].tokens[i]);
      positions.push_back(start + static_cast<int64_t>(i));
      seq_of.push_back(s);
    }
  }
  const int64_t T = static_cast<int64_t>(ids.size());

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
  Tensor slot_out = Tensor::Empty(DType::kF32, {T * K, H});
  Tensor rope = Tensor::Empty(DType::kF32, {T, c.head_dim});
  EPX_RETURN_IF_ERROR(cpu::Embedding(ids, weights_->embed_tokens(), x));
  EPX_RETURN_IF_ERROR(cpu::RopeTable(positions, c.head_dim, c.rope_theta, rope));

  cpu::AttentionParams ap;
  ap.num_heads = c.num_attention_heads;
  ap.num_kv_heads = c.num_key_value_heads;
  ap.head_dim = c.head_dim;
  ap.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
  ap.sliding_window = c.sliding_window.value_or(0);
  // Where each token's K/V row lives and the block table it reads: the same in every layer.
  std::vector<int64_t> rows(T);
  std::vector<cpu::AttentionKv> kv(T);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t seq_id = batch[seq_of[t]].seq_id;
    rows[t] = cache_.Row(seq_id, positions[t]);
    kv[t] = {.row_stride = KV, .position = positions[t],
             .block_table = cache_.BlockTable(seq_id), .block_size = cache_.block_size()};
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
    float* keys = cache_.keys(l);
    float* values = cache_.values(l);
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(keys + rows[t] * KV, k.data<float>() + t * KV, KV * sizeof(float));
      std::memcpy(values + rows[t] * KV, v.data<float>() + t * KV, KV * sizeof(float));
      kv[t].k = keys;
      kv[t].v = values;
    }
    EPX_RETURN_IF_ERROR(cpu::Attention(q, kv, ap, attn));
    EPX_RETURN_IF_ERROR(cpu::Linear(attn, lw.o_proj, proj));
    EPX_RETURN_IF_ERROR(cpu::Add(x, proj, x));  // x now holds h
    stats_.attention_us[l] += watch.Micros();

    watch.Restart();
    EPX_RETURN_IF_ERROR(cpu::RmsNorm(x, lw.post_attention_norm, eps, xn));
    EPX_RETURN_IF_ERROR(cpu::Linear(xn, lw.gate, router_logits));
    EPX_RETURN_IF_ERROR(cpu::RouterTopK(router_logits, topk_ids, topk_weights));
    EPX_RETURN_IF_ERROR(experts_->Run(static_cast<int>(l), xn, topk_ids, slot_out));
    EPX_RETURN_IF_ERROR(cpu::MoeCombine(x, slot_out, topk_weights, x));
    stats_.moe_us[l] += watch.Micros();
    const int32_t* routed = topk_ids.data<const int32_t>();
    for (int64_t i = 0; i < T * K; ++i) ++stats_.expert_tokens[l][routed[i]];
  }

  const int64_t R = static_cast<int64_t>(logit_rows.size());
  Tensor last = Tensor::Empty(DType::kF32, {R, H});
  for (int64_t r = 0; r < R; ++r)
    std::memcpy(last.data<float>() + r * H, x.data<float>() + logit_rows[r] * H, H * sizeof(float));
  EPX_RETURN_IF_ERROR(cpu::RmsNorm(last, weights_->final_norm(), eps, last));
  Tensor logits = Tensor::Empty(DType::kF32, {R, c.vocab_size});
  EPX_RETURN_IF_ERROR(cpu::Linear(last, weights_->lm_head(), logits));

  stats_.tokens += T;
  ++stats_.steps;
  for (const SequenceInput& in : batch)
    cache_.SetLength(in.seq_id, cache_.Length(in.seq_id) + static_cast<int64_t>(in.tokens.size()));
  return logits;
}

}  // namespace epx
