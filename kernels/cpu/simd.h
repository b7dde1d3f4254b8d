// Fixed-width (16 x fp32) vector helpers on GCC/Clang vector extensions. The width is fixed, not
// taken from the ISA, so the order of every reduction is the same on every machine; the compiler
// maps the vectors onto AVX-512, AVX2 or NEON registers. Internal to kernels/cpu.
#ifndef EPX_KERNELS_CPU_SIMD_H_
#define EPX_KERNELS_CPU_SIMD_H_

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace epx::cpu::simd {

inline constexpr int kLanes = 16;
typedef float F32x16 __attribute__((vector_size(64)));
typedef float F32x16U __attribute__((vector_size(64), aligned(4)));
typedef uint16_t U16x16U __attribute__((vector_size(32), aligned(2)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef _Float16 F16x16U __attribute__((vector_size(32), aligned(2)));

// Tags for the weight element types a kernel reads.
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline F32x16 Load(const float* p) { return *reinterpret_cast<const F32x16U*>(p); }
inline F32x16 Load(const Bf16* p) {
#if defined(__AVX512F__)
  // One vpmovzxwd from memory; the generic form below compiles to two halves and a merge.
  // The zero-masked form: GCC 12's unmasked intrinsic reads an "undefined" source and warns.
  const __m512i wide =
      _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const U32x16 w = __builtin_bit_cast(U32x16, wide) << 16;
  return __builtin_bit_cast(F32x16, w);
#else
  const U32x16 w = __builtin_convertvector(*reinterpret_cast<const U16x16U*>(p), U32x16) << 16;
  return __builtin_bit_cast(F32x16, w);
#endif
}
inline F32x16 Load(const F16* p) {
  return __builtin_convertvector(*reinterpret_cast<const F16x16U*>(p), F32x16);
}
inline void Store(float* p, F32x16 v) { *reinterpret_cast<F32x16U*>(p) = v; }

inline float ToF32(float v) { return v; }
inline float ToF32(Bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
inline float ToF32(F16 v) {
  _Float16 h;
  __builtin_memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}

// Sum of the lanes in lane order.
inline float ReduceSum(F32x16 v) {
  float s = v[0];
  for (int i = 1; i < kLanes; ++i) s += v[i];
  return s;
}

inline F32x16 Splat(float v) { return F32x16{} + v; }

}  // namespace epx::cpu::simd

#endif  // EPX_KERNELS_CPU_SIMD_H_
