// Paged key/value cache bookkeeping: one pool of fixed-size blocks shared by all sequences, as in
// vLLM's PagedAttention. The storage (per layer a key pool and a value pool of [num_blocks,
// block_size, row_size] rows, row_size = num_kv_heads * head_dim) belongs to the backend that
// computes attention (host fp32 or device bf16, coordinator/model_forward.h); this class decides
// where each token lives. A sequence owns a block table, and its position p lives in row
// (table[p / block_size] * block_size + p % block_size). Blocks are taken from a free list as
// sequences grow and returned when they are removed, so memory is bounded by the pool and
// admission can be decided by free blocks.
//
// Not thread-safe: the engine owns it and touches it from its step thread only.
#ifndef EPX_COORDINATOR_KV_CACHE_H_
#define EPX_COORDINATOR_KV_CACHE_H_

#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace epx {

struct KvCacheOptions {
  int64_t num_layers = 0;
  int64_t row_size = 0;     // elements per token and layer, for keys and again for values
  int64_t block_size = 16;  // tokens per block
  int64_t num_blocks = 0;   // blocks in the pool

  // The blocks that fit `bytes` of keys and values stored with `element_bytes` per element.
  static int64_t BlocksForBytes(int64_t bytes, int64_t num_layers, int64_t row_size,
                                int64_t block_size, int64_t element_bytes = 4);
};

class KvCache {
 public:
  // InvalidArgument for non-positive sizes or more blocks than block ids.
  static absl::StatusOr<KvCache> Create(const KvCacheOptions& options);

  // AlreadyExists if `seq_id` is present.
  absl::Status Add(int64_t seq_id);
  // Returns the sequence's blocks to the pool. NotFound if absent.
  absl::Status Remove(int64_t seq_id);
  bool Contains(int64_t seq_id) const { return seqs_.count(seq_id) > 0; }
  // Tokens committed so far; -1 if absent.
  int64_t Length(int64_t seq_id) const;
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }

  // Blocks a sequence of `length` tokens occupies.
  int64_t BlocksFor(int64_t length) const { return (length + block_size() - 1) / block_size(); }
  // Blocks that growing each sequence to the given length would take from the pool.
  // REQUIRES: every sequence is present.
  int64_t BlocksNeeded(absl::Span<const std::pair<int64_t, int64_t>> seq_lengths) const;
  // Makes room for positions [0, length) of every listed sequence (seq_id, length): all or
  // nothing. ResourceExhausted, changing nothing, if the free blocks do not suffice.
  // REQUIRES: every sequence is present.
  absl::Status Reserve(absl::Span<const std::pair<int64_t, int64_t>> seq_lengths);
  // Marks `length` tokens as committed. REQUIRES: room was reserved for them.
  void SetLength(int64_t seq_id, int64_t length);

  // The sequence's blocks in position order. REQUIRES: Contains(seq_id); valid until the next
  // Reserve() or Remove().
  absl::Span<const int32_t> BlockTable(int64_t seq_id) const;
  // Pool row of a position. REQUIRES: room was reserved for it.
  int64_t Row(int64_t seq_id, int64_t position) const;

  int64_t row_size() const { return options_.row_size; }
  int64_t block_size() const { return options_.block_size; }
  int64_t num_blocks() const { return options_.num_blocks; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t used_blocks() const { return num_blocks() - free_blocks(); }

 private:
  struct Sequence {
    int64_t length = 0;
    std::vector<int32_t> blocks;
  };
  explicit KvCache(const KvCacheOptions& options) : options_(options) {}
  const Sequence& Get(int64_t seq_id) const;
  Sequence& Get(int64_t seq_id);

  KvCacheOptions options_;
  std::vector<int32_t> free_;               // taken from the back, lowest block first
  std::map<int64_t, Sequence> seqs_;
};

}  // namespace epx

#endif  // EPX_COORDINATOR_KV_CACHE_H_
