#include "coordinator/kv_cache.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace epx {

int64_t KvCacheOptions::BlocksForBytes(int64_t bytes, int64_t num_layers, int64_t row_size,
                                       int64_t block_size, int64_t element_bytes) {
  const int64_t block_bytes = 2 * num_layers * block_size * row_size * element_bytes;
  return block_bytes > 0 ? bytes / block_bytes : 0;
}

absl::StatusOr<KvCache> KvCache::Create(const KvCacheOptions& options) {
  if (options.num_layers <= 0 || options.row_size <= 0 || options.block_size <= 0 ||
      options.num_blocks <= 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache: layers, row size, block size and block count must be positive (got ",
        options.num_layers, ", ", options.row_size, ", ", options.block_size, ", ",
        options.num_blocks, ")"));
  if (options.num_blocks > INT32_MAX)
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache: ", options.num_blocks, " blocks exceed the block id range"));
  KvCache cache(options);
  cache.free_.resize(options.num_blocks);
  for (int64_t i = 0; i < options.num_blocks; ++i)
    cache.free_[i] = static_cast<int32_t>(options.num_blocks - 1 - i);
  return cache;
}

absl::Status KvCache::Add(int64_t seq_id) {
  if (Contains(seq_id))
    return absl::AlreadyExistsError(absl::StrCat("sequence ", seq_id, " already exists"));
  seqs_[seq_id];
  return absl::OkStatus();
}

absl::Status KvCache::Remove(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end())
    return absl::NotFoundError(absl::StrCat("sequence ", seq_id, " does not exist"));
  // Returned in reverse so the next sequence gets its blocks in the same order.
  for (auto b = it->second.blocks.rbegin(); b != it->second.blocks.rend(); ++b) free_.push_back(*b);
  seqs_.erase(it);
  return absl::OkStatus();
}

int64_t KvCache::Length(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  return it == seqs_.end() ? -1 : it->second.length;
}

const KvCache::Sequence& KvCache::Get(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  EPX_CHECK(it != seqs_.end());
  return it->second;
}

KvCache::Sequence& KvCache::Get(int64_t seq_id) {
  return const_cast<Sequence&>(std::as_const(*this).Get(seq_id));
}

int64_t KvCache::BlocksNeeded(absl::Span<const std::pair<int64_t, int64_t>> seq_lengths) const {
  int64_t needed = 0;
  for (const auto& [seq_id, length] : seq_lengths)
    needed += std::max<int64_t>(0, BlocksFor(length) - int64_t(Get(seq_id).blocks.size()));
  return needed;
}

absl::Status KvCache::Reserve(absl::Span<const std::pair<int64_t, int64_t>> seq_lengths) {
  const int64_t needed = BlocksNeeded(seq_lengths);
  if (needed > free_blocks())
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: the step needs ", needed, " more blocks of ", block_size(),
                     " tokens but ", free_blocks(), " of ", num_blocks(), " are free"));
  for (const auto& [seq_id, length] : seq_lengths) {
    Sequence& s = Get(seq_id);
    while (static_cast<int64_t>(s.blocks.size()) < BlocksFor(length)) {
      s.blocks.push_back(free_.back());
      free_.pop_back();
    }
  }
  return absl::OkStatus();
}

void KvCache::SetLength(int64_t seq_id, int64_t length) {
  Sequence& s = Get(seq_id);
  EPX_CHECK(BlocksFor(length) <= static_cast<int64_t>(s.blocks.size()));
  s.length = length;
}

absl::Span<const int32_t> KvCache::BlockTable(int64_t seq_id) const { return Get(seq_id).blocks; }

int64_t KvCache::Row(int64_t seq_id, int64_t position) const {
  const Sequence& s = Get(seq_id);
  return int64_t{s.blocks[position / block_size()]} * block_size() + position % block_size();
}

}  // namespace epx
