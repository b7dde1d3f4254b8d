#include "common/dtype.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace epx {
namespace {

float FromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

bool IsBf16NaN(uint16_t v) { return (v & 0x7f80u) == 0x7f80u && (v & 0x007fu) != 0; }
bool IsF16NaN(uint16_t v) { return (v & 0x7c00u) == 0x7c00u && (v & 0x03ffu) != 0; }

// --- bf16 ---

TEST(DTypeTest, Bf16RoundTripsEveryNonNaNPattern) {
  int checked = 0;
  for (uint32_t v = 0; v <= 0xffff; ++v) {
    const uint16_t x = static_cast<uint16_t>(v);
    if (IsBf16NaN(x)) continue;
    ASSERT_EQ(F32ToBf16(Bf16ToF32(x)), x) << std::hex << v;
    ++checked;
  }
  EXPECT_EQ(checked, 65536 - 2 * 127);  // 127 NaN mantissas per sign
}

TEST(DTypeTest, Bf16KnownValues) {
  EXPECT_EQ(Bf16ToF32(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToF32(0xc000), -2.0f);
  EXPECT_EQ(Bf16ToF32(0x0000), 0.0f);
  EXPECT_TRUE(std::signbit(Bf16ToF32(0x8000)));
  EXPECT_EQ(Bf16ToF32(0x7f80), std::numeric_limits<float>::infinity());
  EXPECT_EQ(Bf16ToF32(0xff80), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(Bf16ToF32(0x0001), std::ldexp(1.0f, -133));  // smallest subnormal
  EXPECT_EQ(Bf16ToF32(0x0080), std::ldexp(1.0f, -126));  // smallest normal
  EXPECT_EQ(F32ToBf16(1.0f), 0x3f80);
  EXPECT_EQ(F32ToBf16(-0.0f), 0x8000);
  EXPECT_EQ(F32ToBf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(F32ToBf16(-std::numeric_limits<float>::infinity()), 0xff80);
}

// Every midpoint between two neighbouring non-negative bf16 values goes to the even one; one
// float ulp either side goes to the nearer. Covers subnormals, the subnormal/normal boundary and
// the largest finite value (whose upper neighbour is inf).
TEST(DTypeTest, Bf16RoundsToNearestEvenAtEveryTie) {
  for (uint32_t lo = 0; lo < 0x7f80; ++lo) {
    const uint32_t mid = (lo << 16) | 0x8000u;  // exact in fp32
    const uint16_t even = static_cast<uint16_t>((lo & 1u) ? lo + 1 : lo);
    ASSERT_EQ(F32ToBf16(FromBits(mid)), even) << std::hex << lo;
    ASSERT_EQ(F32ToBf16(FromBits(mid - 1)), lo) << std::hex << lo;
    ASSERT_EQ(F32ToBf16(FromBits(mid + 1)), lo + 1) << std::hex << lo;
    // Negative values mirror.
    ASSERT_EQ(F32ToBf16(FromBits(mid | 0x80000000u)), even | 0x8000u) << std::hex << lo;
  }
  // Chosen ties, spelled out: 1 + 2^-8 sits between 0x3f80 and 0x3f81.
  EXPECT_EQ(F32ToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(F32ToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
}

TEST(DTypeTest, Bf16OverflowAndSubnormals) {
  EXPECT_EQ(F32ToBf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to inf
  EXPECT_EQ(F32ToBf16(FromBits(0x7f7f7fffu)), 0x7f7f);              // largest finite stays
  EXPECT_EQ(F32ToBf16(FromBits(0x00010000u)), 0x0001);
  EXPECT_EQ(F32ToBf16(FromBits(0x00008000u)), 0x0000);  // tie to even
  EXPECT_EQ(F32ToBf16(FromBits(0x00008001u)), 0x0001);
  EXPECT_EQ(F32ToBf16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(F32ToBf16(FromBits(0x007fffffu)), 0x0080);  // largest float subnormal -> min normal
}

TEST(DTypeTest, Bf16NaNStaysNaN) {
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(std::numeric_limits<float>::quiet_NaN()))));
  // NaNs whose payload lives only in the low 16 bits must not truncate to inf.
  for (uint32_t bits : {0x7f800001u, 0x7fc00000u, 0x7f80ffffu, 0xff800001u, 0x7fffffffu}) {
    const uint16_t h = F32ToBf16(FromBits(bits));
    EXPECT_TRUE(IsBf16NaN(h)) << std::hex << bits << " -> " << h;
    EXPECT_EQ(h & 0x8000u, (bits >> 16) & 0x8000u) << "sign of " << std::hex << bits;
  }
  for (uint32_t v = 0; v <= 0xffff; ++v) {
    if (IsBf16NaN(static_cast<uint16_t>(v))) {
      ASSERT_TRUE(std::isnan(Bf16ToF32(static_cast<uint16_t>(v)))) << std::hex << v;
      ASSERT_TRUE(IsBf16NaN(F32ToBf16(Bf16ToF32(static_cast<uint16_t>(v))))) << std::hex << v;
    }
  }
}

// --- fp16 ---

TEST(DTypeTest, F16RoundTripsEveryNonNaNPattern) {
  int checked = 0;
  for (uint32_t v = 0; v <= 0xffff; ++v) {
    const uint16_t x = static_cast<uint16_t>(v);
    if (IsF16NaN(x)) continue;
    ASSERT_EQ(F32ToF16(F16ToF32(x)), x) << std::hex << v;
    ++checked;
  }
  EXPECT_EQ(checked, 65536 - 2 * 1023);
}

TEST(DTypeTest, F16KnownValues) {
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0xc000), -2.0f);
  EXPECT_EQ(F16ToF32(0x3555), 0.333251953125f);
  EXPECT_EQ(F16ToF32(0x7bff), 65504.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));         // smallest subnormal
  EXPECT_EQ(F16ToF32(0x03ff), 1023 * std::ldexp(1.0f, -24));  // largest subnormal
  EXPECT_EQ(F16ToF32(0x0400), std::ldexp(1.0f, -14));         // smallest normal
  EXPECT_EQ(F16ToF32(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToF32(0x0000), 0.0f);
  EXPECT_TRUE(std::signbit(F16ToF32(0x8000)));
  EXPECT_EQ(F16ToF32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(F16ToF32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(F32ToF16(1.0f), 0x3c00);
  EXPECT_EQ(F32ToF16(-0.0f), 0x8000);
  EXPECT_EQ(F32ToF16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(F32ToF16(-std::numeric_limits<float>::infinity()), 0xfc00);
}

TEST(DTypeTest, F16RoundsToNearestEvenAtEveryTie) {
  for (uint32_t lo = 0; lo < 0x7c00; ++lo) {
    const double a = F16ToF32(static_cast<uint16_t>(lo));
    const double b = lo == 0x7bff ? 65536.0 : F16ToF32(static_cast<uint16_t>(lo + 1));
    const float mid = static_cast<float>((a + b) / 2);  // exact: fp16 has 11 significant bits
    ASSERT_EQ(static_cast<double>(mid), (a + b) / 2);
    const uint16_t even = static_cast<uint16_t>((lo & 1u) ? lo + 1 : lo);
    ASSERT_EQ(F32ToF16(mid), even) << std::hex << lo;
    ASSERT_EQ(F32ToF16(std::nextafter(mid, 0.0f)), lo) << std::hex << lo;
    ASSERT_EQ(F32ToF16(std::nextafter(mid, 1e30f)), lo + 1) << std::hex << lo;
    ASSERT_EQ(F32ToF16(-mid), even | 0x8000u) << std::hex << lo;
  }
  // Chosen ties, spelled out: 1 + 2^-11 sits between 0x3c00 and 0x3c01.
  EXPECT_EQ(F32ToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(F32ToF16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(F32ToF16(2049.0f), 0x6800);  // 2048 and 2050 are neighbours
  EXPECT_EQ(F32ToF16(2051.0f), 0x6802);
}

TEST(DTypeTest, F16OverflowsToInf) {
  EXPECT_EQ(F32ToF16(65504.0f), 0x7bff);
  EXPECT_EQ(F32ToF16(65519.0f), 0x7bff);
  EXPECT_EQ(F32ToF16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(F32ToF16(65520.0f), 0x7c00);
  EXPECT_EQ(F32ToF16(-65520.0f), 0xfc00);
  EXPECT_EQ(F32ToF16(65536.0f), 0x7c00);
  EXPECT_EQ(F32ToF16(1e10f), 0x7c00);
  EXPECT_EQ(F32ToF16(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(F32ToF16(-std::numeric_limits<float>::max()), 0xfc00);
}

TEST(DTypeTest, F16Subnormals) {
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -25)), 0x0000);  // tie with 0: even
  EXPECT_EQ(F32ToF16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(F32ToF16(3 * std::ldexp(1.0f, -25)), 0x0002);  // tie between 1 and 2: even
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -26)), 0x0000);
  EXPECT_EQ(F32ToF16(-std::ldexp(1.0f, -26)), 0x8000);  // underflow keeps the sign
  EXPECT_EQ(F32ToF16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(F32ToF16(-1e-40f), 0x8000);
  EXPECT_EQ(F32ToF16(1023 * std::ldexp(1.0f, -24)), 0x03ff);
  // Halfway between the largest subnormal and the smallest normal rounds up to the even normal.
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -25)), 0x0400);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -14)), 0x0400);
}

TEST(DTypeTest, F16NaNStaysNaN) {
  EXPECT_TRUE(std::isnan(F16ToF32(F32ToF16(std::numeric_limits<float>::quiet_NaN()))));
  for (uint32_t bits : {0x7f800001u, 0x7fc00000u, 0x7f801fffu, 0xff800001u, 0x7fffffffu}) {
    const uint16_t h = F32ToF16(FromBits(bits));
    EXPECT_TRUE(IsF16NaN(h)) << std::hex << bits << " -> " << h;
    EXPECT_EQ(h & 0x8000u, (bits >> 16) & 0x8000u) << "sign of " << std::hex << bits;
  }
  for (uint32_t v = 0; v <= 0xffff; ++v) {
    const uint16_t x = static_cast<uint16_t>(v);
    if (!IsF16NaN(x)) continue;
    ASSERT_TRUE(std::isnan(F16ToF32(x))) << std::hex << v;
    ASSERT_TRUE(IsF16NaN(F32ToF16(F16ToF32(x)))) << std::hex << v;
  }
}

// --- names and sizes ---

TEST(DTypeTest, NamesParseBackAndSizesMatch) {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16, DType::kF64, DType::kI8, DType::kU8,
                  DType::kI16, DType::kI32, DType::kI64, DType::kBool}) {
    auto parsed = ParseDType(DTypeName(d));
    ASSERT_TRUE(parsed.ok()) << DTypeName(d);
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(DTypeSize(DType::kI64), 8u);
  EXPECT_EQ(DTypeSize(DType::kBool), 1u);
  EXPECT_TRUE(IsFloatingPoint(DType::kBF16));
  EXPECT_FALSE(IsFloatingPoint(DType::kI32));
}

TEST(DTypeTest, UnknownDtypeNamesIt) {
  for (const char* name : {"F8_E4M3", "Q4", "bf16", ""}) {
    auto parsed = ParseDType(name);
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_NE(parsed.status().message().find(absl::StrCat("\"", name, "\"")), std::string::npos)
        << parsed.status();
  }
}

}  // namespace
}  // namespace epx
