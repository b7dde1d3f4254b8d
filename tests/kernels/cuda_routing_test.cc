// The MoE routing kernels (kernels/cuda/moe_routing.cu) against the CPU oracle: router top-k,
// the expert permutation and the row gather, over the token counts the engine sees, expert
// counts from 4 to 256 and top-k from 1 to 8; and their argument checks, which the
// ...ArgumentsAreCheckedOnTheHost tests run without a device.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
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
using ::epx::testing::NewStream;
using ::epx::testing::RandomF32;
using ::epx::testing::ToBf16;
using ::epx::testing::ToVector32;
using ::epx::testing::Upload;

constexpr int64_t kTokenCounts[] = {1, 3, 7, 19, 733};
const auto kInvalid = absl::StatusCode::kInvalidArgument;

template <typename T>
std::vector<int32_t> Narrowed(const std::vector<T>& v) {
  return std::vector<int32_t>(v.begin(), v.end());
}

TensorView I32View(std::vector<int32_t>& v, Shape shape) {
  return TensorView(v.data(), DType::kI32, std::move(shape));
}

// ---- RouterTopK ----

struct RouterCase {
  int64_t num_experts, num_topk;
};
constexpr RouterCase kRouterCases[] = {{4, 1},  {4, 4},   {8, 2},   {8, 1},   {60, 4},
                                       {64, 8}, {128, 6}, {256, 8}, {256, 1}, {1, 1}};

void ExpectRouterMatchesOracle(const Tensor& logits, const std::string& what) {
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  const int64_t tokens = logits.dim(0);
  for (const RouterCase& c : kRouterCases) {
    if (c.num_experts != logits.dim(1)) continue;
    SCOPED_TRACE(
        absl::StrCat(what, " tokens=", tokens, " experts=", c.num_experts, " topk=", c.num_topk));
    Tensor want_ids = Tensor::Empty(DType::kI32, {tokens, c.num_topk});
    Tensor want_weights = Tensor::Empty(DType::kF32, {tokens, c.num_topk});
    ASSERT_TRUE(cpu::RouterTopK(logits, want_ids, want_weights).ok());
    DeviceTensor logits_dev = Upload(logits, s);
    DeviceTensor ids = DeviceEmpty(DType::kI32, {tokens, c.num_topk}, s);
    DeviceTensor weights = DeviceEmpty(DType::kF32, {tokens, c.num_topk}, s);
    const absl::Status status = RouterTopK(logits_dev, ids, weights, s);
    ASSERT_TRUE(status.ok()) << status;
    EXPECT_EQ(ToVector32(Download(ids, s)), ToVector32(want_ids));
    // Tolerance: the kernel replays the oracle's fp32 sums in the same order and rounds a
    // double exp to fp32, which is the host's expf but for its rare misrounding; 1e-6 relative
    // covers an ulp there.
    ExpectClose(Download(weights, s), want_weights, 0.f, 1e-6f, "topk_weights");
  }
}

TEST(CudaRouterTopKTest, MatchesOracle) {
  EPX_SKIP_WITHOUT_GPU();
  for (int64_t experts : {1, 4, 8, 60, 64, 128, 256}) {
    for (int64_t tokens : kTokenCounts) {
      ExpectRouterMatchesOracle(
          RandomF32({tokens, experts}, static_cast<uint32_t>(tokens * 1000 + experts), -4.f, 4.f),
          "random");
    }
  }
}

TEST(CudaRouterTopKTest, TiesGoToTheLowerExpert) {
  EPX_SKIP_WITHOUT_GPU();
  // Logits on a grid of 4 values: most tokens have equal probabilities among their top choices.
  for (int64_t experts : {4, 8, 60, 256}) {
    for (int64_t tokens : kTokenCounts) {
      Tensor logits = RandomF32({tokens, experts}, static_cast<uint32_t>(tokens + experts));
      for (int64_t i = 0; i < logits.numel(); ++i)
        logits.data<float>()[i] = std::round(logits.data<float>()[i] * 1.5f);
      ExpectRouterMatchesOracle(logits, "ties");
    }
  }
}

