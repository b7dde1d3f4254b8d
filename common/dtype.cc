#include "common/dtype.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace epx {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF64:
    case DType::kI64:
      return 8;
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
    case DType::kI16:
      return 2;
    case DType::kI8:
    case DType::kU8:
    case DType::kBool:
    case DType::kF8E4M3:
      return 1;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kF64:
      return "F64";
    case DType::kI8:
      return "I8";
    case DType::kU8:
      return "U8";
    case DType::kI16:
      return "I16";
    case DType::kI32:
      return "I32";
    case DType::kI64:
      return "I64";
    case DType::kBool:
      return "BOOL";
    case DType::kF8E4M3:
      return "F8_E4M3";
  }
  return "?";
}

absl::StatusOr<DType> ParseDType(const std::string& name) {
  static constexpr DType kAll[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kF64,
                                   DType::kI8,  DType::kU8,  DType::kI16,  DType::kI32,
                                   DType::kI64, DType::kBool};
  for (DType d : kAll) {
    if (DTypeName(d) == name) return d;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown dtype \"", name, "\" (known: F32, F16, BF16, F64, I8, U8, I16, I32, I64, BOOL)"));
}

bool IsFloatingPoint(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16 ||
         dtype == DType::kF64;
}

float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t F32ToF16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // overflow (incl. rounding) to inf
  if (abs < 0x38800000u) {                        // subnormal or zero in fp16
    if (abs < 0x33000000u) return sign;           // below half the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // value = mant * 2^(exp-150) = half * 2^-24
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t v = abs - 0x38000000u;  // rebias exponent 127 -> 15
  v += 0xfffu + ((v >> 13) & 1u);
  return sign | static_cast<uint16_t>(v >> 13);
}

float Fp8E4m3ToF32(uint8_t v) {
  const bool negative = (v & 0x80u) != 0;
  const int exp = (v >> 3) & 0xf;
  const int mant = v & 0x7;
  float magnitude;
  if (exp == 0xf && mant == 0x7) {
    magnitude = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    magnitude = std::ldexp(static_cast<float>(mant), -9);  // subnormal: mant/8 * 2^-6
  } else {
    magnitude = std::ldexp(1.f + static_cast<float>(mant) / 8.f, exp - 7);
  }
  return negative ? -magnitude : magnitude;
}

uint8_t F32ToFp8E4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0x00;
  const float a = std::fabs(f);
  if (a >= 448.f) return sign | 0x7e;  // saturate (also infinities)
  // The representable magnitudes are exactly the 126 finite codes 0x00..0x7e in increasing
  // order: pick the nearest, ties to the even code.
  uint8_t lo = 0, hi = 0x7e;
  while (hi - lo > 1) {  // largest code with value <= a
    const uint8_t mid = static_cast<uint8_t>((lo + hi) / 2);
    if (Fp8E4m3ToF32(mid) <= a) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  if (Fp8E4m3ToF32(hi) <= a) lo = hi;
  if (lo == 0x7e) return sign | lo;
  const float below = Fp8E4m3ToF32(lo), above = Fp8E4m3ToF32(static_cast<uint8_t>(lo + 1));
  const float d_below = a - below, d_above = above - a;
  uint8_t code = lo;
  if (d_above < d_below || (d_above == d_below && (lo & 1) != 0))
    code = static_cast<uint8_t>(lo + 1);
  return sign | code;
}

}  // namespace epx
