// CUDA kernels for moe_route (forward and backward). CUDA headers only; torch binding in moe_cuda.cpp.
//
// Forward: one warp per token, 8 tokens per 256-thread block. Lane l holds the VPT consecutive
// scores e = l*VPT + j in registers (VPT = 1..16, so E <= 512; 16-byte loads when E == 32*VPT),
// fp32 math. Ranking by the packed keys of moe.h.
//   groups, when each group is a power-of-2 number of whole lanes (DeepSeek-V3: 8 groups of 32 =
//     4 lanes x 8): lane-local top-2 of 32-bit ordered keys, a segmented xor-shuffle merge, then
//     topk_group 64-bit warp-max rounds (two redux.sync each on sm_80+); any other grouping goes
//     through shared memory (lane g scans group g).
//   top-k (VPT <= 8): each lane sorts its VPT keys once (bitonic network); a round is one warp max
//     of the lanes' heads, a shuffle for the score, and a predicated shift on the winning lane.
//     VPT = 16 rescans its registers per round. Lane r keeps the r-th pick (top_k <= 32).
// Bytes: T*E*elt read, T*(12k + 4) written: the DeepSeek-V3 shape (T=16384, E=256, fp32) reads
// 16.8 MB, ~5 us at 3.35 TB/s. Issue budget for the 12 us target: ~700 warp instructions per
// token at 16384 tokens on 132 SMs x 4 schedulers; the estimate for that shape is ~650 (sigmoid
// and keys ~150, groups ~80, sort ~150, 8 rounds ~250), so the kernel should sit near the
// memory/issue limit; to be confirmed on a GPU.
//
// Backward: one warp per token, lanes stride over E (coalesced), k selected (id, gs) pairs read
// by every lane: dx_e = s_e (G_e - D) (softmax) or G_e (sigmoid / sqrtsoftplus, G already times ds/dx).
// Bytes: T*E*elt written (+ T*E*elt read for softmax) + T*k*12 read.
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "moe/moe.h"
#include "moe/moe_cuda_common.cuh"

namespace r1k {
namespace moe {
namespace {

constexpr int kRouteWarps = 8;
constexpr int kRouteThreads = kRouteWarps * 32;

template <typename T, int VPT>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int E, int lane, bool vec, float (&v)[VPT]) {
  constexpr int kVec = 16 / sizeof(T);
  if constexpr (VPT % kVec == 0) {
    if (vec) {
#pragma unroll
      for (int c = 0; c < VPT / kVec; ++c) {
        const Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(row + lane * VPT + c * kVec);
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[c * kVec + i] = to_float(p.v[i]);
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane * VPT + j;
    v[j] = e < E ? to_float(row[e]) : -INFINITY;
  }
}

// Bitonic sort of a lane's N (power of 2) keys, descending, carrying the scores along. All
// indices are compile-time constants after unrolling, so the arrays stay in registers.
template <int N>
__device__ __forceinline__ void sort_desc(uint64_t (&k)[N], float (&s)[N]) {
#pragma unroll
  for (int size = 2; size <= N; size <<= 1) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride >>= 1) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int j = i ^ stride;
        if (j > i) {
          const bool desc = (i & size) == 0;
          const bool swap = desc ? k[i] < k[j] : k[i] > k[j];
          const uint64_t ki = k[i], kj = k[j];
          const float si = s[i], sj = s[j];
          k[i] = swap ? kj : ki;
          k[j] = swap ? ki : kj;
          s[i] = swap ? sj : si;
          s[j] = swap ? si : sj;
        }
      }
    }
  }
}

