// CUDA kernels for moe_permute / moe_unpermute. CUDA headers only; torch binding in moe_cuda.cpp.
//
// Map (deterministic, no atomics), N = T*k flat (token, slot) entries, ids int32:
//   count_rank: block e walks all N ids in order; each thread takes 16 consecutive entries per
//               tile, a block-wide exclusive scan of per-thread hit counts gives every entry
//               routed to e its rank (stable by token, then slot) and counts[e].
//               Bytes: E x N*4 read (from L2 after the first block) + N*4 written.
//   offsets:    one block scans the align-rounded counts.
//   rows:       row = offsets[e] + rank, token_ids[row] = t (token_ids preset to -1 by a memset).
// Rows (16-byte accesses when H*elt % 16 == 0, fp32 accumulation):
//   scatter:    block per token reads x[t] once, writes its k rows (times w[t, j] when given).
//               Bytes: T*H*elt read + T*k*H*elt written.
//   zero_pad:   block per expert clears its padding rows (and block E the tail).
//   gather:     block per token: y[t] = sum_j w[t, j] src[row(t, j)]; k loads in flight per
//               vector. Bytes: T*k*H*elt read + T*H*elt written.
//   rows_dot:   warp per (t, j): <gy[t], src[row]>. Bytes: T*k*H*elt*2 read (gy from L1/L2).
// The T=16384, H=7168, k=8 bf16 permute + unpermute moves 2 x (0.23 + 1.88) GB: ~1.3 ms at
// 3.35 TB/s, so the map (~20 us) is noise.
#include <cuda_runtime.h>
#include <stdint.h>

#include "moe/moe_cuda_common.cuh"

namespace r1k {
namespace moe {
namespace {

constexpr int kScanThreads = 1024;
constexpr int kItems = 16;

// Block-wide exclusive scan of one int per thread (blockDim.x == kScanThreads); *total gets the sum.
__device__ __forceinline__ int block_exclusive_scan(int v, int* total) {
  __shared__ int warp_tot[kScanThreads / 32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  int inc = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(kFullMask, inc, off);
    if (lane >= off) inc += o;
  }
  if (lane == 31) warp_tot[wid] = inc;
  __syncthreads();
  if (wid == 0) {
    int w = warp_tot[lane];
    int winc = w;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_up_sync(kFullMask, winc, off);
      if (lane >= off) winc += o;
    }
    warp_tot[lane] = winc - w;  // exclusive prefix of warp totals
    if (lane == 31) *total = winc;
  }
  __syncthreads();
  const int res = warp_tot[wid] + inc - v;
  __syncthreads();  // warp_tot is reused by the next call
  return res;
}

__global__ void __launch_bounds__(kScanThreads)
count_rank_kernel(const int32_t* __restrict__ ids, int64_t N, int32_t* __restrict__ rank, int32_t* __restrict__ counts) {
  __shared__ int s_total;
  const int e = blockIdx.x;
  const bool vec = reinterpret_cast<uintptr_t>(ids) % 16 == 0;
  int running = 0;
  const int64_t tile = static_cast<int64_t>(kScanThreads) * kItems;
  for (int64_t base = 0; base < N; base += tile) {
    const int64_t first = base + static_cast<int64_t>(threadIdx.x) * kItems;
    int32_t v[kItems];
    if (vec && first + kItems <= N) {  // four 16-byte loads
#pragma unroll
      for (int q = 0; q < kItems / 4; ++q) {
        const int4 p = *reinterpret_cast<const int4*>(ids + first + 4 * q);
        v[4 * q] = p.x; v[4 * q + 1] = p.y; v[4 * q + 2] = p.z; v[4 * q + 3] = p.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) v[i] = first + i < N ? ids[first + i] : -1;
    }
    int hits = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) hits += v[i] == e;
    int before = block_exclusive_scan(hits, &s_total);
    __syncthreads();
    const int tile_total = s_total;
    before += running;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (v[i] == e) rank[first + i] = before++;
    }
    running += tile_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) counts[e] = running;
}

