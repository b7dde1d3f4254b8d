#include "coordinator/engine.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace epx {

int64_t EngineOptions::KvBlocks(const ModelConfig& config, int64_t element_bytes) const {
  if (kv_blocks > 0) return kv_blocks;
  return KvCacheOptions::BlocksForBytes(kv_cache_bytes, config.num_hidden_layers,
                                        config.kv_size(), kv_block_size, element_bytes);
}

Engine::Engine(const ModelConfig& config, std::unique_ptr<ModelForward> forward, KvCache cache,
               int64_t window_steps)
    : config_(config), forward_(std::move(forward)), cache_(std::move(cache)) {
  stats_.attention_us.assign(config_.num_hidden_layers, 0);
  stats_.moe_us.assign(config_.num_hidden_layers, 0);
  stats_.expert_tokens.assign(config_.num_hidden_layers,
                              std::vector<int64_t>(config_.num_local_experts, 0));
  stats_.recent_expert_tokens = stats_.expert_tokens;
  stats_.window_steps = std::max<int64_t>(window_steps, 1);
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const ModelWeights* weights,
                                                       ExpertExecutor* experts,
                                                       const EngineOptions& options) {
  if (weights == nullptr || !weights->selection().non_expert)
    return absl::InvalidArgumentError(
        "Engine needs the non-expert weights (embedding, attention, router, lm_head)");
  std::unique_ptr<ExpertExecutor> owned;
  if (experts == nullptr) {
    if (static_cast<int64_t>(weights->selection().experts.size()) !=
        weights->config().num_local_experts)
      return absl::InvalidArgumentError(
          "a local Engine needs every expert loaded (or pass an ExpertExecutor)");
    owned = NewLocalExpertExecutor(weights);
    experts = owned.get();
  }
  EPX_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine,
                       Create(weights->config(), NewCpuForward(weights, experts), options));
  engine->owned_experts_ = std::move(owned);
  return engine;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const ModelConfig& config,
                                                       std::unique_ptr<ModelForward> forward,
                                                       const EngineOptions& options) {
  if (forward == nullptr) return absl::InvalidArgumentError("Engine needs a backend");
  KvCacheOptions kv;
  kv.num_layers = config.num_hidden_layers;
  kv.row_size = config.kv_size();
  kv.block_size = options.kv_block_size;
  kv.num_blocks = options.KvBlocks(config, forward->kv_element_bytes());
  EPX_ASSIGN_OR_RETURN(KvCache cache, KvCache::Create(kv));
  EPX_RETURN_IF_ERROR(forward->AllocateKv(kv.num_blocks, kv.block_size));
  return std::unique_ptr<Engine>(
      new Engine(config, std::move(forward), std::move(cache), options.routing_window_steps));
}

absl::Status Engine::AddSequence(int64_t seq_id) {
  EPX_RETURN_IF_ERROR(cache_.Add(seq_id));
  routing_[seq_id].assign(config_.num_hidden_layers * config_.num_local_experts, 0);
  return absl::OkStatus();
}

absl::Status Engine::RemoveSequence(int64_t seq_id) {
  EPX_RETURN_IF_ERROR(cache_.Remove(seq_id));
  routing_.erase(seq_id);
  return absl::OkStatus();
}

std::vector<std::vector<int64_t>> Engine::SequenceRouting(int64_t seq_id) const {
  const auto it = routing_.find(seq_id);
  if (it == routing_.end()) return {};
  const int64_t E = config_.num_local_experts;
  std::vector<std::vector<int64_t>> out(config_.num_hidden_layers);
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l)
    out[l].assign(it->second.begin() + l * E, it->second.begin() + (l + 1) * E);
  return out;
}

void Engine::CountRouting(absl::Span<const SequenceInput> batch, int64_t tokens) {
  const int64_t L = config_.num_hidden_layers, E = config_.num_local_experts;
  const int64_t K = config_.num_experts_per_tok;
  std::vector<int32_t> step(L * E, 0);
  int64_t first = 0;
  for (const SequenceInput& in : batch) {
    std::vector<int64_t>& counts = routing_[in.seq_id];
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    for (int64_t l = 0; l < L; ++l) {
      const int32_t* ids = routed_.data() + (l * tokens + first) * K;
      for (int64_t i = 0; i < n * K; ++i) {
        if (ids[i] < 0 || ids[i] >= E) continue;  // never from a top-k over E experts
        ++counts[l * E + ids[i]];
        ++step[l * E + ids[i]];
      }
    }
    first += n;
  }
  // Slide the window: the new step in, the oldest out once it holds window_steps.
  for (int64_t l = 0; l < L; ++l)
    for (int64_t e = 0; e < E; ++e) stats_.recent_expert_tokens[l][e] += step[l * E + e];
  window_.push_back(std::move(step));
  if (static_cast<int64_t>(window_.size()) > stats_.window_steps) {
    const std::vector<int32_t>& old = window_.front();
    for (int64_t l = 0; l < L; ++l)
      for (int64_t e = 0; e < E; ++e) stats_.recent_expert_tokens[l][e] -= old[l * E + e];
    window_.pop_front();
  }
}

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

  // Flatten the batch; each token's KV row and each sequence's block table are the same in
  // every layer, so they are looked up once per step.
  std::vector<int32_t> ids;
  std::vector<int64_t> positions, kv_rows, logit_rows;
  std::vector<ForwardBatch::Sequence> sequences;
  for (const SequenceInput& in : batch) {
    const int64_t start = cache_.Length(in.seq_id);
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    sequences.push_back({.first_token = static_cast<int64_t>(ids.size()), .num_tokens = n,
                         .first_position = start, .block_table = cache_.BlockTable(in.seq_id)});
    for (int64_t i = 0; i < n; ++i) {
      if (in.all_logits || i + 1 == n) logit_rows.push_back(static_cast<int64_t>(ids.size()));
      ids.push_back(in.tokens[i]);
      positions.push_back(start + i);
      kv_rows.push_back(cache_.Row(in.seq_id, start + i));
    }
  }
  ForwardBatch fb;
  fb.ids = ids;
  fb.positions = positions;
  fb.kv_rows = kv_rows;
  fb.sequences = sequences;
  fb.logit_rows = logit_rows;
  fb.block_size = cache_.block_size();
  const bool routing = forward_->reports_routing();
  if (routing) {
    routed_.resize(config_.num_hidden_layers * ids.size() * config_.num_experts_per_tok);
    fb.routed = absl::MakeSpan(routed_);
  }
  // A step cut short (a worker lost mid-step) commits nothing: the KV rows it wrote lie past
  // the sequences' lengths and are written again, and its counters are taken back, so that a
  // step run again after the cluster re-formed counts once.
  EngineStats before = stats_;
  absl::StatusOr<Tensor> result = forward_->Forward(fb, stats_);
  if (!result.ok()) {
    stats_ = std::move(before);
    return result.status();
  }
  Tensor logits = *std::move(result);

  stats_.tokens += static_cast<int64_t>(ids.size());
  ++stats_.steps;
  if (routing) CountRouting(batch, static_cast<int64_t>(ids.size()));
  for (const SequenceInput& in : batch)
    cache_.SetLength(in.seq_id, cache_.Length(in.seq_id) + static_cast<int64_t>(in.tokens.size()));
  return logits;
}

}  // namespace epx
