// The coordinator <-> worker wire codec: the sizes both sides take from it, and the compute time
// that follows rows of 2- or 4-byte elements.
#include <vector>

#include "comm/protocol.h"
#include "gtest/gtest.h"

namespace epx::comm {
namespace {

TEST(ExpertWireTest, SizesFollowTheActivationDtype) {
  absl::StatusOr<ExpertWire> f32 = ExpertWire::Create(6, DType::kF32);
  absl::StatusOr<ExpertWire> bf16 = ExpertWire::Create(6, DType::kBF16);
  ASSERT_TRUE(f32.ok() && bf16.ok());
  EXPECT_EQ(f32->CountBytes(3), 24);
  EXPECT_EQ(f32->RowBytes(5), 5 * 6 * 4);
  EXPECT_EQ(bf16->RowBytes(5), 5 * 6 * 2);
  EXPECT_EQ(bf16->CombineBytes(5), 5 * 6 * 2 + 8);
  EXPECT_EQ(bf16->CombineBytes(0), 8);  // an idle worker still sends its time
  EXPECT_EQ(ExpertWire::Create(6, DType::kF16).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExpertWire::Create(0, DType::kF32).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ExpertWireTest, ComputeTimeRoundTripsAfterOddRowBytes) {
  // 1 row of 3 BF16 elements: the time starts at byte 6, off an 8-byte boundary.
  absl::StatusOr<ExpertWire> wire = ExpertWire::Create(3, DType::kBF16);
  ASSERT_TRUE(wire.ok());
  std::vector<uint8_t> payload(wire->CombineBytes(1), 0xAB);
  wire->SetComputeMicros(payload.data(), 1, 1234.5);
  EXPECT_EQ(wire->ComputeMicros(payload.data(), 1), 1234.5);
  EXPECT_EQ(payload[0], 0xAB);  // the rows are untouched
  const TensorView rows = wire->Rows(payload.data(), 1);
  EXPECT_EQ(rows.dtype(), DType::kBF16);
  EXPECT_EQ(rows.dim(1), 3);
}

// The count planning both data planes share: three workers holding 2, 1 and 2 (worker, local
// expert) groups; the coordinator (rank 0) has none.
TEST(DispatchPlanTest, EachWorkersRowsAreTheRunOfItsGroups) {
  const std::vector<int64_t> group_base = {0, 0, 2, 3, 5};
  const std::vector<int64_t> offsets = {0, 3, 3, 7, 7, 9};  // group 1 and group 3 are empty
  const DispatchPlan plan = PlanDispatch(group_base, offsets);
  EXPECT_EQ(plan.first, (std::vector<int64_t>{0, 0, 3, 7}));
  EXPECT_EQ(plan.rows, (std::vector<int64_t>{0, 3, 4, 2}));
}

TEST(DispatchPlanTest, AnIdleWorkerGetsNoRowsButKeepsItsPlace) {
  const std::vector<int64_t> group_base = {0, 0, 1, 2};
  const std::vector<int64_t> offsets = {0, 0, 5};
  const DispatchPlan plan = PlanDispatch(group_base, offsets);
  EXPECT_EQ(plan.rows, (std::vector<int64_t>{0, 0, 5}));
  EXPECT_EQ(plan.first, (std::vector<int64_t>{0, 0, 0}));
}

// The NCCL counts message: a worker's slice of the coordinator's group offsets.
TEST(DispatchPlanTest, LocalOffsetsStartAtZero) {
  const std::vector<int32_t> slice = {7, 7, 12, 20};
  EXPECT_EQ(LocalOffsets(slice).value_or(std::vector<int64_t>{}),
            (std::vector<int64_t>{0, 0, 5, 13}));
  const std::vector<int32_t> idle = {4, 4};
  EXPECT_EQ(LocalOffsets(idle).value_or(std::vector<int64_t>{1}), (std::vector<int64_t>{0, 0}));
}

TEST(DispatchPlanTest, LocalOffsetsRefuseWhatNoCoordinatorSends) {
  EXPECT_EQ(LocalOffsets(std::vector<int32_t>{5, 3}).status().code(),
            absl::StatusCode::kInternal);
  EXPECT_EQ(LocalOffsets(std::vector<int32_t>{-1, 3}).status().code(),
            absl::StatusCode::kInternal);
  EXPECT_EQ(LocalOffsets(std::vector<int32_t>{}).status().code(), absl::StatusCode::kInternal);
  const absl::StatusOr<ExpertWire> wire = ExpertWire::Create(16, DType::kBF16);
  ASSERT_TRUE(wire.ok());
  EXPECT_EQ(wire->OffsetsBytes(3), 16);
}

}  // namespace
}  // namespace epx::comm