// Value of an ordered_bits key (0 stands for NaN).
__device__ __forceinline__ float ordered_value(uint32_t u) {
  if (u == 0u) return NAN;
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// Group stage when every group is `lpg` whole lanes (lpg a power of 2; DeepSeek-V3: E=256,
// 8 groups -> 4 lanes of 8 scores): lane-local top-2, a segmented xor-shuffle merge, then
// topk_group warp-max rounds over the group keys (every lane of a group holds its key).
// Returns whether this lane's group is kept.
template <int VPT>
__device__ __forceinline__ bool group_select_lanes(const float (&c)[VPT], int lane, int lpg, int n_group,
                                                   bool take2, int topk_group) {
  uint32_t a = 0u, b = 0u;  // top-2 ordered keys of the lane's scores, a >= b (0 = NaN)
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const uint32_t u = c[j] != c[j] ? 0u : ordered_bits(c[j]);
    b = u > a ? a : (u > b ? u : b);
    a = u > a ? u : a;
  }
  for (int off = 1; off < lpg; off <<= 1) {
    const uint32_t oa = __shfl_xor_sync(kFullMask, a, off);
    const uint32_t ob = __shfl_xor_sync(kFullMask, b, off);
    const uint32_t hi = a > oa ? a : oa, lo = a > oa ? oa : a;
    b = lo > (b > ob ? b : ob) ? lo : (b > ob ? b : ob);
    a = hi;
  }
  const float score = take2 ? ordered_value(a) + ordered_value(b) : ordered_value(a);
  const int g = lane / lpg;
  uint64_t gk = g < n_group ? rank_key(score, g, kTierOutside) : 0ull;  // lanes past E hold no group
  bool kept = false;
  for (int r = 0; r < topk_group; ++r) {
    const uint64_t win = warp_max_u64(gk);
    if (gk == win) { kept = true; gk = 0ull; }
  }
  return kept;
}

// Group stage for any group size: the biased scores go through this warp's shared memory, lane g
// scans group g for its top-2 (or max), topk_group warp-max rounds pick the kept groups.
// Returns the eligibility bits of the lane's VPT elements.
template <int VPT>
__device__ __forceinline__ uint32_t group_select_smem(const float (&c)[VPT], float* s_c, unsigned char* s_kept,
                                                      int E, int n_group, int gs, bool take2, int topk_group,
                                                      int lane) {
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane * VPT + j;
    if (e < E) s_c[e] = c[j];
  }
  __syncwarp();
  uint64_t gk[VPT];  // groups g = lane + 32*i (n_group <= E <= 32*VPT)
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int g = lane + 32 * i;
    gk[i] = 0ull;
    if (g < n_group) {
      uint64_t b1 = 0ull, b2 = 0ull;
      float v1 = 0.f, v2 = 0.f;
      for (int e = g * gs; e < (g + 1) * gs; ++e) {
        const float x = s_c[e];
        const uint64_t k = rank_key(x, e, kTierEligible);
        if (k > b1) { b2 = b1; v2 = v1; b1 = k; v1 = x; }
        else if (k > b2) { b2 = k; v2 = x; }
      }
      gk[i] = rank_key(take2 ? v1 + v2 : v1, g, kTierOutside);
      s_kept[g] = 0;
    }
  }
  __syncwarp();
  for (int r = 0; r < topk_group; ++r) {
    uint64_t best = 0ull;
#pragma unroll
    for (int i = 0; i < VPT; ++i) best = gk[i] > best ? gk[i] : best;
    const uint64_t win = warp_max_u64(best);
    const int g = key_index(win);
    if (lane == (g & 31)) s_kept[g] = 1;
#pragma unroll
    for (int i = 0; i < VPT; ++i) if (gk[i] == win) gk[i] = 0ull;
  }
  __syncwarp();
  uint32_t elig = 0u;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane * VPT + j;
    if (e < E && s_kept[e / gs]) elig |= 1u << j;
  }
  __syncwarp();  // s_c / s_kept are reused by the warp's next token only after every lane read them
  return elig;
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kRouteThreads)
moe_route_kernel(const T* __restrict__ x, int64_t T_, int E, int64_t stride, int top_k, int score_func,
                 int n_group, int topk_group, const float* __restrict__ bias, int norm, float scale,
                 const int64_t* __restrict__ replay, bool vec, float* __restrict__ w_out,
                 int32_t* __restrict__ ids_out, float* __restrict__ sel_out, float* __restrict__ lse_out) {
  __shared__ float s_c[kRouteWarps][kMaxKernelExperts];
  __shared__ unsigned char s_kept[kRouteWarps][kMaxKernelExperts];
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + wid;
  if (t >= T_) return;  // whole warps exit together
  const T* row = x + t * stride;

  float v[VPT];
  load_row<T, VPT>(row, E, lane, vec, v);

  // scores
  float mx = 0.f, den = 1.f, lse = 0.f;
  if (score_func == static_cast<int>(ScoreFunc::kSigmoid)) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) v[j] = 1.f / (1.f + __expf(-v[j]));
  } else if (score_func == static_cast<int>(ScoreFunc::kSqrtSoftplus)) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) v[j] = sqrt_softplus(v[j]);
  } else {
    bool nan = false;
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      nan |= isnan(v[j]);
      m = fmaxf(m, v[j]);  // fmaxf skips NaN
    }
    nan = __any_sync(kFullMask, nan);
    mx = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = lane * VPT + j;
      v[j] = e < E ? __expf(v[j] - mx) : 0.f;
      sum += v[j];
    }
    den = warp_sum(sum);
    const float inv = 1.f / den;