TEST(CudaRouterTopKTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  DeviceTensor logits = DeviceEmpty(DType::kF32, {3, 8}, s);
  DeviceTensor logits_bf16 = DeviceEmpty(DType::kBF16, {3, 8}, s);
  DeviceTensor logits_wide = DeviceEmpty(DType::kF32, {3, 257}, s);
  DeviceTensor logits_four = DeviceEmpty(DType::kF32, {3, 4}, s);
  DeviceTensor ids = DeviceEmpty(DType::kI32, {3, 2}, s);
  DeviceTensor ids_f32 = DeviceEmpty(DType::kF32, {3, 2}, s);
  DeviceTensor ids_short = DeviceEmpty(DType::kI32, {2, 2}, s);
  DeviceTensor ids9 = DeviceEmpty(DType::kI32, {3, 9}, s);
  DeviceTensor ids5 = DeviceEmpty(DType::kI32, {3, 5}, s);
  DeviceTensor weights = DeviceEmpty(DType::kF32, {3, 2}, s);
  DeviceTensor weights9 = DeviceEmpty(DType::kF32, {3, 9}, s);
  DeviceTensor weights5 = DeviceEmpty(DType::kF32, {3, 5}, s);
  DeviceTensor weights_bf16 = DeviceEmpty(DType::kBF16, {3, 2}, s);
  EXPECT_EQ(RouterTopK(logits_bf16, ids, weights, s).code(), kInvalid);
  EXPECT_EQ(RouterTopK(logits_wide, ids, weights, s).code(), kInvalid);
  EXPECT_EQ(RouterTopK(logits, ids_f32, weights, s).code(), kInvalid);
  EXPECT_EQ(RouterTopK(logits, ids_short, weights, s).code(), kInvalid);
  EXPECT_EQ(RouterTopK(logits, ids, weights_bf16, s).code(), kInvalid);
  EXPECT_EQ(RouterTopK(logits, ids9, weights9, s).code(), kInvalid);       // top-k above 8
  EXPECT_EQ(RouterTopK(logits_four, ids5, weights5, s).code(), kInvalid);  // above num_experts
  EXPECT_TRUE(
      RouterTopK(logits.view.Slice(0, 0), ids.view.Slice(0, 0), weights.view.Slice(0, 0), s).ok());
}

