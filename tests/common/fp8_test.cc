// FP8 e4m3 conversions and row-wise quantisation on the host: the oracle the CUDA quantisation
// kernel must match bit for bit.
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/dtype.h"
#include "common/tensor.h"
#include "gtest/gtest.h"

namespace epx {
namespace {

bool IsFp8NaN(uint8_t v) { return (v & 0x7f) == 0x7f; }

TEST(Fp8Test, KnownCodes) {
  EXPECT_EQ(Fp8E4m3ToF32(0x00), 0.f);
  EXPECT_EQ(Fp8E4m3ToF32(0x38), 1.f);     // exponent 7 = bias
  EXPECT_EQ(Fp8E4m3ToF32(0x7e), 448.f);   // largest finite
  EXPECT_EQ(Fp8E4m3ToF32(0xfe), -448.f);
  EXPECT_EQ(Fp8E4m3ToF32(0x01), std::ldexp(1.f, -9));  // smallest subnormal
  EXPECT_EQ(Fp8E4m3ToF32(0x08), std::ldexp(1.f, -6));  // smallest normal
  EXPECT_TRUE(std::isnan(Fp8E4m3ToF32(0x7f)));
  EXPECT_TRUE(std::isnan(Fp8E4m3ToF32(0xff)));
}

TEST(Fp8Test, EveryFiniteCodeRoundTrips) {
  for (int v = 0; v < 256; ++v) {
    const uint8_t code = static_cast<uint8_t>(v);
    if (IsFp8NaN(code)) continue;
    EXPECT_EQ(F32ToFp8E4m3(Fp8E4m3ToF32(code)), code) << "code " << v;
  }
}

TEST(Fp8Test, RoundsToNearestEvenAndSaturates) {
  // Between 1 (0x38) and 1.125 (0x39): below the midpoint, the midpoint (ties to even 0x38),
  // above it.
  EXPECT_EQ(F32ToFp8E4m3(1.05f), 0x38);
  EXPECT_EQ(F32ToFp8E4m3(1.0625f), 0x38);
  EXPECT_EQ(F32ToFp8E4m3(1.07f), 0x39);
  // Between 1.125 (0x39, odd) and 1.25 (0x3a): the tie goes up to the even code.
  EXPECT_EQ(F32ToFp8E4m3(1.1875f), 0x3a);
  EXPECT_EQ(F32ToFp8E4m3(1000.f), 0x7e);
  EXPECT_EQ(F32ToFp8E4m3(-1e30f), 0xfe);
  EXPECT_EQ(F32ToFp8E4m3(std::numeric_limits<float>::infinity()), 0x7e);
  EXPECT_EQ(F32ToFp8E4m3(std::numeric_limits<float>::quiet_NaN()), 0x7f);
  EXPECT_EQ(F32ToFp8E4m3(-0.f), 0x80);
  // Half the smallest subnormal ties to zero; just above it rounds up.
  EXPECT_EQ(F32ToFp8E4m3(std::ldexp(1.f, -10)), 0x00);
  EXPECT_EQ(F32ToFp8E4m3(std::ldexp(1.1f, -10)), 0x01);
}

TEST(Fp8Test, RoundingErrorIsAtMostHalfAStep) {
  for (float x = -500.f; x < 500.f; x += 0.37f) {
    const float y = Fp8E4m3ToF32(F32ToFp8E4m3(x));
    if (std::fabs(x) >= 448.f) {
      EXPECT_EQ(std::fabs(y), 448.f);
      continue;
    }
    // Relative step 2^-3 for normals, absolute 2^-9 for subnormals.
    const float step = std::max(std::ldexp(std::fabs(x), -3), std::ldexp(1.f, -9));
    EXPECT_LE(std::fabs(x - y), 0.5f * step + 1e-12f) << x;
  }
}

TEST(Fp8Test, QuantizeRowWise) {
  Tensor w = Tensor::Empty(DType::kF32, {3, 5});
  const float rows[3][5] = {{1, -2, 0.5f, 4, -8}, {0, 0, 0, 0, 0}, {1e-3f, 2e-3f, -3e-3f, 0, 0}};
  for (int r = 0; r < 3; ++r)
    for (int k = 0; k < 5; ++k) w.data<float>()[r * 5 + k] = rows[r][k];
  auto q = QuantizeFp8RowWise(w);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->q.dtype(), DType::kF8E4M3);
  EXPECT_EQ(q->scale.data<float>()[0], 8.f / 448.f);
  EXPECT_EQ(q->scale.data<float>()[1], 1.f);  // all-zero row
  EXPECT_EQ(q->scale.data<float>()[2], 3e-3f / 448.f);
  // The largest magnitude of each non-zero row maps to +-448 exactly.
  EXPECT_EQ(q->q.data<uint8_t>()[4], 0xfe);
  EXPECT_EQ(q->q.data<uint8_t>()[12], 0xfe);
  for (int k = 0; k < 5; ++k) EXPECT_EQ(q->q.data<uint8_t>()[5 + k], 0x00);
  // Dequantised values are within the fp8 step of the originals.
  for (int r = 0; r < 3; ++r)
    for (int k = 0; k < 5; ++k) {
      const float back = Fp8E4m3ToF32(q->q.data<uint8_t>()[r * 5 + k]) * q->scale.data<float>()[r];
      EXPECT_NEAR(back, rows[r][k], std::fabs(rows[r][k]) / 16 + 1e-9f) << r << "," << k;
    }
  EXPECT_FALSE(QuantizeFp8RowWise(Tensor::Empty(DType::kF32, {4})).ok());
}

}  // namespace
}  // namespace epx