#pragma unroll
    for (int j = 0; j < VPT; ++j) v[j] = nan ? NAN : v[j] * inv;
    lse = nan ? NAN : mx + __logf(den);
  }
  if (lane == 0) lse_out[t] = lse;  // stored now: not kept live through the selection

  float my_s = 0.f;  // lane r < top_k: the r-th selected score
  int my_id = 0;
  float total = 0.f;
  if (replay != nullptr) {
    // the binding validated the ids; each lane recomputes its score from the logit
    if (lane < top_k) {
      my_id = static_cast<int>(replay[t * top_k + lane]);
      my_id = my_id < 0 ? 0 : (my_id >= E ? E - 1 : my_id);
      const float xl = to_float(row[my_id]);
      if (score_func == static_cast<int>(ScoreFunc::kSigmoid)) {
        my_s = 1.f / (1.f + __expf(-xl));
      } else if (score_func == static_cast<int>(ScoreFunc::kSqrtSoftplus)) {
        my_s = sqrt_softplus(xl);
      } else {
        my_s = isnan(lse) ? NAN : __expf(xl - mx) / den;
      }
    }
    total = warp_sum(lane < top_k ? my_s : 0.f);
  } else {
    float c[VPT];  // the biased scores that select
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = lane * VPT + j;
      c[j] = bias != nullptr && e < E ? v[j] + bias[e] : v[j];
    }
    // eligibility: bit j set when element j of this lane lies in a kept group
    uint32_t elig = (1u << VPT) - 1u;
    if (n_group > 1) {
      const int gs = E / n_group;
      const bool take2 = bias != nullptr && gs >= 2;
      const int lpg = gs / VPT;  // lanes per group when groups are whole lanes
      if (gs % VPT == 0 && lpg <= 32 && (lpg & (lpg - 1)) == 0) {
        elig = group_select_lanes<VPT>(c, lane, lpg, n_group, take2, topk_group) ? elig : 0u;
      } else {
        elig = group_select_smem<VPT>(c, s_c[wid], s_kept[wid], E, n_group, gs, take2, topk_group, lane);
      }
    }
    uint64_t key[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = lane * VPT + j;
      key[j] = e < E ? rank_key(c[j], e, (elig >> j) & 1u ? kTierEligible : kTierOutside) : 0ull;
    }
    if constexpr (VPT <= 8) {
      // sort the lane's keys once (bitonic network), then each round costs one warp max and a
      // predicated shift on the winning lane
      sort_desc<VPT>(key, v);
      for (int r = 0; r < top_k; ++r) {
        const uint64_t win = warp_max_u64(key[0]);
        const int id = key_index(win);
        const float sv = __shfl_sync(kFullMask, v[0], id / VPT);
        const bool mine = key[0] == win;
#pragma unroll
        for (int j = 0; j + 1 < VPT; ++j) {
          key[j] = mine ? key[j + 1] : key[j];
          v[j] = mine ? v[j + 1] : v[j];
        }
        if (mine) key[VPT - 1] = 0ull;
        if (lane == r) { my_s = sv; my_id = id; }
        total += sv;
      }
    } else {
      for (int r = 0; r < top_k; ++r) {
        uint64_t best = 0ull;
        float best_s = 0.f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
          if (key[j] > best) { best = key[j]; best_s = v[j]; }
        }
        const uint64_t win = warp_max_u64(best);
        const int id = key_index(win);
        const float sv = __shfl_sync(kFullMask, best_s, id / VPT);
#pragma unroll
        for (int j = 0; j < VPT; ++j) if (key[j] == win) key[j] = 0ull;
        if (lane == r) { my_s = sv; my_id = id; }
        total += sv;
      }
    }
  }
  if (lane < top_k) {
    const float mul = norm ? scale / (total + 1e-20f) : scale;
    const int64_t o = t * top_k + lane;
    w_out[o] = my_s * mul;
    ids_out[o] = my_id;
    sel_out[o] = my_s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRouteThreads)
