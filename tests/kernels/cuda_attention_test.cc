// cuda::Attention against cpu::Attention over a paged cache whose blocks are scattered over the
// pool in shuffled order: decode batches (the split-KV kernel, with and without splits), prefill
// of one or more sequences from position 0 or after cached keys, mixed prefill/decode batches,
// sliding windows, and the GQA head layouts the kernels are instantiated for. Cache rows that no
// sequence has written (the tails of last blocks, spare blocks) hold NaN and unused block-table
// entries hold -1, so reading anything a row may not see shows up as NaN or a fault. The argument
// checks are tested on a device and, by ArgumentsAreCheckedOnTheHost, without one.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "tests/kernels/cuda_test_util.h"

namespace epx::cuda {
namespace {

using ::epx::testing::DeviceEmpty;
using ::epx::testing::DeviceTensor;
using ::epx::testing::Download;
using ::epx::testing::ExpectClose;
using ::epx::testing::HostViews;
using ::epx::testing::IsInvalidArgument;
using ::epx::testing::RandomF32;
using ::epx::testing::RoundedToBf16;
using ::epx::testing::ToBf16;
using ::epx::testing::Upload;

// Tolerance on the BF16 output, whose values are convex combinations of V rows in [-1, 1]: the
// output's own rounding is at most 2^-9 relative, the prefill kernel's rounding of P to BF16
// before the P*V MMA adds at most 2^-9 of the output's scale, and the rest is fp32 summation
// order (~1e-6). 1e-2 absolute + 1e-2 relative leaves a margin of ~2.5x over the worst case
// while an off-by-one key in the mask, a wrong window or a mixed-up head moves outputs by
// far more in the peaked softmaxes these inputs give.
constexpr float kAtol = 1e-2f;
constexpr float kRtol = 1e-2f;

constexpr int64_t kBlockSize = 16;

struct Heads {
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
};
// GQA groups of 2 at head_dim 32 (the tiny test model), of 4 (with head_dim 64 and 128, one and
// several KV heads), and plain multi-head attention with head_dim 256. Groups of 12 and 16 reach
// the 6- and 8-head decode kernels (fewer keys in flight a thread), with two decode CTAs per KV
// head; a group of 12 also splits query rows across the prefill kernel's 16-row warps and
// 64-row CTAs.
constexpr Heads kHeadConfigs[] = {{4, 2, 32},  {4, 1, 64},  {8, 2, 128}, {32, 8, 128},
                                  {4, 4, 256}, {24, 2, 32}, {32, 2, 64}};

std::string HeadsName(const Heads& h) {
  return absl::StrCat("heads ", h.num_heads, "/", h.num_kv_heads, " d", h.head_dim);
}

// One sequence of the step: `rows` query rows at positions first_position, first_position + 1...
// Its keys 0..first_position + rows - 1 are in the cache.
struct Seq {
  int64_t rows;
  int64_t first_position;
};

struct Case {
  Heads heads;
  std::vector<Seq> seqs;
  int64_t window = 0;
  // Scores are about N(0, scale_mult^2) with q in [-3, 3] and k in [-1, 1].
  float scale_mult = 1.f;
  uint32_t seed = 1;
};

std::string SeqsName(const std::vector<Seq>& seqs) {
  std::string s;
  for (const Seq& q : seqs)
    absl::StrAppend(&s, s.empty() ? "" : " ", q.rows, "@", q.first_position);
  return s;
}

// Runs one step through both kernels and compares the outputs.
void RunAndCompare(const Case& c) {
  const std::string what = absl::StrCat(HeadsName(c.heads), " window ", c.window, " scale x",
                                        c.scale_mult, " seqs [", SeqsName(c.seqs), "]");
  SCOPED_TRACE(what);
  auto stream_or = Stream::Create();
  ASSERT_TRUE(stream_or.ok()) << stream_or.status();
  const StreamHandle stream = stream_or->handle();

  const int64_t heads = c.heads.num_heads, kv_heads = c.heads.num_kv_heads, d = c.heads.head_dim;
  const int64_t row = kv_heads * d, q_cols = heads * d;
  const int64_t num_seqs = static_cast<int64_t>(c.seqs.size());

  std::vector<int32_t> q_start(num_seqs + 1, 0), first(num_seqs);
  std::vector<int64_t> kv_len(num_seqs), blocks(num_seqs);
  int64_t max_rows = 0, max_kv_len = 0, used_blocks = 0, max_blocks = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    q_start[s + 1] = q_start[s] + static_cast<int32_t>(c.seqs[s].rows);
    first[s] = static_cast<int32_t>(c.seqs[s].first_position);
    kv_len[s] = c.seqs[s].first_position + c.seqs[s].rows;
    blocks[s] = (kv_len[s] + kBlockSize - 1) / kBlockSize;
    max_rows = std::max(max_rows, c.seqs[s].rows);
    max_kv_len = std::max(max_kv_len, kv_len[s]);
    used_blocks += blocks[s];
    max_blocks = std::max(max_blocks, blocks[s]);
  }
  const int64_t num_tokens = q_start[num_seqs];

