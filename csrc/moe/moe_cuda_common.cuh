// Helpers shared by the MoE CUDA kernels (CUDA headers only).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace r1k {
namespace moe {

// Element type tags passed from the torch bindings (the .cu files do not include ATen).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ double to_float(double v) { return v; }

// Accumulator -> element type.
template <typename T> struct Conv;
template <> struct Conv<float> { static __device__ __forceinline__ float from(float v) { return v; } };
template <> struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16(v); }
};
template <> struct Conv<__half> { static __device__ __forceinline__ __half from(float v) { return __float2half(v); } };
template <> struct Conv<double> { static __device__ __forceinline__ double from(double v) { return v; } };

// Accumulator type: fp32, fp64 for fp64 data.
template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

// V consecutive elements moved as one access (16 bytes when V * sizeof(T) == 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Warp-wide max of a 64-bit key. sm_80+: two 32-bit redux (high word, then low word among the
// lanes holding the highest high word); older: shuffles.
__device__ __forceinline__ uint64_t warp_max_u64(uint64_t k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t hi = static_cast<uint32_t>(k >> 32);
  const uint32_t lo = static_cast<uint32_t>(k);
  const uint32_t mhi = __reduce_max_sync(kFullMask, hi);
  const uint32_t mlo = __reduce_max_sync(kFullMask, hi == mhi ? lo : 0u);
  return (static_cast<uint64_t>(mhi) << 32) | mlo;
#else
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const uint64_t o = __shfl_xor_sync(kFullMask, k, off);
    k = o > k ? o : k;
  }
  return k;
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

}  // namespace moe
}  // namespace r1k