TEST(CudaRouterTopKTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const TensorView logits = host(DType::kF32, {3, 8});
  const TensorView ids = host(DType::kI32, {3, 2});
  const TensorView weights = host(DType::kF32, {3, 2});
  EXPECT_THAT(RouterTopK(host(DType::kBF16, {3, 8}), ids, weights, nullptr),
              IsInvalidArgument("RouterTopK: logits must be"));
  EXPECT_THAT(RouterTopK(host(DType::kF32, {24}), ids, weights, nullptr),
              IsInvalidArgument("RouterTopK: logits must be"));
  EXPECT_THAT(RouterTopK(TensorView(nullptr, DType::kF32, {3, 8}), ids, weights, nullptr),
              IsInvalidArgument("RouterTopK: logits [3, 8] has no data"));
  // One warp holds at most 256 experts.
  EXPECT_THAT(RouterTopK(host(DType::kF32, {3, 257}), ids, weights, nullptr),
              IsInvalidArgument("RouterTopK: logits [3, 257] must have 1 to 256 experts"));
  EXPECT_THAT(RouterTopK(host(DType::kF32, {3, 0}), ids, weights, nullptr),
              IsInvalidArgument("RouterTopK: logits [3, 0] must have 1 to 256 experts"));
  EXPECT_THAT(RouterTopK(logits, host(DType::kF32, {3, 2}), weights, nullptr),
              IsInvalidArgument("RouterTopK: topk_ids must be"));
  EXPECT_THAT(RouterTopK(logits, host(DType::kI32, {2, 2}), weights, nullptr),
              IsInvalidArgument("RouterTopK: topk_ids must be"));
  // num_topk is topk_ids' width: 1 to min(8, num_experts).
  EXPECT_THAT(RouterTopK(logits, host(DType::kI32, {3, 9}), host(DType::kF32, {3, 9}), nullptr),
              IsInvalidArgument("RouterTopK: topk_ids [3, 9] must choose 1 to 8 experts"));
  EXPECT_THAT(RouterTopK(host(DType::kF32, {3, 4}), host(DType::kI32, {3, 5}),
                         host(DType::kF32, {3, 5}), nullptr),
              IsInvalidArgument("RouterTopK: topk_ids [3, 5] must choose 1 to 4 experts"));
  EXPECT_THAT(RouterTopK(logits, host(DType::kI32, {3, 0}), host(DType::kF32, {3, 0}), nullptr),
              IsInvalidArgument("RouterTopK: topk_ids [3, 0] must choose 1 to 8 experts"));
  EXPECT_THAT(RouterTopK(logits, ids, host(DType::kBF16, {3, 2}), nullptr),
              IsInvalidArgument("RouterTopK: topk_weights must be"));
  EXPECT_THAT(RouterTopK(logits, ids, host(DType::kF32, {3, 3}), nullptr),
              IsInvalidArgument("RouterTopK: topk_weights must be"));
  EXPECT_THAT(RouterTopK(logits, ids, TensorView(nullptr, DType::kF32, {3, 2}), nullptr),
              IsInvalidArgument("RouterTopK: topk_weights [3, 2] has no data"));
  // Four tokens a block: 2^33 tokens need 2^31 blocks, one more than the grid holds.
  const int64_t many = int64_t{1} << 33;
  EXPECT_THAT(
      RouterTopK(host.Unbacked(DType::kF32, {many, 8}), host.Unbacked(DType::kI32, {many, 2}),
                 host.Unbacked(DType::kF32, {many, 2}), nullptr),
      IsInvalidArgument("RouterTopK: too many tokens"));
}

// ---- ExpertPermutation ----

struct DevicePermutation {
  DeviceTensor offsets, slots, row_of_slot, scratch;
};

// Runs the device permutation of `ids` ([tokens, topk] host I32).
DevicePermutation RunPermutation(std::vector<int32_t>& ids, int64_t tokens, int64_t topk,
                                 int64_t num_experts, StreamHandle s, absl::Status* status) {
  const int64_t n = tokens * topk;
  DevicePermutation p;
  p.offsets = DeviceEmpty(DType::kI32, {num_experts + 1}, s);
  p.slots = DeviceEmpty(DType::kI32, {n}, s);
  p.row_of_slot = DeviceEmpty(DType::kI32, {n}, s);
  const size_t scratch_bytes = ExpertPermutationScratchBytes(tokens, topk, num_experts);
  p.scratch = DeviceEmpty(DType::kU8, {static_cast<int64_t>(scratch_bytes)}, s);
  DeviceTensor ids_dev = Upload(I32View(ids, {tokens, topk}), s);
  *status =
      ExpertPermutation(ids_dev, num_experts, p.offsets, p.slots, p.row_of_slot, p.scratch, s);
  // ids_dev is freed on return: let the kernels finish with it.
  EXPECT_TRUE(SynchronizeStream(s).ok());
  return p;
}

std::vector<int32_t> RandomExperts(int64_t n, int64_t num_experts, uint32_t seed, bool skewed) {
  std::mt19937 rng(seed);
  const int32_t last = static_cast<int32_t>(num_experts - 1);
  std::uniform_int_distribution<int32_t> any(0, last);
  std::uniform_int_distribution<int32_t> low(0, last / 3);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) {
    // Skewed: half of the slots on the last expert, the rest on the lowest third, so that the
    // experts in between are empty.
    if (!skewed) {
      id = any(rng);
    } else {
      id = rng() % 2 == 0 ? last : low(rng);
    }
  }
  return ids;
}

