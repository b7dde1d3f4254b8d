// Synthetic weights for benchmarks at real shapes without a checkpoint (`--load-format dummy`).
// Every element is a pure function of (seed, index): the CPU and the GPU (which evaluates the same
// constexpr functions in its fill kernel) produce bit-identical tensors, so a dummy model can be
// checked across backends, and a GPU can fill tens of GB without the host touching them.
//
// Thread-safe (pure functions).
#ifndef EPX_COMMON_DUMMY_WEIGHTS_H_
#define EPX_COMMON_DUMMY_WEIGHTS_H_

#include <cmath>
#include <cstdint>
#include <string>

#include "common/hash.h"

namespace epx {

// SplitMix64's finaliser: a bijective mix of 64 bits.
constexpr uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1) on a grid of 2^-23, exactly representable in fp32 (24 random bits).
constexpr float DummyUniform(uint64_t seed, uint64_t index) {
  const uint64_t h = SplitMix64(seed ^ SplitMix64(index));
  return static_cast<float>(static_cast<int32_t>(h >> 40) - (int32_t{1} << 23)) *
         (1.f / static_cast<float>(1 << 23));
}

// The seed of one tensor of a dummy model: its Hugging Face name mixed with the model's seed.
inline uint64_t DummyTensorSeed(uint64_t model_seed, const std::string& tensor_name) {
  return SplitMix64(Fnv1a64(tensor_name) ^ model_seed);
}

// How a dummy tensor is filled: offset + scale * DummyUniform. Matrices get scale k^-1/2 (k = the
// input width) so activations keep their size through the layers; norm weights are 1.
struct DummyFill {
  float scale = 0.f;
  float offset = 0.f;
  static DummyFill Matrix(int64_t in_features);
  static DummyFill Ones() { return {0.f, 1.f}; }
};

inline DummyFill DummyFill::Matrix(int64_t in_features) {
  return {static_cast<float>(1.0 / std::sqrt(static_cast<double>(in_features))), 0.f};
}

}  // namespace epx

#endif  // EPX_COMMON_DUMMY_WEIGHTS_H_
