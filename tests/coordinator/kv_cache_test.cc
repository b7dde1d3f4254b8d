// The paged KV cache: block accounting, all-or-nothing reservation, reuse after removal.
#include "coordinator/kv_cache.h"

#include <set>

#include "gtest/gtest.h"

namespace epx {
namespace {

KvCache MakeCache(int64_t blocks, int64_t block_size = 4) {
  absl::StatusOr<KvCache> cache = KvCache::Create(
      {.num_layers = 2, .row_size = 8, .block_size = block_size, .num_blocks = blocks});
  EXPECT_TRUE(cache.ok()) << cache.status();
  return std::move(*cache);
}

TEST(KvCacheTest, BlocksAreTakenAsSequencesGrowAndReturnedOnRemove) {
  KvCache cache = MakeCache(10);
  ASSERT_TRUE(cache.Add(1).ok());
  ASSERT_TRUE(cache.Add(2).ok());
  EXPECT_EQ(cache.Add(1).code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(cache.Reserve({{1, 5}, {2, 4}}).ok());  // 2 + 1 blocks
  EXPECT_EQ(cache.used_blocks(), 3);
  cache.SetLength(1, 5);
  ASSERT_TRUE(cache.Reserve({{1, 8}}).ok());  // still 2 blocks
  EXPECT_EQ(cache.used_blocks(), 3);
  ASSERT_TRUE(cache.Reserve({{1, 9}}).ok());
  EXPECT_EQ(cache.used_blocks(), 4);
  // Rows of different sequences never share a block.
  std::set<int64_t> blocks;
  for (int64_t p = 0; p < 9; ++p) blocks.insert(cache.Row(1, p) / 4);
  EXPECT_EQ(blocks.size(), 3u);
  for (int64_t p = 0; p < 4; ++p) EXPECT_EQ(blocks.count(cache.Row(2, p) / 4), 0u);
  ASSERT_TRUE(cache.Remove(1).ok());
  EXPECT_EQ(cache.used_blocks(), 1);
  EXPECT_EQ(cache.Length(1), -1);
  EXPECT_EQ(cache.Remove(1).code(), absl::StatusCode::kNotFound);
}

TEST(KvCacheTest, ReservationIsAllOrNothing) {
  KvCache cache = MakeCache(3);
  ASSERT_TRUE(cache.Add(1).ok());
  ASSERT_TRUE(cache.Add(2).ok());
  absl::Status s = cache.Reserve({{1, 8}, {2, 8}});  // 4 blocks of 3
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("needs 4 more blocks"), std::string::npos) << s;
  EXPECT_EQ(cache.used_blocks(), 0) << "nothing taken";
  EXPECT_TRUE(cache.Reserve({{1, 8}, {2, 4}}).ok());
  EXPECT_EQ(cache.free_blocks(), 0);
}

TEST(KvCacheTest, BadOptionsAreRefused) {
  EXPECT_EQ(KvCache::Create({.num_layers = 2, .row_size = 8, .block_size = 0, .num_blocks = 4})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvCache::Create({.num_layers = 2, .row_size = 8, .block_size = 4, .num_blocks = 0})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvCacheOptions::BlocksForBytes(2 * 2 * 4 * 8 * 4 * 10, 2, 8, 4), 10);
}

}  // namespace
}  // namespace epx