  // Blocks handed out in shuffled order from a pool with spares; one more table column than any
  // sequence needs, left at -1.
  const int64_t pool_blocks = used_blocks + 5, pool_rows = pool_blocks * kBlockSize;
  const int64_t table_cols = max_blocks + 1;
  std::mt19937 rng(c.seed);
  std::vector<int32_t> ids(pool_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> tables(num_seqs * table_cols, -1);
  std::vector<bool> written(pool_rows, false);
  int64_t next_id = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t b = 0; b < blocks[s]; ++b) tables[s * table_cols + b] = ids[next_id++];
    for (int64_t p = 0; p < kv_len[s]; ++p)
      written[tables[s * table_cols + p / kBlockSize] * kBlockSize + p % kBlockSize] = true;
  }

  Tensor k_pool = RandomF32({pool_rows, row}, c.seed * 7 + 1);
  Tensor v_pool = RandomF32({pool_rows, row}, c.seed * 7 + 2);
  for (int64_t r = 0; r < pool_rows; ++r) {
    if (written[r]) continue;
    std::fill_n(k_pool.data<float>() + r * row, row, NAN);
    std::fill_n(v_pool.data<float>() + r * row, row, NAN);
  }
  Tensor q = RandomF32({num_tokens, q_cols}, c.seed * 7 + 3, -3.f, 3.f);
  const Tensor k_ref = RoundedToBf16(k_pool), v_ref = RoundedToBf16(v_pool);
  const Tensor q_ref = RoundedToBf16(q);

  cpu::AttentionParams params{heads, kv_heads, d, c.scale_mult / std::sqrt(static_cast<float>(d)),
                              c.window};
  std::vector<cpu::AttentionKv> kv(num_tokens);
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t i = 0; i < c.seqs[s].rows; ++i) {
      kv[q_start[s] + i] = {.k = k_ref.data<float>(),
                            .v = v_ref.data<float>(),
                            .row_stride = row,
                            .position = first[s] + i,
                            .block_table = absl::MakeConstSpan(&tables[s * table_cols], blocks[s]),
                            .block_size = kBlockSize};
    }
  }
  Tensor want = Tensor::Empty(DType::kF32, {num_tokens, q_cols});
  ASSERT_TRUE(cpu::Attention(q_ref, kv, params, want).ok());

  const DeviceTensor d_q = Upload(ToBf16(q), stream);
  const DeviceTensor d_k = Upload(ToBf16(k_pool), stream);
  const DeviceTensor d_v = Upload(ToBf16(v_pool), stream);
  const DeviceTensor d_tables =
      Upload(TensorView(tables.data(), DType::kI32, {num_seqs, table_cols}), stream);
  const DeviceTensor d_q_start =
      Upload(TensorView(q_start.data(), DType::kI32, {num_seqs + 1}), stream);
  const DeviceTensor d_first = Upload(TensorView(first.data(), DType::kI32, {num_seqs}), stream);
  const PagedKv paged{
      .k_cache = d_k, .v_cache = d_v, .block_tables = d_tables, .block_size = kBlockSize};
  const AttentionBatch batch{.q_start = d_q_start,
                             .first_position = d_first,
                             .num_seqs = num_seqs,
                             .max_queries = max_rows,
                             .max_kv_len = max_kv_len};
  const int64_t scratch_bytes = static_cast<int64_t>(AttentionScratchBytes(batch, params));
  const DeviceTensor scratch = DeviceEmpty(DType::kU8, {scratch_bytes}, stream);
  const DeviceTensor out = DeviceEmpty(DType::kBF16, {num_tokens, q_cols}, stream);

  const absl::Status status = Attention(d_q, paged, batch, params, scratch, out, stream);
  ASSERT_TRUE(status.ok()) << status;
  const Tensor got = Download(out, stream);
  ExpectClose(got, want, kAtol, kRtol, what);
}