__global__ void __launch_bounds__(kScanThreads)
offsets_kernel(const int32_t* __restrict__ counts, int E, int align, int32_t* __restrict__ offsets) {
  __shared__ int s_total;
  int running = 0;
  for (int base = 0; base < E; base += kScanThreads) {
    const int e = base + threadIdx.x;
    const int c = e < E ? counts[e] : 0;
    const int p = (c + align - 1) / align * align;
    const int before = block_exclusive_scan(p, &s_total);
    __syncthreads();
    if (e < E) offsets[e] = running + before;
    running += s_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[E] = running;
}

__global__ void rows_kernel(const int32_t* __restrict__ ids, const int32_t* __restrict__ rank,
                            const int32_t* __restrict__ offsets, int32_t* __restrict__ row_ids,
                            int32_t* __restrict__ token_ids, int64_t N, int E, int K) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int e = ids[i];
  if (e < 0 || e >= E) {  // the binding rejects these; never write out of bounds
    row_ids[i] = -1;
    return;
  }
  const int r = offsets[e] + rank[i];
  row_ids[i] = r;
  token_ids[r] = static_cast<int32_t>(i / K);
}

template <typename T, int V>
__global__ void scatter_rows_kernel(const T* __restrict__ x, int64_t stride_x, const int32_t* __restrict__ row_ids,
                                    const float* __restrict__ w, T* __restrict__ out, int64_t H, int K, int64_t R) {
  using Acc = typename AccT<T>::type;
  const int64_t t = blockIdx.x;
  const int64_t nvec = H / V;
  for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
    const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(x + t * stride_x + c * V);
    for (int j = 0; j < K; ++j) {
      const int r = row_ids[t * K + j];
      if (r < 0 || r >= R) continue;
      Pack<T, V> q = p;
      if (w != nullptr) {
        const Acc wj = w[t * K + j];
#pragma unroll
        for (int i = 0; i < V; ++i) q.v[i] = Conv<T>::from(static_cast<Acc>(to_float(p.v[i])) * wj);
      }
      *reinterpret_cast<Pack<T, V>*>(out + static_cast<int64_t>(r) * H + c * V) = q;
    }
  }
}

template <typename T, int V>
__global__ void zero_pad_kernel(T* __restrict__ out, const int32_t* __restrict__ counts,
                                const int32_t* __restrict__ offsets, int E, int64_t R, int64_t H) {
  const int e = blockIdx.x;
  const int64_t start = e < E ? static_cast<int64_t>(offsets[e]) + counts[e] : offsets[E];
  const int64_t end = e < E ? offsets[e + 1] : R;
  const int64_t nvec = H / V;
  Pack<T, V> z;
#pragma unroll
  for (int i = 0; i < V; ++i) z.v[i] = Conv<T>::from(0.f);
  for (int64_t r = start; r < end; ++r)
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x)
      *reinterpret_cast<Pack<T, V>*>(out + r * H + c * V) = z;
}

template <typename T, int V>
__global__ void gather_rows_kernel(const T* __restrict__ src, const int32_t* __restrict__ row_ids,
                                   const float* __restrict__ w, T* __restrict__ out, int64_t H, int K, int64_t R) {
  using Acc = typename AccT<T>::type;
  const int64_t t = blockIdx.x;
  const int64_t nvec = H / V;
  for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
    Acc acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = Acc(0);
#pragma unroll 4
    for (int j = 0; j < K; ++j) {
      const int r = row_ids[t * K + j];
      if (r < 0 || r >= R) continue;
      const Acc wj = w != nullptr ? static_cast<Acc>(w[t * K + j]) : Acc(1);
      const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(src + static_cast<int64_t>(r) * H + c * V);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += wj * static_cast<Acc>(to_float(p.v[i]));
    }
    Pack<T, V> q;
#pragma unroll
    for (int i = 0; i < V; ++i) q.v[i] = Conv<T>::from(acc[i]);
    *reinterpret_cast<Pack<T, V>*>(out + t * H + c * V) = q;
  }
}

