// The per-thread arithmetic of the fused log-prob cluster kernel (fused_logits_cluster.cu): what
// one thread computes on the 16-byte vectors of a row it holds, in base 2. Everything here is
// __host__ __device__, so tests/csrc/fused_logits_math_test.cu checks these very functions on the
// CPU against float64 (the kernel itself needs an sm_90 GPU): unpacking, the logits' range, the
// sums of the statistics with and without the -inf clamp, the gradient, and the rescaling that
// merges statistics.
//
// Base 2: z = x * c2 with c2 = inv_temp * log2(e), so exp(x * inv_temp - m) = 2^(z - m2): one FFMA
// and one ex2 per logit. Natural units come back once per row (fused_logits_cluster.cu,
// finish_row).
//
// A soft-capped head (kCap; r1kernels/ops/token_logprobs.py head_constants, cap > 0): each raw
// logit x first becomes tanh(cap * x) (head_tanh), then the same arithmetic; the gradient of x is
// that of z times cap * sech^2(cap * x). The plain head's instances (kCap = false) are unchanged.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <cmath>
#include <cstring>
#include <type_traits>

namespace r1k {

// (max, sum-exp, entropy sum) of a set of scaled logits z, in base 2: m = max z,
// s = sum 2^(z - m), w = sum 2^(z - m) (z - m); the empty set is (-inf, 0, 0).
struct Stats {
  float m, s, w;
};

__host__ __device__ __forceinline__ Stats empty_stats() { return Stats{-INFINITY, 0.f, 0.f}; }

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ __forceinline__ float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

__host__ __device__ __forceinline__ float fast_exp2(float x) {
#ifdef __CUDA_ARCH__
  return exp2f(x);  // ex2.approx.ftz under --use_fast_math: one MUFU.EX2
#else
  return std::exp2(x);
#endif
}

// tanh y of a soft-capped head, and with `sech2` also sech^2 y = 1 - tanh^2 y, from one
// e = exp(-2|y|): tanh = (1 - e) / (1 + e), sech^2 = 4e / (1 + e)^2 (no cancellation in sech^2 where
// tanh saturates); |y| < 0.25, where 1 - e cancels: tanh's series to y^9 (next term < 1e-8
// relative). +-inf give (+-1, 0), NaN gives NaN. The same arithmetic as the Triton kernels'
// _tanh_sech2.
__host__ __device__ __forceinline__ float head_tanh(float y, float* sech2 = nullptr) {
  const float a = fabsf(y);
  const float e = fast_exp2(-2.f * kLog2e * a);
  const float y2 = y * y;
  const float series =
      y * (1.f + y2 * (-1.f / 3.f + y2 * (2.f / 15.f + y2 * (-17.f / 315.f + y2 * (62.f / 2835.f)))));
  if (sech2 != nullptr) *sech2 = 4.f * e / ((1.f + e) * (1.f + e));
  return a < 0.25f ? series : copysignf((1.f - e) / (1.f + e), y);
}

// v's statistics moved to the reference max m >= v.m (m: the max over a set v belongs to): s and
// w scale by 2^(v.m - m), and w, relative to v's own max, gains (v.m - m) per unit of s. Merging
// statistics is moving each to the common max and adding their s and w.
__host__ __device__ __forceinline__ Stats rescale(const Stats& v, float m) {
  const float ref = m == -INFINITY ? 0.f : m;  // all empty: any finite reference
  const float f = fast_exp2(v.m - ref);
  Stats r;
  r.m = m;
  r.s = v.s * f;
  r.w = v.s > 0.f ? f * (v.w + v.s * (v.m - ref)) : 0.f;
  return r;
}

// The logits come in 16-byte vectors of kPerVec<TIn> elements (8 bf16/fp16, 4 fp32: the
// hidden-state op's fp32 chunks).
template <typename T> constexpr int kPerVec = 16 / static_cast<int>(sizeof(T));

__host__ __device__ __forceinline__ float to_float(float v) { return v; }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// A vector's elements as floats. bf16 is the top half of an fp32, so a pair unpacks with one
// shift (the low element) and one AND (the high one): two integer instructions per pair, where
// __bfloat1622float2 takes three.
template <typename TIn>
__host__ __device__ __forceinline__ void unpack(const uint4& u, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  if constexpr (sizeof(TIn) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = bits_to_float(w[i]);
  } else if constexpr (std::is_same_v<TIn, __nv_bfloat16>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = bits_to_float(w[i] << 16);
      f[2 * i + 1] = bits_to_float(w[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      std::memcpy(&h, &w[i], sizeof(h));
      const float2 q = __half22float2(h);
      f[2 * i] = q.x;
      f[2 * i + 1] = q.y;
    }
  }
}

// (smallest, largest) raw logit of a thread's first nvec vectors; the smallest only when kMin
// (+inf otherwise), for the clamp test below. 16-bit pairs are compared packed (the compiler
// makes one three-input VHMNMX per two pairs), fp32 one by one. A NaN logit is skipped here (max
// and min return the other operand) and makes its row's statistics NaN in the sums.
template <typename TIn, int VPT, bool kMin>
__host__ __device__ __forceinline__ float2 logit_range(const uint4 (&data)[VPT], int nvec) {
  if constexpr (sizeof(TIn) == 2) {
    using T2 = std::conditional_t<std::is_same_v<TIn, __nv_bfloat16>, __nv_bfloat162, __half2>;
    T2 hi, lo;
    if constexpr (std::is_same_v<TIn, __nv_bfloat16>) {
      hi = __float2bfloat162_rn(-INFINITY);
      lo = __float2bfloat162_rn(INFINITY);
    } else {
      hi = __float2half2_rn(-INFINITY);
      lo = __float2half2_rn(INFINITY);
    }
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      if (k < nvec) {
        const uint32_t w[4] = {data[k].x, data[k].y, data[k].z, data[k].w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          T2 v;
          std::memcpy(&v, &w[i], sizeof(v));
          hi = __hmax2(hi, v);
          if (kMin) lo = __hmin2(lo, v);
        }
      }
    }
    return make_float2(kMin ? fminf(__low2float(lo), __high2float(lo)) : INFINITY,
                       fmaxf(__low2float(hi), __high2float(hi)));
  } else {
    float hi = -INFINITY, lo = INFINITY;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      if (k < nvec) {
        float f[4];
        unpack<TIn>(data[k], f);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          hi = fmaxf(hi, f[i]);
          if (kMin) lo = fminf(lo, f[i]);
        }
      }
    }
    return make_float2(lo, hi);
  }
}