// One row per sequence, from a single key to more than 2000; the long ones with few sequences
// take several splits and the combine kernel.
TEST(CudaAttentionTest, DecodeBatchesOfVaryingLengths) {
  EPX_SKIP_WITHOUT_GPU();
  const std::vector<std::vector<int64_t>> batches = {
      {1},
      {1037},
      {1, 1037, 17},
      {64, 1, 65, 300, 1200, 2, 129},
      {1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 500, 1001, 2049, 7}};
  uint32_t seed = 100;
  for (const Heads& h : kHeadConfigs) {
    for (const std::vector<int64_t>& lengths : batches) {
      std::vector<Seq> seqs;
      for (int64_t len : lengths) seqs.push_back({1, len - 1});
      RunAndCompare({.heads = h, .seqs = seqs, .seed = ++seed});
    }
  }
}

TEST(CudaAttentionTest, PrefillOfOneSequenceFromTheStart) {
  EPX_SKIP_WITHOUT_GPU();
  uint32_t seed = 200;
  for (const Heads& h : kHeadConfigs) {
    for (int64_t rows : {1, 3, 7, 19, 733})
      RunAndCompare({.heads = h, .seqs = {{rows, 0}}, .seed = ++seed});
  }
}

// Chunked prefill: the chunk's rows see the keys cached by earlier steps as well as their own.
TEST(CudaAttentionTest, PrefillChunksAfterCachedKeys) {
  EPX_SKIP_WITHOUT_GPU();
  const std::vector<std::vector<Seq>> steps = {
      {{5, 100}}, {{64, 64}}, {{19, 1000}}, {{200, 517}}, {{33, 7}, {70, 130}, {2, 1}}};
  uint32_t seed = 300;
  for (const Heads& h : kHeadConfigs) {
    for (const std::vector<Seq>& seqs : steps)
      RunAndCompare({.heads = h, .seqs = seqs, .seed = ++seed});
  }
}

// Decode rows riding along with prefill chunks go through the prefill kernel.
TEST(CudaAttentionTest, MixedPrefillAndDecode) {
  EPX_SKIP_WITHOUT_GPU();
  const std::vector<Seq> seqs = {{1, 500}, {45, 0}, {1, 0}, {130, 70}, {1, 1100}, {17, 3}, {1, 63}};
  uint32_t seed = 400;
  for (const Heads& h : kHeadConfigs) RunAndCompare({.heads = h, .seqs = seqs, .seed = ++seed});
}

// Windows smaller than the sequences, on tile boundaries (64) and off them (37, 100), in decode,
// prefill from the start, a chunk after cached keys, and a mixed batch.
TEST(CudaAttentionTest, SlidingWindowShorterThanTheSequence) {
  EPX_SKIP_WITHOUT_GPU();
  const std::vector<std::vector<Seq>> steps = {{{1, 1036}, {1, 20}, {1, 500}},
                                               {{733, 0}},
                                               {{100, 300}},
                                               {{1, 900}, {90, 40}, {1, 36}, {3, 200}}};
  uint32_t seed = 500;
  for (const Heads& h : kHeadConfigs) {
    for (int64_t window : {37, 64, 100}) {
      for (const std::vector<Seq>& seqs : steps)
        RunAndCompare({.heads = h, .seqs = seqs, .window = window, .seed = ++seed});
    }
  }
}

// Scores of tens of units: the running max must be subtracted before the exponentials, and the
// rescaling of earlier tiles (and splits) must follow the max as it grows.
TEST(CudaAttentionTest, LargeScoresKeepTheSoftmaxFinite) {
  EPX_SKIP_WITHOUT_GPU();
  uint32_t seed = 600;
  for (const Heads& h : kHeadConfigs) {
    RunAndCompare({.heads = h, .seqs = {{300, 0}}, .scale_mult = 12.f, .seed = ++seed});
    RunAndCompare({.heads = h, .seqs = {{1, 1500}, {1, 40}}, .scale_mult = 12.f, .seed = ++seed});
  }
}

