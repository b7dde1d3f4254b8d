// Element types of tensors and the scalar conversions between them. bf16 and fp16 are stored as
// raw 16-bit patterns; conversions to fp32 are exact, conversions from fp32 round to nearest even.
// Thread-safe (pure functions).
#ifndef EPX_COMMON_DTYPE_H_
#define EPX_COMMON_DTYPE_H_

#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/statusor.h"

namespace epx {

// kF8E4M3 is the OCP e4m3 ("E4M3FN") format epx quantises expert weights to; checkpoints in it
// are not read (ParseDType refuses "F8_E4M3").
enum class DType : uint8_t {
  kF32, kF16, kBF16, kF64, kI8, kU8, kI16, kI32, kI64, kBool, kF8E4M3
};

size_t DTypeSize(DType dtype);
// The safetensors spelling: "F32", "BF16", ...
const char* DTypeName(DType dtype);
// Parses a safetensors dtype string; InvalidArgument for unknown ones (and for "F8_E4M3").
absl::StatusOr<DType> ParseDType(const std::string& name);
bool IsFloatingPoint(DType dtype);

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float F16ToF32(uint16_t v);
uint16_t F32ToF16(float f);

// FP8 e4m3 (bias 7, no infinities, S.1111.111 is NaN, largest finite 448). Decoding is exact;
// encoding rounds to nearest even and saturates to +-448 (as CUDA's __NV_SATFINITE), NaN -> 0x7f.
float Fp8E4m3ToF32(uint8_t v);
uint8_t F32ToFp8E4m3(float f);

}  // namespace epx

#endif  // EPX_COMMON_DTYPE_H_