moe_route_backward_kernel(const float* __restrict__ gs, const int32_t* __restrict__ ids,
                          const float* __restrict__ sel, const T* __restrict__ x, const float* __restrict__ lse,
                          T* __restrict__ dx, int64_t T_, int E, int K, int score_func) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
  if (t >= T_) return;
  const bool sigmoid = score_func == static_cast<int>(ScoreFunc::kSigmoid);
  const bool sqrt_softplus_score = score_func == static_cast<int>(ScoreFunc::kSqrtSoftplus);
  const bool elementwise = sigmoid || sqrt_softplus_score;  // dx only at the ids
  const float l = elementwise ? 0.f : lse[t];
  float d = 0.f;
  if (!elementwise) {
    for (int j = 0; j < K; ++j) {
      const int id = ids[t * K + j];
      if (id >= 0 && id < E) d += gs[t * K + j] * __expf(to_float(x[t * E + id]) - l);
    }
  }
  for (int e = lane; e < E; e += 32) {
    float G = 0.f;
    for (int j = 0; j < K; ++j) {
      if (ids[t * K + j] == e) {
        float g = gs[t * K + j];
        if (sigmoid) g *= sel[t * K + j] * (1.f - sel[t * K + j]);
        if (sqrt_softplus_score) g *= sqrt_softplus_grad(sel[t * K + j]);
        G += g;
      }
    }
    float out = G;
    if (!elementwise) {
      const float s = __expf(to_float(x[t * E + e]) - l);
      out = s * (G - d);
    }
    dx[t * E + e] = Conv<T>::from(out);
  }
}

template <typename T, int VPT>
void launch_route(const void* x, int64_t T_, int E, int64_t stride, int top_k, int score_func, int n_group,
                  int topk_group, const float* bias, int norm, float scale, const int64_t* replay, float* w,
                  int32_t* ids, float* sel, float* lse, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  const bool vec = E == 32 * VPT && (stride * sizeof(T)) % 16 == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0;
  const unsigned blocks = static_cast<unsigned>((T_ + kRouteWarps - 1) / kRouteWarps);
  moe_route_kernel<T, VPT><<<blocks, kRouteThreads, 0, stream>>>(
      xp, T_, E, stride, top_k, score_func, n_group, topk_group, bias, norm, scale, replay, vec, w, ids, sel, lse);
}