TEST(CudaAttentionTest, NoTokensIsANoOp) {
  EPX_SKIP_WITHOUT_GPU();
  auto stream = Stream::Create();
  ASSERT_TRUE(stream.ok()) << stream.status();
  const cpu::AttentionParams params{8, 2, 128, 0.1f, 0};
  const TensorView q(nullptr, DType::kBF16, {0, 8 * 128});
  const absl::Status status =
      Attention(q, PagedKv{}, AttentionBatch{}, params, TensorView(), q, stream->handle());
  EXPECT_TRUE(status.ok()) << status;
}

TEST(CudaAttentionTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  auto stream_or = Stream::Create();
  ASSERT_TRUE(stream_or.ok()) << stream_or.status();
  const StreamHandle stream = stream_or->handle();
  // One decode row at position 999 over 63 blocks of 16: long enough to need splits on any GPU
  // with more than a few SMs.
  const int64_t heads = 8, kv_heads = 2, d = 128, blocks = 63;
  const cpu::AttentionParams params{heads, kv_heads, d, 0.1f, 0};
  std::vector<int32_t> table(blocks), q_start = {0, 1}, first = {999};
  std::iota(table.begin(), table.end(), 0);
  const DeviceTensor q = Upload(ToBf16(RandomF32({1, heads * d}, 1)), stream);
  const DeviceTensor k = Upload(ToBf16(RandomF32({blocks * kBlockSize, kv_heads * d}, 2)), stream);
  const DeviceTensor v = Upload(ToBf16(RandomF32({blocks * kBlockSize, kv_heads * d}, 3)), stream);
  const DeviceTensor d_table = Upload(TensorView(table.data(), DType::kI32, {1, blocks}), stream);
  const DeviceTensor d_q_start = Upload(TensorView(q_start.data(), DType::kI32, {2}), stream);
  const DeviceTensor d_first = Upload(TensorView(first.data(), DType::kI32, {1}), stream);
  const DeviceTensor out = DeviceEmpty(DType::kBF16, {1, heads * d}, stream);
  const PagedKv paged{
      .k_cache = k, .v_cache = v, .block_tables = d_table, .block_size = kBlockSize};
  const AttentionBatch batch{.q_start = d_q_start,
                             .first_position = d_first,
                             .num_seqs = 1,
                             .max_queries = 1,
                             .max_kv_len = 1000};
  const int64_t scratch_bytes = static_cast<int64_t>(AttentionScratchBytes(batch, params));
  ASSERT_GT(scratch_bytes, 0);
  const DeviceTensor scratch = DeviceEmpty(DType::kU8, {scratch_bytes}, stream);

  // The valid call first, so that each failure below is down to its one change.
  const absl::Status ok = Attention(q, paged, batch, params, scratch, out, stream);
  ASSERT_TRUE(ok.ok()) << ok;
  ASSERT_TRUE(SynchronizeStream(stream).ok());

  auto expect_invalid = [&](const std::string& what, const TensorView& q2, const PagedKv& kv2,
                            const AttentionBatch& batch2, const cpu::AttentionParams& params2,
                            const TensorView& scratch2, const TensorView& out2) {
    const absl::Status status = Attention(q2, kv2, batch2, params2, scratch2, out2, stream);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << what << ": " << status;
  };
  const TensorView qv = q, outv = out, sv = scratch;

  expect_invalid("q F32", TensorView(qv.raw(), DType::kF32, {1, heads * d / 2}), paged, batch,
                 params, sv, outv);
  expect_invalid("q width", qv.Reshape({2, heads * d / 2}), paged, batch, params, sv, outv);
  expect_invalid("out shape", qv, paged, batch, params, sv, outv.Reshape({2, heads * d / 2}));
  expect_invalid("out F32", qv, paged, batch, params, sv,
                 TensorView(outv.raw(), DType::kF32, {1, heads * d}));
  {
    cpu::AttentionParams p = params;
    p.num_kv_heads = 3;
    expect_invalid("heads not a multiple of kv heads", qv, paged, batch, p, sv, outv);
    p = params;
    p.num_heads = 16;
    p.head_dim = 64;  // q's width 16 x 64 still matches; the caches' 2 x 128 does not
    expect_invalid("cache width for head_dim 64", qv, paged, batch, p, sv, outv);
    p = params;
    p.head_dim = 96;  // not instantiated, whatever the shapes
    expect_invalid("head_dim 96", qv, paged, batch, p, sv, outv);
    p = params;
    p.sliding_window = -1;
    expect_invalid("negative window", qv, paged, batch, p, sv, outv);
  }
  {
    PagedKv kv = paged;
    kv.k_cache =
        TensorView(paged.k_cache.raw(), DType::kF32, {blocks * kBlockSize / 2, kv_heads * d});
    expect_invalid("k_cache F32", qv, kv, batch, params, sv, outv);
    kv = paged;
    kv.v_cache = paged.v_cache.Reshape({blocks * kBlockSize * 2, kv_heads * d / 2});
    expect_invalid("v_cache width", qv, kv, batch, params, sv, outv);
    kv = paged;
    kv.block_tables = TensorView(paged.block_tables.raw(), DType::kF32, {1, blocks});
    expect_invalid("block_tables F32", qv, kv, batch, params, sv, outv);
    kv = paged;
    kv.block_size = 0;
    expect_invalid("block_size 0", qv, kv, batch, params, sv, outv);
    kv = paged;
    kv.block_size = 8;  // 63 blocks of 8 hold fewer than max_kv_len 1000 positions
    expect_invalid("table too short", qv, kv, batch, params, sv, outv);
  }
  {
    AttentionBatch b = batch;
    b.q_start = batch.q_start.Slice(0, 1);
    expect_invalid("q_start length", qv, paged, b, params, sv, outv);
    b = batch;
    b.first_position = TensorView(batch.first_position.raw(), DType::kF32, {1});
    expect_invalid("first_position F32", qv, paged, b, params, sv, outv);
    b = batch;
    b.num_seqs = 2;
    expect_invalid("num_seqs against the arrays", qv, paged, b, params, sv, outv);
    b = batch;
    b.max_queries = 0;
    expect_invalid("max_queries 0", qv, paged, b, params, sv, outv);
    b = batch;
    b.max_kv_len = 0;
    expect_invalid("max_kv_len 0", qv, paged, b, params, sv, outv);
  }
  expect_invalid("no scratch", qv, paged, batch, params, TensorView(), outv);
  expect_invalid("short scratch", qv, paged, batch, params, sv.Slice(0, scratch_bytes - 4), outv);
}

