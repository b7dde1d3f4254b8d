// Per-sequence key/value cache for the CPU engine: for each sequence and layer, contiguous fp32
// rows [position, num_kv_heads * head_dim] for keys and values, grown geometrically.
// Not thread-safe: the engine owns it and touches it from its step thread only.
#ifndef EPX_COORDINATOR_KV_CACHE_H_
#define EPX_COORDINATOR_KV_CACHE_H_

#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/status.h"

namespace epx {

class KvCache {
 public:
  KvCache(int64_t num_layers, int64_t row_size) : num_layers_(num_layers), row_size_(row_size) {}

  // AlreadyExists if `seq_id` is present.
  absl::Status Add(int64_t seq_id);
  // NotFound if absent.
  absl::Status Remove(int64_t seq_id);
  bool Contains(int64_t seq_id) const { return seqs_.count(seq_id) > 0; }
  // Tokens committed so far; -1 if absent.
  int64_t Length(int64_t seq_id) const;
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }

  // Makes room for rows [0, length) in every layer. REQUIRES: Contains(seq_id).
  void Reserve(int64_t seq_id, int64_t length);
  // Row pointers of layer `layer`. REQUIRES: Contains(seq_id); valid until the next Reserve().
  float* Keys(int64_t seq_id, int64_t layer);
  float* Values(int64_t seq_id, int64_t layer);
  // Marks `length` tokens as committed. REQUIRES: Reserve(seq_id, >= length) was called.
  void SetLength(int64_t seq_id, int64_t length);
  int64_t row_size() const { return row_size_; }

 private:
  struct Sequence {
    int64_t length = 0;
    int64_t capacity = 0;
    std::vector<std::vector<float>> keys;    // [layer][capacity * row_size]
    std::vector<std::vector<float>> values;  // [layer][capacity * row_size]
  };
  Sequence& Get(int64_t seq_id);
  int64_t num_layers_;
  int64_t row_size_;
  std::map<int64_t, Sequence> seqs_;
};

}  // namespace epx

#endif  // EPX_COORDINATOR_KV_CACHE_H_