template <typename T>
cudaError_t route_by_vpt(const void* x, int64_t T_, int E, int64_t stride, int top_k, int score_func, int n_group,
                         int topk_group, const float* bias, int norm, float scale, const int64_t* replay, float* w,
                         int32_t* ids, float* sel, float* lse, cudaStream_t stream) {
  const int per_lane = (E + 31) / 32;
#define R1K_ROUTE(V) launch_route<T, V>(x, T_, E, stride, top_k, score_func, n_group, topk_group, bias, norm, \
                                        scale, replay, w, ids, sel, lse, stream)
  if (per_lane <= 1) R1K_ROUTE(1);
  else if (per_lane <= 2) R1K_ROUTE(2);
  else if (per_lane <= 4) R1K_ROUTE(4);
  else if (per_lane <= 8) R1K_ROUTE(8);
  else R1K_ROUTE(16);
#undef R1K_ROUTE
  return cudaGetLastError();
}

}  // namespace

// Launcher. x: [T, E] rows `stride` elements apart (unit stride within a row); bias: fp32 [E] or
// null; replay: int64 [T, top_k] (validated, in [0, E)) or null. Outputs contiguous.
// Requires 1 <= E <= 512, 1 <= top_k <= min(E, 32), n_group | E, and - when n_group > 1 -
// top_k <= topk_group * E / n_group (the binding checks all of it).
cudaError_t moe_route_cuda_launch(int dtype, const void* x, int64_t T_, int E, int64_t stride, int top_k,
                                  int score_func, int n_group, int topk_group, const float* bias, int norm,
                                  float scale, const int64_t* replay, float* w, int32_t* ids, float* sel,
                                  float* lse, cudaStream_t stream) {
  if (T_ == 0) return cudaSuccess;
  if (E < 1 || E > kMaxKernelExperts || top_k < 1 || top_k > kMaxKernelTopK || top_k > E) return cudaErrorInvalidValue;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      return route_by_vpt<float>(x, T_, E, stride, top_k, score_func, n_group, topk_group, bias, norm, scale,
                                 replay, w, ids, sel, lse, stream);
    case DType::kBFloat16:
      return route_by_vpt<__nv_bfloat16>(x, T_, E, stride, top_k, score_func, n_group, topk_group, bias, norm,
                                         scale, replay, w, ids, sel, lse, stream);
    case DType::kFloat16:
      return route_by_vpt<__half>(x, T_, E, stride, top_k, score_func, n_group, topk_group, bias, norm, scale,
                                  replay, w, ids, sel, lse, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// Launcher. x and dx: contiguous [T, E]; gs, ids, sel: contiguous [T, K]; lse: [T].
cudaError_t moe_route_backward_cuda_launch(int dtype, const float* gs, const int32_t* ids, const float* sel,
                                           const void* x, const float* lse, void* dx, int64_t T_, int E, int K,
                                           int score_func, cudaStream_t stream) {
  if (T_ == 0 || E == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((T_ + kRouteWarps - 1) / kRouteWarps);
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      moe_route_backward_kernel<float><<<blocks, kRouteThreads, 0, stream>>>(
          gs, ids, sel, static_cast<const float*>(x), lse, static_cast<float*>(dx), T_, E, K, score_func);
      break;
    case DType::kBFloat16:
      moe_route_backward_kernel<__nv_bfloat16><<<blocks, kRouteThreads, 0, stream>>>(
          gs, ids, sel, static_cast<const __nv_bfloat16*>(x), lse, static_cast<__nv_bfloat16*>(dx), T_, E, K,
          score_func);
      break;
    case DType::kFloat16:
      moe_route_backward_kernel<__half><<<blocks, kRouteThreads, 0, stream>>>(
          gs, ids, sel, static_cast<const __half*>(x), lse, static_cast<__half*>(dx), T_, E, K, score_func);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace moe
}  // namespace r1k