TEST(CudaAttentionTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  // RejectsBadArguments' call over host memory (that test shows it valid on a device): one decode
  // row at position 999 over 63 blocks of 16. Each case below changes one thing.
  const int64_t heads = 8, kv_heads = 2, d = 128, blocks = 63, cache_rows = blocks * kBlockSize;
  const cpu::AttentionParams params{heads, kv_heads, d, 0.1f, 0};
  const TensorView q = host(DType::kBF16, {1, heads * d});
  const TensorView out = host(DType::kBF16, {1, heads * d});
  const PagedKv paged{.k_cache = host(DType::kBF16, {cache_rows, kv_heads * d}),
                      .v_cache = host(DType::kBF16, {cache_rows, kv_heads * d}),
                      .block_tables = host(DType::kI32, {1, blocks}),
                      .block_size = kBlockSize};
  const AttentionBatch batch{.q_start = host(DType::kI32, {2}),
                             .first_position = host(DType::kI32, {1}),
                             .num_seqs = 1,
                             .max_queries = 1,
                             .max_kv_len = 1000};
  // Without a device the split count assumes a fallback SM count (132), which splits this batch
  // too; with one, RejectsBadArguments asserts the same.
  const int64_t scratch_bytes = static_cast<int64_t>(AttentionScratchBytes(batch, params));
  ASSERT_GT(scratch_bytes, 0);
  const TensorView scratch = host(DType::kU8, {scratch_bytes});
  auto attention = [](const TensorView& q_, const PagedKv& kv_, const AttentionBatch& batch_,
                      const cpu::AttentionParams& params_, const TensorView& scratch_,
                      const TensorView& out_) {
    return Attention(q_, kv_, batch_, params_, scratch_, out_, nullptr);
  };

  {  // Head layouts the kernels are not instantiated for.
    cpu::AttentionParams p = params;
    p.num_kv_heads = 3;
    EXPECT_THAT(attention(q, paged, batch, p, scratch, out),
                IsInvalidArgument("Attention: num_heads 8 and num_kv_heads 3 must be"));
    p = params;
    p.num_kv_heads = 0;
    EXPECT_THAT(attention(q, paged, batch, p, scratch, out),
                IsInvalidArgument("Attention: num_heads 8 and num_kv_heads 0 must be"));
    p = params;
    p.num_heads = 0;
    EXPECT_THAT(attention(q, paged, batch, p, scratch, out),
                IsInvalidArgument("Attention: num_heads 0 and"));
    p = params;
    p.head_dim = 96;
    EXPECT_THAT(attention(q, paged, batch, p, scratch, out), IsInvalidArgument("head_dim (96)"));
    p = params;
    p.num_heads = 16;
    p.head_dim = 64;  // q's width 16 x 64 still matches; the caches' 2 x 128 does not
    EXPECT_THAT(attention(q, paged, batch, p, scratch, out),
                IsInvalidArgument("Attention: k_cache must be BF16"));
    p = params;
    p.sliding_window = -1;
    EXPECT_THAT(attention(q, paged, batch, p, scratch, out),
                IsInvalidArgument("Attention: sliding_window -1"));
  }
  {  // q and out.
    EXPECT_THAT(attention(host(DType::kF32, {1, heads * d}), paged, batch, params, scratch, out),
                IsInvalidArgument("Attention: q must be"));
    EXPECT_THAT(
        attention(host(DType::kBF16, {2, heads * d / 2}), paged, batch, params, scratch, out),
        IsInvalidArgument("Attention: q must be"));
    EXPECT_THAT(attention(host(DType::kBF16, {heads * d}), paged, batch, params, scratch, out),
                IsInvalidArgument("Attention: q must be"));
    EXPECT_THAT(attention(q, paged, batch, params, scratch, host(DType::kBF16, {2, heads * d})),
                IsInvalidArgument("Attention: out must be"));
    EXPECT_THAT(attention(q, paged, batch, params, scratch, host(DType::kF32, {1, heads * d})),
                IsInvalidArgument("Attention: out must be"));
    EXPECT_THAT(attention(TensorView(nullptr, DType::kBF16, {1, heads * d}), paged, batch, params,
                          scratch, out),
                IsInvalidArgument("Attention: q and out must be non-null and 16-byte aligned"));
    EXPECT_THAT(
        attention(host.Offset(DType::kBF16, {1, heads * d}, 2), paged, batch, params, scratch, out),
        IsInvalidArgument("Attention: q and out must be non-null and 16-byte aligned"));
    EXPECT_THAT(
        attention(q, paged, batch, params, scratch, host.Offset(DType::kBF16, {1, heads * d}, 8)),
        IsInvalidArgument("Attention: q and out must be non-null and 16-byte aligned"));
    const int64_t too_many = int64_t{1} << 31;
    EXPECT_THAT(attention(host.Unbacked(DType::kBF16, {too_many, heads * d}), paged, batch, params,
                          scratch, host.Unbacked(DType::kBF16, {too_many, heads * d})),
                IsInvalidArgument("Attention: more than 2^31 - 1 query rows"));
  }
  {  // The paged cache.
    PagedKv kv = paged;
    kv.k_cache = host(DType::kF32, {cache_rows, kv_heads * d});
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: k_cache must be BF16"));
    kv = paged;
    kv.k_cache = TensorView(nullptr, DType::kBF16, {cache_rows, kv_heads * d});
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: k_cache must be BF16"));
    kv = paged;
    kv.k_cache = host.Offset(DType::kBF16, {cache_rows, kv_heads * d}, 8);
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: k_cache is not 16-byte aligned"));
    kv = paged;
    kv.v_cache = host(DType::kBF16, {cache_rows * 2, kv_heads * d / 2});
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: v_cache must be BF16"));
    kv = paged;
    kv.v_cache = host.Offset(DType::kBF16, {cache_rows, kv_heads * d}, 2);
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: v_cache is not 16-byte aligned"));
    kv = paged;
    kv.v_cache = host(DType::kBF16, {cache_rows - 1, kv_heads * d});
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("and v_cache BF16 [1007, 256] differ"));
    kv = paged;
    kv.block_tables = host(DType::kF32, {1, blocks});
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: block_tables must be"));
    kv = paged;
    kv.block_tables = host(DType::kI32, {2, blocks});
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: block_tables must be"));
    kv = paged;
    kv.block_tables = host(DType::kI32, {1, 0});
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: block_tables must be"));
    kv = paged;
    kv.block_tables = TensorView(nullptr, DType::kI32, {1, blocks});
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: block_tables must be"));
    kv = paged;
    kv.block_size = 0;
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: block_size 0"));
    kv = paged;
    kv.block_size = (1 << 24) + 1;
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: block_size 16777217"));
    kv = paged;
    kv.block_size = 8;  // 63 blocks of 8 hold fewer than max_kv_len 1000 positions
    EXPECT_THAT(attention(q, kv, batch, params, scratch, out),
                IsInvalidArgument("Attention: block_tables hold 504 positions"));
  }
  {  // The batch description.
    AttentionBatch b = batch;
    b.num_seqs = 0;
    EXPECT_THAT(attention(q, paged, b, params, scratch, out),
                IsInvalidArgument("Attention: num_seqs 0 is not in"));
    b = batch;
    b.num_seqs = 65536;  // a grid dimension
    EXPECT_THAT(attention(q, paged, b, params, scratch, out),
                IsInvalidArgument("Attention: num_seqs 65536 is not in"));
    b = batch;
    b.max_queries = 0;
    EXPECT_THAT(attention(q, paged, b, params, scratch, out),
                IsInvalidArgument("Attention: max_queries 0"));
    b = batch;
    b.max_queries = 2;  // more than q's one row
    EXPECT_THAT(attention(q, paged, b, params, scratch, out),
                IsInvalidArgument("Attention: max_queries 2"));
    b = batch;
    b.max_kv_len = 0;
    EXPECT_THAT(attention(q, paged, b, params, scratch, out),
                IsInvalidArgument("Attention: max_kv_len 0"));
    b = batch;
    b.max_kv_len = int64_t{1} << 31;
    EXPECT_THAT(attention(q, paged, b, params, scratch, out),
                IsInvalidArgument("Attention: max_kv_len 2147483648"));
    b = batch;
    b.q_start = host(DType::kI32, {1});
    EXPECT_THAT(attention(q, paged, b, params, scratch, out),
                IsInvalidArgument("Attention: q_start must be"));
    b = batch;
    b.q_start = host(DType::kI64, {2});
    EXPECT_THAT(attention(q, paged, b, params, scratch, out),
                IsInvalidArgument("Attention: q_start must be"));
    b = batch;
    b.q_start = TensorView(nullptr, DType::kI32, {2});
    EXPECT_THAT(attention(q, paged, b, params, scratch, out),
                IsInvalidArgument("Attention: q_start must be"));
    b = batch;
    b.first_position = host(DType::kF32, {1});
    EXPECT_THAT(attention(q, paged, b, params, scratch, out),
                IsInvalidArgument("Attention: first_position must be"));
    b = batch;
    b.first_position = host(DType::kI32, {2});
    EXPECT_THAT(attention(q, paged, b, params, scratch, out),
                IsInvalidArgument("Attention: first_position must be"));
  }
  {  // The decode kernel's split scratch.
    EXPECT_THAT(attention(q, paged, batch, params, TensorView(), out),
                IsInvalidArgument("Attention: scratch holds 0 bytes"));
    EXPECT_THAT(attention(q, paged, batch, params, scratch.Slice(0, scratch_bytes - 4), out),
                IsInvalidArgument(absl::StrCat("Attention: scratch holds ", scratch_bytes - 4)));
    EXPECT_THAT(
        attention(q, paged, batch, params, host.Offset(DType::kU8, {scratch_bytes}, 2), out),
        IsInvalidArgument("Attention: scratch is not 4-byte aligned"));
  }
}

}  // namespace
}  // namespace epx::cuda
