// Shared by the CPU kernels: SIMD function clones and a vectorizable exp.
//
// R1K_SIMD_CLONES compiles a function for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA) and the
// baseline, the copy chosen by CPU features when the library loads (GCC >= 12 on x86-64 Linux;
// elsewhere the baseline only). Loops inside such functions vectorize with `#pragma omp simd`
// (the extension is built with OpenMP on Linux) around exp_simd, which, unlike std::exp, the
// compiler can vectorize.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

// R1K_NO_SIMD_CLONES (setup.py: R1K_NO_SIMD_CLONES=1) builds the baseline copy only: CI runs the C++
// tests on it too, since that is what CPUs without AVX2 and other compilers get.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12 && !defined(R1K_NO_SIMD_CLONES)
#define R1K_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define R1K_HAS_SIMD_CLONES 1
#else
#define R1K_SIMD_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define R1K_INLINE inline __attribute__((always_inline))
#else
#define R1K_INLINE inline
#endif

namespace r1k {

// exp(x) for SIMD loops: x = n ln2 + r with |r| <= ln2 / 2, e^r from Cephes' degree-6 polynomial
// (relative error ~1e-7), 2^n from its exponent bits. Exactly 0 below -87.3 (e^-87.3 is at the
// bottom of the normal floats; -inf included); inf above fp32's overflow point; NaN stays NaN.
// F: float, or a GCC vector of floats with I and U its int32 and uint32 vectors of the same
// width (the same operations on every lane: decode_attention's 16-lane softmax).
template <typename F, typename I = int32_t, typename U = uint32_t>
R1K_INLINE F exp_poly(F x) {
  const F lo = F{} - 87.3f, hi = F{} + 88.7228f;
  const F xc = x < lo ? lo : (x > hi ? hi : x);
  const F shift = F{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  F n = (xc * 1.44269504088896341f + shift) - shift;
  // 2^128 is not a float: the top 0.35 of the range takes r up to ln2
  n = n > 127.f ? F{} + 127.f : n;
  const F r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F er = p * r * r + r + 1.0f;
  U bits;  // 2^n: n + 127 in the exponent field (shifted unsigned: defined for any n)
  if constexpr (std::is_same_v<F, float>)
    bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  else
    bits = __builtin_convertvector(__builtin_convertvector(n, I) + 127, U) << 23;
  const F scale = __builtin_bit_cast(F, bits);
  const F y = x < lo ? F{} : er * scale;
  return x > 88.72283f ? F{} + std::numeric_limits<float>::infinity() : y;
}

R1K_INLINE float exp_simd(float x) { return exp_poly(x); }

// Which copy of the R1K_SIMD_CLONES functions this CPU runs (python -m r1kernels prints it).
inline const char* cpu_simd_level() {
#if defined(R1K_HAS_SIMD_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2, FMA)";
  return "baseline (this CPU has no AVX2)";
#else
  return "baseline (built without SIMD clones)";
#endif
}

}  // namespace r1k