TEST(CudaExpertPermutationTest, MatchesOracleExactly) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  for (int64_t num_experts : {1, 4, 8, 60, 256}) {
    for (int64_t topk : {1, 2, 4, 8}) {
      for (int64_t tokens : kTokenCounts) {
        for (bool skewed : {false, true}) {
          SCOPED_TRACE(absl::StrCat("tokens=", tokens, " topk=", topk, " experts=", num_experts,
                                    skewed ? " skewed" : ""));
          const int64_t n = tokens * topk;
          std::vector<int32_t> ids =
              RandomExperts(n, num_experts, static_cast<uint32_t>(n * 3 + num_experts), skewed);
          std::vector<int64_t> want_offsets(num_experts + 1), want_slots(n);
          ASSERT_TRUE(cpu::ExpertPermutation(I32View(ids, {tokens, topk}), num_experts,
                                             absl::MakeSpan(want_offsets),
                                             absl::MakeSpan(want_slots))
                          .ok());
          absl::Status status;
          DevicePermutation got = RunPermutation(ids, tokens, topk, num_experts, s, &status);
          ASSERT_TRUE(status.ok()) << status;
          EXPECT_EQ(ToVector32(Download(got.offsets, s)), Narrowed(want_offsets));
          const std::vector<int32_t> slots = ToVector32(Download(got.slots, s));
          EXPECT_EQ(slots, Narrowed(want_slots));
          const std::vector<int32_t> row_of_slot = ToVector32(Download(got.row_of_slot, s));
          ASSERT_EQ(row_of_slot.size(), slots.size());
          for (int64_t r = 0; r < n; ++r) {
            ASSERT_GE(slots[r], 0);
            ASSERT_LT(slots[r], n);
            ASSERT_EQ(row_of_slot[slots[r]], r) << "row_of_slot is not the inverse at row " << r;
          }
        }
      }
    }
  }
}

TEST(CudaExpertPermutationTest, NoTokensGiveEmptyExperts) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  std::vector<int32_t> ids;
  absl::Status status;
  DevicePermutation got = RunPermutation(ids, 0, 2, 8, stream.handle(), &status);
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(ToVector32(Download(got.offsets, stream.handle())), std::vector<int32_t>(9, 0));
}

TEST(CudaExpertPermutationTest, IdsOutsideTheExpertsSortLast) {
  EPX_SKIP_WITHOUT_GPU();
  // The oracle refuses these; the kernel keeps in bounds and leaves them after every expert.
  Stream stream = NewStream();
  std::vector<int32_t> ids = {2, 9, 0, -1, 1, 0};  // 3 tokens, top-2, 4 experts
  absl::Status status;
  DevicePermutation got = RunPermutation(ids, 3, 2, 4, stream.handle(), &status);
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(ToVector32(Download(got.offsets, stream.handle())),
            (std::vector<int32_t>{0, 2, 3, 4, 4}));
  EXPECT_EQ(ToVector32(Download(got.slots, stream.handle())),
            (std::vector<int32_t>{2, 5, 4, 0, 1, 3}));
}

