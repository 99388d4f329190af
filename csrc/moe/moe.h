// MoE routing and dispatch: definitions shared by the CPU (moe_cpu.cpp) and CUDA (*.cu) kernels.
// Standard headers only, so the .cu files still compile with a plain `nvcc -c`.
//
// Ranking (every backend): descending by the packed 64-bit key
//     tier << 52 | ordered(value) << 20 | (2^20 - 1 - index)
// tier 3 = eligible, 2 = outside the kept groups, 1 = NaN (ordered part 0), 0 = taken/absent.
// ordered() maps fp32 bits to uint32 with the order of the floats (-0.0 is folded to +0.0), so
// a max over keys picks the best value, ties the lower index, and NaN only when nothing else is left.
#pragma once
#include <math.h>

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define R1K_HD __host__ __device__ __forceinline__
#else
#define R1K_HD inline
#endif

namespace r1k {
namespace moe {

enum class ScoreFunc : int { kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2 };

// DeepSeek-V4's score sqrt(softplus(x)), softplus as torch computes it (x itself above 20).
R1K_HD float sqrt_softplus(float x) { return sqrtf(x > 20.f ? x : log1pf(expf(x))); }

// ds/dx of s = sqrt(softplus(x)) from s alone: sigmoid(x) / (2s) with sigmoid(x) = 1 - exp(-s^2)
// (expm1 keeps it exact for small s); 0 where s underflowed to 0 (the limit), NaN stays NaN.
R1K_HD float sqrt_softplus_grad(float s) { return s == 0.f ? 0.f : -expm1f(-s * s) / (2.f * s); }

constexpr int kMaxKernelExperts = 512;  // CUDA routing: <= 16 scores per lane in registers
constexpr int kMaxKernelTopK = 32;      // CUDA routing: one selected expert per lane
constexpr uint64_t kTierShift = 52;
constexpr uint32_t kIndexMask = (1u << 20) - 1;  // up to 2^20 experts
constexpr uint64_t kTierEligible = 3, kTierOutside = 2, kTierNaN = 1;

R1K_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

// fp32 -> uint32 with the order of the floats; x must not be NaN.
R1K_HD uint32_t ordered_bits(float x) {
  if (x == 0.0f) x = 0.0f;  // -0.0 == +0.0
  const uint32_t b = float_bits(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Packed ranking key of value v (may be NaN) at index idx (< 2^20) with the given tier
// (the NaN tier is forced for NaN values).
R1K_HD uint64_t rank_key(float v, int idx, uint64_t tier) {
  const bool nan = v != v;
  const uint64_t t = nan ? kTierNaN : tier;
  const uint64_t o = nan ? 0u : ordered_bits(v);
  return (t << kTierShift) | (o << 20) | static_cast<uint64_t>(kIndexMask - static_cast<uint32_t>(idx));
}

R1K_HD int key_index(uint64_t key) { return static_cast<int>(kIndexMask - static_cast<uint32_t>(key & kIndexMask)); }

}  // namespace moe
}  // namespace r1k
