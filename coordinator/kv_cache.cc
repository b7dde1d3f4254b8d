#include "coordinator/kv_cache.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace epx {

absl::Status KvCache::Add(int64_t seq_id) {
  if (Contains(seq_id))
    return absl::AlreadyExistsError(absl::StrCat("sequence ", seq_id, " already exists"));
  Sequence& s = seqs_[seq_id];
  s.keys.resize(num_layers_);
  s.values.resize(num_layers_);
  return absl::OkStatus();
}

absl::Status KvCache::Remove(int64_t seq_id) {
  if (seqs_.erase(seq_id) == 0)
    return absl::NotFoundError(absl::StrCat("sequence ", seq_id, " does not exist"));
  return absl::OkStatus();
}

int64_t KvCache::Length(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  return it == seqs_.end() ? -1 : it->second.length;
}

KvCache::Sequence& KvCache::Get(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  EPX_CHECK(it != seqs_.end());
  return it->second;
}

void KvCache::Reserve(int64_t seq_id, int64_t length) {
  Sequence& s = Get(seq_id);
  if (length <= s.capacity) return;
  const int64_t capacity = std::max<int64_t>(length, std::max<int64_t>(16, 2 * s.capacity));
  for (int64_t l = 0; l < num_layers_; ++l) {
    s.keys[l].resize(capacity * row_size_);
    s.values[l].resize(capacity * row_size_);
  }
  s.capacity = capacity;
}

float* KvCache::Keys(int64_t seq_id, int64_t layer) { return Get(seq_id).keys[layer].data(); }
float* KvCache::Values(int64_t seq_id, int64_t layer) { return Get(seq_id).values[layer].data(); }

void KvCache::SetLength(int64_t seq_id, int64_t length) {
  Sequence& s = Get(seq_id);
  EPX_CHECK(length <= s.capacity);
  s.length = length;
}

}  // namespace epx