TEST(CudaExpertPermutationTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  const int64_t tokens = 3, topk = 2, experts = 8, n = tokens * topk;
  DeviceTensor ids = DeviceEmpty(DType::kI32, {tokens, topk}, s);
  ASSERT_TRUE(MemsetAsync(ids.buffer.data(), 0, ids.view.nbytes(), s).ok());
  DeviceTensor ids_i64 = DeviceEmpty(DType::kI64, {tokens, topk}, s);
  DeviceTensor offsets = DeviceEmpty(DType::kI32, {experts + 1}, s);
  DeviceTensor offsets_short = DeviceEmpty(DType::kI32, {experts}, s);
  DeviceTensor slots = DeviceEmpty(DType::kI32, {n}, s);
  DeviceTensor slots_short = DeviceEmpty(DType::kI32, {n - 1}, s);
  DeviceTensor inverse = DeviceEmpty(DType::kI32, {n}, s);
  DeviceTensor inverse_i64 = DeviceEmpty(DType::kI64, {n}, s);
  const size_t bytes = ExpertPermutationScratchBytes(tokens, topk, experts);
  ASSERT_GT(bytes, 0u);
  DeviceTensor scratch = DeviceEmpty(DType::kU8, {static_cast<int64_t>(bytes)}, s);
  DeviceTensor scratch_small = DeviceEmpty(DType::kU8, {static_cast<int64_t>(bytes) - 1}, s);
  EXPECT_EQ(ExpertPermutation(ids_i64, experts, offsets, slots, inverse, scratch, s).code(),
            kInvalid);
  EXPECT_EQ(ExpertPermutation(ids, experts, offsets_short, slots, inverse, scratch, s).code(),
            kInvalid);
  EXPECT_EQ(ExpertPermutation(ids, experts, offsets, slots_short, inverse, scratch, s).code(),
            kInvalid);
  EXPECT_EQ(ExpertPermutation(ids, experts, offsets, slots, inverse_i64, scratch, s).code(),
            kInvalid);
  EXPECT_EQ(ExpertPermutation(ids, experts, offsets, slots, inverse, scratch_small, s).code(),
            kInvalid);
  EXPECT_EQ(ExpertPermutation(ids, 0, offsets.view.Slice(0, 1), slots, inverse, scratch, s).code(),
            kInvalid);
  EXPECT_TRUE(ExpertPermutation(ids, experts, offsets, slots, inverse, scratch, s).ok());
  EXPECT_TRUE(SynchronizeStream(s).ok());
}

