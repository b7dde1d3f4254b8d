// 64-bit FNV-1a: a stable fingerprint of short texts (config fields, placements, tensor names).
// Not cryptographic. Thread-safe (pure).
#ifndef EPX_COMMON_HASH_H_
#define EPX_COMMON_HASH_H_

#include <cstdint>
#include <string>

namespace epx {

inline constexpr uint64_t kFnv1aOffset = 1469598103934665603ull;

inline uint64_t Fnv1a64(const std::string& text, uint64_t basis = kFnv1aOffset) {
  uint64_t h = basis;
  for (unsigned char ch : text) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace epx

#endif  // EPX_COMMON_HASH_H_