// The clamp of z - ref (and of l2 = z - lse2 in the gradient) at -1e20: a -inf there (a -inf
// logit, a masked vocabulary entry, or fp32 overflow of x * c2) would make 0 * -inf = NaN in w
// (and in the gradient's 2^l2 (A + B l2)), and so would a finite l2 whose B l2 overflows. The
// clamp is a no-op on values >= -1e20, and FFMA is monotone in x (c2 > 0): a thread whose smallest
// logit gives fmaf(x_min, c2, -ref) >= -1e20 computes the same bits without it, so only the other
// threads (rare) clamp. NaN: clamped (the comparison fails), and clamp_low keeps it NaN.
__host__ __device__ __forceinline__ bool needs_clamp(float x_min, float c2, float ref) {
  return !(fmaf(x_min, c2, -ref) >= -1e20f);
}
__host__ __device__ __forceinline__ float clamp_low(float d) { return d < -1e20f ? -1e20f : d; }

// One vector's contribution to the thread's sums: s += 2^(z - ref), and with kW
// w += 2^(z - ref) (z - ref), z = x * c2 (kCap: z = tanh(cap * x) * c2). kClamp: needs_clamp said
// so.
template <typename TIn, bool kW, bool kClamp, bool kCap = false>
__host__ __device__ __forceinline__ void vec_sums(const uint4& u, float c2, float ref, float& s,
                                                  float& w, float cap = 0.f) {
  constexpr int kE = kPerVec<TIn>;
  float f[kE];
  unpack<TIn>(u, f);
#pragma unroll
  for (int i = 0; i < kE; ++i) {
    if (kCap) f[i] = head_tanh(f[i] * cap);
    float d = fmaf(f[i], c2, -ref);
    if (kClamp) d = clamp_low(d);
    const float e = fast_exp2(d);
    s += e;
    if (kW) w = fmaf(e, d, w);
  }
}

template <typename TIn, int VPT, bool kW, bool kClamp, bool kCap = false>
__host__ __device__ __forceinline__ void thread_sums(const uint4 (&data)[VPT], int nvec, float c2,
                                                     float ref, float& s, float& w,
                                                     float cap = 0.f) {
#pragma unroll
  for (int k = 0; k < VPT; ++k)
    if (k < nvec) vec_sums<TIn, kW, kClamp, kCap>(data[k], c2, ref, s, w, cap);
}

// A thread's max scaled logit m2 from its raw logits' range (logit_range): the raw max times c2
// (c2 > 0), or with kCap tanh(cap * max) * c2 (cap > 0: tanh increases; -inf for a thread without
// vectors, whose raw max -inf would give -c2 instead). The clamp tests take the smallest scaled
// logit the same way (head_range).
template <bool kCap>
__host__ __device__ __forceinline__ float2 head_range(float2 range, bool any, float cap) {
  if (!kCap) return range;
  return any ? make_float2(head_tanh(range.x * cap), head_tanh(range.y * cap))
             : make_float2(INFINITY, -INFINITY);
}

// dL/dlogits of kE raw logits f, in place: with l2 = z - lse2 = log2 p, the gradient is
// 2^l2 (A + B l2) (kDent: a dL/dentropy; else B = 0 and 2^l2 A), plus dl at index `at` (the
// label; at >= kE: not in this vector). kClamp: needs_clamp(x_min, c2, lse2) (kDent only: without
// it, 2^l2 A is 0 for any l2 of -inf). kCap: z = tanh(cap * x) * c2, and the whole times
// cap * sech^2(cap * x).
template <int kE, bool kDent, bool kClamp, bool kCap = false>
__host__ __device__ __forceinline__ void grad_vec(float* f, float c2, float lse2, float A, float B,
                                                  float dl, unsigned at, float cap = 0.f) {
  float dh[kE];
#pragma unroll
  for (int i = 0; i < kE; ++i) {
    if (kCap) {
      f[i] = head_tanh(f[i] * cap, &dh[i]);
      dh[i] *= cap;
    }
    if (kDent) {
      float l2 = fmaf(f[i], c2, -lse2);
      if (kClamp) l2 = clamp_low(l2);
      f[i] = fast_exp2(l2) * fmaf(B, l2, A);
    } else {
      f[i] = fast_exp2(fmaf(f[i], c2, -lse2)) * A;
    }
  }
  if (at < static_cast<unsigned>(kE)) {  // the label's vector (one thread, one vector)
#pragma unroll
    for (int i = 0; i < kE; ++i)
      if (i == static_cast<int>(at)) f[i] += dl;
  }
  if (kCap) {
#pragma unroll
    for (int i = 0; i < kE; ++i) f[i] *= dh[i];
  }
}

}  // namespace r1k
