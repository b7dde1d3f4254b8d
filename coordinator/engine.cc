#include "coordinator/engine.h"

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

Engine::Engine(const ModelConfig& config, std::unique_ptr<ModelForward> forward, KvCache cache)
    : config_(config), forward_(std::move(forward)), cache_(std::move(cache)) {
  stats_.attention_us.assign(config_.num_hidden_layers, 0);
  stats_.moe_us.assign(config_.num_hidden_layers, 0);
  stats_.expert_tokens.assign(config_.num_hidden_layers,
                              std::vector<int64_t>(config_.num_local_experts, 0));
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
  return std::unique_ptr<Engine>(new Engine(config, std::move(forward), std::move(cache)));
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
  for (const SequenceInput& in : batch)
    cache_.SetLength(in.seq_id, cache_.Length(in.seq_id) + static_cast<int64_t>(in.tokens.size()));
  return logits;
}

}  // namespace epx
