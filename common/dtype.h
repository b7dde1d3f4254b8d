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

enum class DType : uint8_t { kF32, kF16, kBF16, kF64, kI8, kU8, kI16, kI32, kI64, kBool };

size_t DTypeSize(DType dtype);
// The safetensors spelling: "F32", "BF16", ...
const char* DTypeName(DType dtype);
// Parses a safetensors dtype string; InvalidArgument for unknown ones (e.g. "F8_E4M3" for now).
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

}  // namespace epx

#endif  // EPX_COMMON_DTYPE_H_
