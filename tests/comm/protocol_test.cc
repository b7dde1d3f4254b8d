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

}  // namespace
}  // namespace epx::comm
