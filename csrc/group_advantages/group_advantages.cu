// CUDA kernel for group_advantages. Only CUDA headers here (raw pointers and a stream), so the
// file compiles with a plain `nvcc -c`; the torch binding is in group_advantages_cuda.cpp.
//
// One warp per group (any group size: lanes stride over the group), 8 warps per block, one
// launch for any number of prompts. scale="batch" needs the std of the whole batch first, so it
// runs as a single 1024-thread block that reduces the batch and then walks the groups (rewards
// are a few thousand floats; one block reads them in a few microseconds).
// Bytes moved: 4 B read + 4 B written per reward (the re-reads of a group hit L1).
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "group_advantages/group_advantages.h"

namespace r1k {
namespace {

constexpr int kWarp = 32;

struct Stats {
  float n, sum, lo, hi;
};

__device__ __forceinline__ Stats warp_reduce(Stats s) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    s.n += __shfl_xor_sync(0xffffffffu, s.n, off);
    s.sum += __shfl_xor_sync(0xffffffffu, s.sum, off);
    s.lo = fminf(s.lo, __shfl_xor_sync(0xffffffffu, s.lo, off));
    s.hi = fmaxf(s.hi, __shfl_xor_sync(0xffffffffu, s.hi, off));
  }
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Strided partial statistics over [begin, end) for one thread.
__device__ __forceinline__ Stats partial_stats(const float* r, int64_t begin, int64_t end,
                                               int64_t stride) {
  Stats s{0.f, 0.f, INFINITY, -INFINITY};
  for (int64_t i = begin; i < end; i += stride) {
    const float v = r[i];
    if (!isnan(v)) {
      s.n += 1.f;
      s.sum += v;
      s.lo = fminf(s.lo, v);
      s.hi = fmaxf(s.hi, v);
    }
  }
  return s;
}

__device__ __forceinline__ float partial_sq_dev(const float* r, int64_t begin, int64_t end,
                                                int64_t stride, float mean) {
  float acc = 0.f;
  for (int64_t i = begin; i < end; i += stride) {
    const float v = r[i];
    if (!isnan(v)) acc += (v - mean) * (v - mean);
  }
  return acc;
}

// One warp normalizes group p. batch_std < 0 means "use the group's own std".
__device__ void normalize_group(const float* __restrict__ r, float* __restrict__ out, int64_t p,
                                int64_t G, int mode, float eps, float batch_std, int lane) {
  const float* rg = r + p * G;
  float* og = out + p * G;
  const Stats s = warp_reduce(partial_stats(rg, lane, G, kWarp));
  const bool constant = s.n <= 1.f || s.lo == s.hi;
  const float mean = s.n > 0.f ? s.sum / s.n : 0.f;
  float denom = 1.f;
  if (mode == static_cast<int>(AdvScale::kGroup)) {
    const float ssd = warp_sum(partial_sq_dev(rg, lane, G, kWarp, mean));
    denom = constant ? 1.f : sqrtf(ssd / (s.n - 1.f)) + eps;
  } else if (mode == static_cast<int>(AdvScale::kBatch)) {
    denom = batch_std + eps;
  }
  const float inv = 1.f / denom;
  for (int64_t i = lane; i < G; i += kWarp) {
    const float v = rg[i];
    og[i] = (constant || isnan(v)) ? 0.f : (v - mean) * inv;
  }
}

__global__ void group_advantages_kernel(const float* __restrict__ r, float* __restrict__ out,
                                        int64_t P, int64_t G, int mode, float eps) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (warp >= P) return;
  normalize_group(r, out, warp, G, mode, eps, -1.f, lane);
}

constexpr int kBatchThreads = 1024;

__global__ void __launch_bounds__(kBatchThreads)
group_advantages_batch_kernel(const float* __restrict__ r, float* __restrict__ out, int64_t P,
                              int64_t G, float eps) {
  __shared__ Stats warp_stats[kBatchThreads / kWarp];
  __shared__ float warp_ssd[kBatchThreads / kWarp];
  __shared__ float batch_mean, batch_std;
  const int lane = threadIdx.x % kWarp;
  const int wid = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int64_t total = P * G;

  Stats s = warp_reduce(partial_stats(r, threadIdx.x, total, blockDim.x));
  if (lane == 0) warp_stats[wid] = s;
  __syncthreads();
  if (wid == 0) {
    Stats t = lane < nwarps ? warp_stats[lane] : Stats{0.f, 0.f, INFINITY, -INFINITY};
    t = warp_reduce(t);
    if (lane == 0) batch_mean = t.n > 0.f ? t.sum / t.n : 0.f;
  }
  __syncthreads();
  const float ssd = warp_sum(partial_sq_dev(r, threadIdx.x, total, blockDim.x, batch_mean));
  if (lane == 0) warp_ssd[wid] = ssd;
  __syncthreads();
  if (wid == 0) {
    float t = warp_sum(lane < nwarps ? warp_ssd[lane] : 0.f);
    const float n = warp_reduce(lane < nwarps ? warp_stats[lane]
                                              : Stats{0.f, 0.f, INFINITY, -INFINITY}).n;
    if (lane == 0) batch_std = n > 1.f ? sqrtf(t / (n - 1.f)) : 0.f;
  }
  __syncthreads();
  for (int64_t p = wid; p < P; p += nwarps) {
    normalize_group(r, out, p, G, static_cast<int>(AdvScale::kBatch), eps, batch_std, lane);
  }
}

}  // namespace

// Launcher: rewards and out are contiguous fp32 device buffers of P * G elements.
cudaError_t group_advantages_cuda_launch(const float* rewards, float* out, int64_t P, int64_t G,
                                         int mode, float eps, cudaStream_t stream) {
  if (P == 0 || G == 0) return cudaSuccess;
  if (mode == static_cast<int>(AdvScale::kBatch)) {
    group_advantages_batch_kernel<<<1, kBatchThreads, 0, stream>>>(rewards, out, P, G, eps);
  } else {
    constexpr int kThreads = 256;
    constexpr int kGroupsPerBlock = kThreads / kWarp;
    const int64_t blocks = (P + kGroupsPerBlock - 1) / kGroupsPerBlock;
    group_advantages_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        rewards, out, P, G, mode, eps);
  }
  return cudaGetLastError();
}

}  // namespace r1k