template <typename T, int V>
__global__ void rows_dot_kernel(const T* __restrict__ gy, const T* __restrict__ src, const int32_t* __restrict__ row_ids,
                                float* __restrict__ out, int64_t TK, int64_t H, int K, int64_t R) {
  using Acc = typename AccT<T>::type;
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (pair >= TK) return;
  const int64_t t = pair / K;
  const int r = row_ids[pair];
  Acc acc = 0;
  if (r >= 0 && r < R) {
    for (int64_t c = lane; c < H / V; c += 32) {
      const Pack<T, V> a = *reinterpret_cast<const Pack<T, V>*>(gy + t * H + c * V);
      const Pack<T, V> b = *reinterpret_cast<const Pack<T, V>*>(src + static_cast<int64_t>(r) * H + c * V);
#pragma unroll
      for (int i = 0; i < V; ++i) acc += static_cast<Acc>(to_float(a.v[i])) * static_cast<Acc>(to_float(b.v[i]));
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(kFullMask, acc, off);
  if (lane == 0) out[pair] = static_cast<float>(acc);
}

constexpr int kRowThreads = 256;

// V = 16 bytes of elements when every row start is 16-byte aligned, else 1.
template <typename T>
bool can_vec(const void* a, const void* b, int64_t H, int64_t stride) {
  constexpr int V = 16 / sizeof(T);
  return H % V == 0 && stride % V == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

template <typename T>
void scatter_typed(const void* x, int64_t stride_x, const int32_t* row_ids, const int32_t* counts,
                   const int32_t* offsets, const float* w, void* out, int64_t T_, int64_t H, int K, int E, int64_t R,
                   cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const T* xp = static_cast<const T*>(x);
  T* op = static_cast<T*>(out);
  const bool vec = can_vec<T>(xp, op, H, stride_x);
  if (T_ > 0 && K > 0) {
    if (vec) scatter_rows_kernel<T, V><<<static_cast<unsigned>(T_), kRowThreads, 0, stream>>>(xp, stride_x, row_ids, w, op, H, K, R);
    else scatter_rows_kernel<T, 1><<<static_cast<unsigned>(T_), kRowThreads, 0, stream>>>(xp, stride_x, row_ids, w, op, H, K, R);
  }
  if (R > T_ * K) {  // padding rows exist only when align > 1
    if (vec) zero_pad_kernel<T, V><<<E + 1, kRowThreads, 0, stream>>>(op, counts, offsets, E, R, H);
    else zero_pad_kernel<T, 1><<<E + 1, kRowThreads, 0, stream>>>(op, counts, offsets, E, R, H);
  }
}

template <typename T>
void gather_typed(const void* src, const int32_t* row_ids, const float* w, void* out, int64_t T_, int64_t H, int K,
                  int64_t R, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const T* sp = static_cast<const T*>(src);
  T* op = static_cast<T*>(out);
  if (can_vec<T>(sp, op, H, H)) gather_rows_kernel<T, V><<<static_cast<unsigned>(T_), kRowThreads, 0, stream>>>(sp, row_ids, w, op, H, K, R);
  else gather_rows_kernel<T, 1><<<static_cast<unsigned>(T_), kRowThreads, 0, stream>>>(sp, row_ids, w, op, H, K, R);
}

template <typename T>
void dot_typed(const void* gy, const void* src, const int32_t* row_ids, float* out, int64_t T_, int64_t H, int K,
               int64_t R, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const T* gp = static_cast<const T*>(gy);
  const T* sp = static_cast<const T*>(src);
  const int64_t TK = T_ * K;
  const unsigned blocks = static_cast<unsigned>((TK * 32 + kRowThreads - 1) / kRowThreads);
  if (can_vec<T>(gp, sp, H, H)) rows_dot_kernel<T, V><<<blocks, kRowThreads, 0, stream>>>(gp, sp, row_ids, out, TK, H, K, R);
  else rows_dot_kernel<T, 1><<<blocks, kRowThreads, 0, stream>>>(gp, sp, row_ids, out, TK, H, K, R);
}

}  // namespace

// Launcher: ids int32 [N = T*K] (validated, in [0, E)); scratch `rank` int32 [N]; outputs counts [E],
// offsets [E + 1], row_ids [N], token_ids [N + E*(align-1)] (all int32, token_ids set to -1 here).
cudaError_t moe_permute_map_cuda_launch(const int32_t* ids, int64_t N, int K, int E, int align, int32_t* rank,
                                        int32_t* counts, int32_t* offsets, int32_t* row_ids, int32_t* token_ids,
                                        int64_t R, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(token_ids, 0xff, R * sizeof(int32_t), stream);  // -1
  if (err != cudaSuccess) return err;
  count_rank_kernel<<<E, kScanThreads, 0, stream>>>(ids, N, rank, counts);
  offsets_kernel<<<1, kScanThreads, 0, stream>>>(counts, E, align, offsets);
  if (N > 0) {
    rows_kernel<<<static_cast<unsigned>((N + 255) / 256), 256, 0, stream>>>(ids, rank, offsets, row_ids, token_ids,
                                                                           N, E, K);
  }
  return cudaGetLastError();
}

// Launcher: out [R, H] = rows of x [T, H] (row stride stride_x) at row_ids [T, K] (times w [T, K]
// fp32 when not null); padding rows (token_ids == -1, i.e. outside [offsets[e], offsets[e] +
// counts[e])) zeroed.
cudaError_t moe_scatter_rows_cuda_launch(int dtype, const void* x, int64_t stride_x, const int32_t* row_ids,
                                         const int32_t* counts, const int32_t* offsets, const float* w, void* out,
                                         int64_t T_, int64_t H, int K, int E, int64_t R, cudaStream_t stream) {
  if (H == 0) return cudaSuccess;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: scatter_typed<float>(x, stride_x, row_ids, counts, offsets, w, out, T_, H, K, E, R, stream); break;
    case DType::kBFloat16: scatter_typed<__nv_bfloat16>(x, stride_x, row_ids, counts, offsets, w, out, T_, H, K, E, R, stream); break;
    case DType::kFloat16: scatter_typed<__half>(x, stride_x, row_ids, counts, offsets, w, out, T_, H, K, E, R, stream); break;
    case DType::kFloat64: scatter_typed<double>(x, stride_x, row_ids, counts, offsets, w, out, T_, H, K, E, R, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Launcher: out [T, H] = sum_j w[t, j] * src[row_ids[t, j]] (w fp32 or null = 1); src [R, H], out contiguous;
// rows outside [0, R) are skipped.
cudaError_t moe_gather_rows_cuda_launch(int dtype, const void* src, const int32_t* row_ids, const float* w, void* out,
                                        int64_t T_, int64_t H, int K, int64_t R, cudaStream_t stream) {
  if (T_ == 0 || H == 0) return cudaSuccess;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: gather_typed<float>(src, row_ids, w, out, T_, H, K, R, stream); break;
    case DType::kBFloat16: gather_typed<__nv_bfloat16>(src, row_ids, w, out, T_, H, K, R, stream); break;
    case DType::kFloat16: gather_typed<__half>(src, row_ids, w, out, T_, H, K, R, stream); break;
    case DType::kFloat64: gather_typed<double>(src, row_ids, w, out, T_, H, K, R, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Launcher: out [T, K] fp32 = <gy[t], src[row_ids[t, j]]>; gy, src contiguous, same dtype.
cudaError_t moe_rows_dot_cuda_launch(int dtype, const void* gy, const void* src, const int32_t* row_ids, float* out,
                                     int64_t T_, int64_t H, int K, int64_t R, cudaStream_t stream) {
  if (T_ == 0 || K == 0) return cudaSuccess;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: dot_typed<float>(gy, src, row_ids, out, T_, H, K, R, stream); break;
    case DType::kBFloat16: dot_typed<__nv_bfloat16>(gy, src, row_ids, out, T_, H, K, R, stream); break;
    case DType::kFloat16: dot_typed<__half>(gy, src, row_ids, out, T_, H, K, R, stream); break;
    case DType::kFloat64: dot_typed<double>(gy, src, row_ids, out, T_, H, K, R, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace moe
}  // namespace r1k