TEST(CudaExpertPermutationTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const int64_t tokens = 3, topk = 2, experts = 8, n = tokens * topk;
  const TensorView ids = host(DType::kI32, {tokens, topk});
  const TensorView offsets = host(DType::kI32, {experts + 1});
  const TensorView slots = host(DType::kI32, {n});
  const TensorView inverse = host(DType::kI32, {n});
  // Whatever the device's sort needs, the scratch holds the slots' keys and ids first: one byte
  // is short on any device, and refused before CUB's size query, which needs a device.
  const TensorView scratch = host(DType::kU8, {1});
  auto permute = [&](const TensorView& ids_, int64_t experts_, const TensorView& offsets_,
                     const TensorView& slots_, const TensorView& inverse_,
                     const TensorView& scratch_) {
    return ExpertPermutation(ids_, experts_, offsets_, slots_, inverse_, scratch_, nullptr);
  };
  EXPECT_THAT(permute(host(DType::kI64, {tokens, topk}), experts, offsets, slots, inverse, scratch),
              IsInvalidArgument("ExpertPermutation: topk_ids must be"));
  EXPECT_THAT(permute(host(DType::kI32, {n}), experts, offsets, slots, inverse, scratch),
              IsInvalidArgument("ExpertPermutation: topk_ids must be"));
  EXPECT_THAT(permute(TensorView(nullptr, DType::kI32, {tokens, topk}), experts, offsets, slots,
                      inverse, scratch),
              IsInvalidArgument("ExpertPermutation: topk_ids [3, 2] has no data"));
  EXPECT_THAT(permute(ids, 0, host(DType::kI32, {1}), slots, inverse, scratch),
              IsInvalidArgument("ExpertPermutation: num_experts must be in [1, 2^31 - 1)"));
  EXPECT_THAT(permute(ids, INT32_MAX, offsets, slots, inverse, scratch),
              IsInvalidArgument("ExpertPermutation: num_experts must be in [1, 2^31 - 1)"));
  const int64_t too_many = int64_t{1} << 31;
  EXPECT_THAT(permute(host.Unbacked(DType::kI32, {too_many, 1}), experts, offsets,
                      host.Unbacked(DType::kI32, {too_many}),
                      host.Unbacked(DType::kI32, {too_many}), scratch),
              IsInvalidArgument("ExpertPermutation: topk_ids [2147483648, 1] has more than"));
  EXPECT_THAT(permute(ids, experts, host(DType::kI32, {experts}), slots, inverse, scratch),
              IsInvalidArgument("ExpertPermutation: expert_offsets must be"));
  EXPECT_THAT(permute(ids, experts, host(DType::kI64, {experts + 1}), slots, inverse, scratch),
              IsInvalidArgument("ExpertPermutation: expert_offsets must be"));
  EXPECT_THAT(permute(ids, experts, offsets, host(DType::kI32, {n - 1}), inverse, scratch),
              IsInvalidArgument("ExpertPermutation: slots must be"));
  EXPECT_THAT(permute(ids, experts, offsets, host(DType::kI64, {n}), inverse, scratch),
              IsInvalidArgument("ExpertPermutation: slots must be"));
  EXPECT_THAT(permute(ids, experts, offsets, slots, host(DType::kI64, {n}), scratch),
              IsInvalidArgument("ExpertPermutation: row_of_slot must be"));
  EXPECT_THAT(permute(ids, experts, offsets, slots, host(DType::kI32, {tokens, topk}), scratch),
              IsInvalidArgument("ExpertPermutation: row_of_slot must be"));
  EXPECT_THAT(permute(ids, experts, offsets, slots, inverse, TensorView()),
              IsInvalidArgument("ExpertPermutation: scratch F32 [] has 0 bytes"));
  EXPECT_THAT(permute(ids, experts, offsets, slots, inverse, host(DType::kU8, {0})),
              IsInvalidArgument("ExpertPermutation: scratch U8 [0] has 0 bytes"));
  EXPECT_THAT(permute(ids, experts, offsets, slots, inverse, scratch),
              IsInvalidArgument("ExpertPermutation: scratch U8 [1] has 1 bytes"));
}

// ---- PermuteRows ----

TEST(CudaPermuteRowsTest, MatchesOracleExactly) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  const int64_t num_experts = 8;
  for (int64_t hidden : {64, 4096, 100}) {
    for (int64_t topk : {1, 2, 4}) {
      for (int64_t tokens : kTokenCounts) {
        SCOPED_TRACE(absl::StrCat("tokens=", tokens, " hidden=", hidden, " topk=", topk));
        const int64_t n = tokens * topk;
        std::vector<int32_t> ids =
            RandomExperts(n, num_experts, static_cast<uint32_t>(n + hidden), false);
        std::vector<int64_t> offsets(num_experts + 1), slots(n);
        ASSERT_TRUE(cpu::ExpertPermutation(I32View(ids, {tokens, topk}), num_experts,
                                           absl::MakeSpan(offsets), absl::MakeSpan(slots))
                        .ok());
        Tensor x = ToBf16(RandomF32({tokens, hidden}, static_cast<uint32_t>(tokens * hidden)));
        Tensor want = Tensor::Empty(DType::kBF16, {n, hidden});
        ASSERT_TRUE(cpu::PermuteRows(x, slots, topk, want).ok());
        std::vector<int32_t> slots32 = Narrowed(slots);
        DeviceTensor x_dev = Upload(x, s);
        DeviceTensor slots_dev = Upload(I32View(slots32, {n}), s);
        DeviceTensor permuted = DeviceEmpty(DType::kBF16, {n, hidden}, s);
        const absl::Status status = PermuteRows(x_dev, slots_dev, topk, permuted, s);
        ASSERT_TRUE(status.ok()) << status;
        Tensor got = Download(permuted, s);
        EXPECT_EQ(std::memcmp(got.data<void>(), want.data<void>(), want.nbytes()), 0);
      }
    }
  }
}

TEST(CudaPermuteRowsTest, RejectsBadArguments) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  DeviceTensor x = DeviceEmpty(DType::kBF16, {3, 16}, s);
  DeviceTensor x_f32 = DeviceEmpty(DType::kF32, {3, 16}, s);
  DeviceTensor slots = DeviceEmpty(DType::kI32, {6}, s);
  DeviceTensor slots_2d = DeviceEmpty(DType::kI32, {3, 2}, s);
  DeviceTensor permuted = DeviceEmpty(DType::kBF16, {6, 16}, s);
  DeviceTensor permuted_short = DeviceEmpty(DType::kBF16, {5, 16}, s);
  DeviceTensor permuted_f32 = DeviceEmpty(DType::kF32, {6, 16}, s);
  EXPECT_EQ(PermuteRows(x_f32, slots, 2, permuted, s).code(), kInvalid);
  EXPECT_EQ(PermuteRows(x, slots_2d, 2, permuted, s).code(), kInvalid);
  EXPECT_EQ(PermuteRows(x, slots, 2, permuted_short, s).code(), kInvalid);
  EXPECT_EQ(PermuteRows(x, slots, 2, permuted_f32, s).code(), kInvalid);
  EXPECT_EQ(PermuteRows(x, slots, 0, permuted, s).code(), kInvalid);
  EXPECT_TRUE(PermuteRows(x, slots.view.Slice(0, 0), 2, permuted.view.Slice(0, 0), s).ok());
}

TEST(CudaPermuteRowsTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const TensorView x = host(DType::kBF16, {3, 16});
  const TensorView slots = host(DType::kI32, {6});
  const TensorView permuted = host(DType::kBF16, {6, 16});
  EXPECT_THAT(PermuteRows(host(DType::kF32, {3, 16}), slots, 2, permuted, nullptr),
              IsInvalidArgument("PermuteRows: x must be"));
  EXPECT_THAT(PermuteRows(host(DType::kBF16, {48}), slots, 2, permuted, nullptr),
              IsInvalidArgument("PermuteRows: x must be"));
  EXPECT_THAT(PermuteRows(TensorView(nullptr, DType::kBF16, {3, 16}), slots, 2, permuted, nullptr),
              IsInvalidArgument("PermuteRows: x [3, 16] has no data"));
  EXPECT_THAT(PermuteRows(x, host(DType::kI32, {3, 2}), 2, permuted, nullptr),
              IsInvalidArgument("PermuteRows: slots must be"));
  EXPECT_THAT(PermuteRows(x, host(DType::kI64, {6}), 2, permuted, nullptr),
              IsInvalidArgument("PermuteRows: slots must be"));
  EXPECT_THAT(PermuteRows(x, slots, 2, host(DType::kBF16, {5, 16}), nullptr),
              IsInvalidArgument("PermuteRows: permuted must be"));
  EXPECT_THAT(PermuteRows(x, slots, 2, host(DType::kBF16, {6, 17}), nullptr),
              IsInvalidArgument("PermuteRows: permuted must be"));
  EXPECT_THAT(PermuteRows(x, slots, 2, host(DType::kF32, {6, 16}), nullptr),
              IsInvalidArgument("PermuteRows: permuted must be"));
  EXPECT_THAT(PermuteRows(x, slots, 0, permuted, nullptr),
              IsInvalidArgument("PermuteRows: num_topk must be positive, got 0"));
  EXPECT_THAT(PermuteRows(x, slots, -2, permuted, nullptr),
              IsInvalidArgument("PermuteRows: num_topk must be positive, got -2"));
  // One block per row.
  const int64_t too_many = int64_t{1} << 31;
  EXPECT_THAT(PermuteRows(x, host.Unbacked(DType::kI32, {too_many}), 2,
                          host.Unbacked(DType::kBF16, {too_many, 16}), nullptr),
              IsInvalidArgument("PermuteRows: too many rows"));
}

// ---- AssignGroups ----

// 4 experts on 3 workers: expert 0 on workers 1 and 2, 1 on 2, 2 on 3, 3 on 1, 2 and 3. Groups
// (worker, local expert) in send order: w1 {0, 3} = 0, 1; w2 {0, 1, 3} = 2, 3, 4; w3 {2, 3} = 5, 6.
TEST(CudaAssignGroupsTest, DealsEachExpertsSlotsToItsReplicasByIndexAndRotation) {
  EPX_SKIP_WITHOUT_GPU();
  Stream stream = NewStream();
  const StreamHandle s = stream.handle();
  std::vector<int32_t> table = {0, 2, 0,  // expert 0: replicas on w1, w2 (padded)
                                3, 3, 3,  // expert 1: w2
                                5, 5, 5,  // expert 2: w3
                                1, 4, 6};  // expert 3: w1, w2, w3
  std::vector<int32_t> replicas = {2, 1, 1, 3};
  const int64_t tokens = 19, topk = 2, num_groups = 7;
  std::vector<int32_t> ids = RandomExperts(tokens * topk, 4, 11, false);
  ids[5] = 9;  // outside the experts: sorts last
  DeviceTensor ids_dev = Upload(I32View(ids, {tokens, topk}), s);
  DeviceTensor table_dev = Upload(I32View(table, {4, 3}), s);
  DeviceTensor replicas_dev = Upload(I32View(replicas, {4}), s);
  for (int64_t rotation : {0, 1, 5}) {
    SCOPED_TRACE(absl::StrCat("rotation ", rotation));
    DeviceTensor groups = DeviceEmpty(DType::kI32, {tokens, topk}, s);
    ASSERT_TRUE(
        AssignGroups(ids_dev, table_dev, replicas_dev, rotation, num_groups, groups, s).ok());
    std::vector<int32_t> want(ids.size());
    for (size_t slot = 0; slot < ids.size(); ++slot) {
      const int32_t e = ids[slot];
      want[slot] = e < 0 || e >= 4 ? num_groups
                                   : table[e * 3 + (slot + rotation) % replicas[e]];
    }
    EXPECT_EQ(ToVector32(Download(groups, s)), want);
  }
}

TEST(CudaAssignGroupsTest, ArgumentsAreCheckedOnTheHost) {
  EPX_SKIP_WITHOUT_CUDA_BUILD();
  HostViews host;
  const TensorView ids = host(DType::kI32, {3, 2});
  const TensorView table = host(DType::kI32, {4, 2});
  const TensorView replicas = host(DType::kI32, {4});
  const TensorView groups = host(DType::kI32, {3, 2});
  EXPECT_THAT(AssignGroups(host(DType::kI64, {3, 2}), table, replicas, 0, 8, groups, nullptr),
              IsInvalidArgument("AssignGroups: topk_ids must be"));
  EXPECT_THAT(AssignGroups(ids, table, host(DType::kI32, {3}), 0, 8, groups, nullptr),
              IsInvalidArgument("AssignGroups: replica_counts must be"));
  EXPECT_THAT(AssignGroups(ids, table, replicas, 0, 8, host(DType::kI32, {2, 3}), nullptr),
              IsInvalidArgument("AssignGroups: groups must be"));
  EXPECT_THAT(AssignGroups(ids, table, replicas, 0, 0, groups, nullptr),
              IsInvalidArgument("AssignGroups: 0 groups"));
  EXPECT_THAT(AssignGroups(ids, table, replicas, -1, 8, groups, nullptr),
              IsInvalidArgument("rotation -1"));
}

}  // namespace
}  // namespace epx::cuda
