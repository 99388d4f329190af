// CPU kernel for decode_attention (r1kernels/ops/decode_attention.py has the rule): one query
// token per row against slots kv_start[b] .. kv_len[b] - 1 of a [B, Hkv, L, D] key/value cache.
// One task per (row, key/value head): the Hq / Hkv query heads that share the head are computed
// in the same task, over the same keys and values (read from memory once, then from L1), nothing
// repeated or copied. Scores, softmax and the weighted sum of values in fp32 (fp64 for fp64
// inputs); slots outside [kv_start[b], kv_len[b]) are not read at all, so a finished row (kv_len
// 0) or a prompt's left padding (kv_start) costs nothing; a row with no slot, or whose slots are
// all masked (-inf), gets zeros.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/check_msg.h"
#include "common/cpu_simd.h"

namespace r1k {
namespace {

// acc[d] += w * v[d]
template <typename acc_t, typename scalar_t>
R1K_INLINE void axpy(acc_t* acc, acc_t w, const scalar_t* v, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<acc_t>(v[d]);
}

// s[i] = <q, k + i * stride> for four slots at once: four independent reductions, which the
// compiler interleaves (one dot at a time leaves each horizontal sum waiting on the last).
template <typename acc_t, typename scalar_t>
R1K_INLINE void dot4(const acc_t* q, const scalar_t* k, int64_t stride, int64_t D, acc_t* s) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  const scalar_t *k0 = k, *k1 = k + stride, *k2 = k + 2 * stride, *k3 = k + 3 * stride;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t d = 0; d < D; ++d) {
    s0 += q[d] * static_cast<acc_t>(k0[d]);
    s1 += q[d] * static_cast<acc_t>(k1[d]);
    s2 += q[d] * static_cast<acc_t>(k2[d]);
    s3 += q[d] * static_cast<acc_t>(k3[d]);
  }
  s[0] = s0; s[1] = s1; s[2] = s2; s[3] = s3;
}

#if defined(R1K_HAS_SIMD_CLONES)
// fp32 scores of 16 slots at a time with GCC's vector types: the products of 16 keys with the
// query, one vector per key, reduced together by a tree of shuffles and adds (sum_lanes16)
// instead of one horizontal sum per key, which took most of the kernel's time; the softmax's
// max, exp and sum on the same vectors (its scalar reductions were the next 12%). Only in the
// AVX-512 clone of attend() (vec16()): there each vector operation is one instruction, while the
// AVX2 clone splits the 16-wide shuffles into many (measured 7.5x slower than its per-slot loops,
// which it keeps).
#define R1K_DECODE_VEC16 1
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16u __attribute__((vector_size(64), aligned(4)));  // for unaligned loads
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

// True where the CPU runs attend()'s x86-64-v4 (AVX-512) clone: the clone dispatcher's own test.
inline bool vec16() {
  static const bool v4 = (__builtin_cpu_init(), __builtin_cpu_supports("x86-64-v4"));
  return v4;
}

R1K_INLINE f32x16 load16(const float* p) { return *reinterpret_cast<const f32x16u*>(p); }

// Lane i of the result: the sum of a[i]'s 16 lanes. Each level adds pairs of half-vectors: after
// it, each vector holds the partial sums of twice as many inputs, half as many per input; the last
// level leaves lane l with a[bit-reversed l], which the final shuffle puts back in order.
R1K_INLINE f32x16 sum_lanes16(const f32x16* a) {
  f32x16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                   20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10,
                                   11, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14,
                                   15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24,
                                   25, 12, 13, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11,
                                   26, 27, 14, 15, 30, 31);
  const f32x16 e = __builtin_shufflevector(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26,
                                           12, 28, 14, 30) +
                   __builtin_shufflevector(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27,
                                           13, 29, 15, 31);
  return __builtin_shufflevector(e, e, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// s[0:16] = <q, key i> + mask[i] for the first `cnt` (1..16) slots from k on, -inf for the rest
// (which are not read); returns them. q: D / 16 vectors.
R1K_INLINE f32x16 scores16(const f32x16* q, const float* k, int64_t stride, int64_t D,
                           const float* mask, int64_t cnt, float* s) {
  f32x16 acc[16];
  for (int i = 0; i < 16; ++i) {
    if (i >= cnt) {
      acc[i] = f32x16{};
      continue;
    }
    const float* kj = k + i * stride;
    f32x16 a = q[0] * load16(kj);
    for (int64_t c = 1; c < D / 16; ++c) a += q[c] * load16(kj + 16 * c);
    acc[i] = a;
  }
  f32x16 r = sum_lanes16(acc);
  if (cnt == 16) {
    if (mask) r += load16(mask);
  } else {  // (the mask's slots past cnt are not read: they may be past the tensor's end)
    float mk[16] = {};
    if (mask)
      for (int64_t i = 0; i < cnt; ++i) mk[i] = mask[i];
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    r = lane < static_cast<int32_t>(cnt) ? r + load16(mk)
                                         : f32x16{} - std::numeric_limits<float>::infinity();
  }
  *reinterpret_cast<f32x16u*>(s) = r;
  return r;
}

// The largest and the sum of x's 16 lanes: four levels of shuffles, not 15 dependent steps.
R1K_INLINE float max_lanes(f32x16 x) {
  f32x16 y = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  x = x > y ? x : y;
  y = __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  x = x > y ? x : y;
  y = __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  x = x > y ? x : y;
  y = __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  x = x > y ? x : y;
  return x[0];
}

R1K_INLINE float sum_lanes(f32x16 x) {
  x += __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return x[0];
}

// out[0:DC] = inv * sum_j w[j] v[j, 0:DC], the slots taken U at a time into U partial sums (one
// chain of dependent adds would wait on each add's latency).
template <int DC>
R1K_INLINE void weighted_sum16(const float* w, const float* v, int64_t stride, int64_t n,
                               float inv, float* out) {
  constexpr int C = DC / 16, U = C <= 4 ? 4 : 2;
  f32x16 a[U][C];
  for (int u = 0; u < U; ++u)
    for (int c = 0; c < C; ++c) a[u][c] = f32x16{};
  int64_t j = 0;
  for (; j + U <= n; j += U)
    for (int u = 0; u < U; ++u)
      for (int c = 0; c < C; ++c) a[u][c] += w[j + u] * load16(v + (j + u) * stride + 16 * c);
  for (; j < n; ++j)
    for (int c = 0; c < C; ++c) a[0][c] += w[j] * load16(v + j * stride + 16 * c);
  for (int c = 0; c < C; ++c) {
    f32x16 r = a[0][c];
    for (int u = 1; u < U; ++u) r += a[u][c];
    *reinterpret_cast<f32x16u*>(out + 16 * c) = r * inv;
  }
}
#endif

template <typename acc_t, typename scalar_t>
R1K_INLINE acc_t dot(const acc_t* q, const scalar_t* k, int64_t D) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += q[d] * static_cast<acc_t>(k[d]);
  return s;
}

template <typename acc_t>
R1K_INLINE acc_t exp_acc(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) return exp_simd(x);
  else return std::exp(x);
}

// One (row, key/value head): G query heads of D against n slots. DC: D known at compile time
// (the common head sizes; loops unroll, the weighted sum stays in registers), 0: any D.
template <int DC, typename scalar_t, typename acc_t>
R1K_INLINE void attend_impl(const scalar_t* q, int64_t q_head_stride, const scalar_t* k,
                            const scalar_t* v, int64_t k_slot_stride, int64_t v_slot_stride,
                            const acc_t* mask, int64_t n, int64_t G, int64_t D_rt, acc_t scale,
                            scalar_t* out, int64_t out_head_stride, acc_t* buf) {
  const int64_t D = DC ? DC : D_rt;
  acc_t* qs = buf;       // [D] one head's scaled query, then its weighted sum
  acc_t* s = qs + D;     // [n] its scores, then weights
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t g = 0; g < G; ++g) {
    const scalar_t* qg = q + g * q_head_stride;
    for (int64_t d = 0; d < D; ++d) qs[d] = static_cast<acc_t>(qg[d]) * scale;
    int64_t j = 0;
    acc_t m = kNegInf;
    bool vec = false;  // scores and weights 16 slots at a time (the AVX-512 clone, fp32)
#if defined(R1K_DECODE_VEC16)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (D % 16 == 0 && D <= 256 && vec16()) {
        vec = true;
        f32x16 qv[16];
        for (int64_t c = 0; c < D / 16; ++c) qv[c] = load16(qs + 16 * c);
        f32x16 mv = f32x16{} + kNegInf;
        for (; j < n; j += 16) {
          const f32x16 r = scores16(qv, k + j * k_slot_stride, k_slot_stride, D,
                                    mask ? mask + j : nullptr, std::min<int64_t>(n - j, 16), s + j);
          mv = r > mv ? r : mv;
        }
        m = max_lanes(mv);
      }
    }
#endif
    if (!vec) {
      for (; j + 4 <= n; j += 4) dot4(qs, k + j * k_slot_stride, k_slot_stride, D, s + j);
      for (; j < n; ++j) s[j] = dot(qs, k + j * k_slot_stride, D);
      for (j = 0; j < n; ++j) {
        if (mask) s[j] += mask[j];
        m = s[j] > m ? s[j] : m;
      }
    }
    scalar_t* og = out + g * out_head_stride;
    if (!(m > kNegInf)) {  // no slot, or every slot masked: zeros, never NaN
      for (int64_t d = 0; d < D; ++d) og[d] = scalar_t(0);
      continue;
    }
    // exp over a multiple of 16 slots (the ones past n at -inf, so e = 0; scores16 wrote them):
    // the vectorized loop has no scalar remainder, which took as long as the rest of it
    const int64_t n16 = (n + 15) / 16 * 16;
    acc_t sum = 0;
#if defined(R1K_DECODE_VEC16)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (vec) {  // the sum as a vector, reduced once
        f32x16 sv = f32x16{};
        for (j = 0; j < n16; j += 16) {
          const f32x16 e = exp_poly<f32x16, i32x16, u32x16>(load16(s + j) - m);
          *reinterpret_cast<f32x16u*>(s + j) = e;
          sv += e;
        }
        sum = sum_lanes(sv);
      }
    }
#endif
    if (!vec) {
      for (j = n; j < n16; ++j) s[j] = kNegInf;
#pragma omp simd reduction(+ : sum)
      for (j = 0; j < n16; ++j) {
        const acc_t e = exp_acc(s[j] - m);
        s[j] = e;
        sum += e;
      }
    }
    const acc_t inv = acc_t(1) / sum;
#if defined(R1K_DECODE_VEC16)
    if constexpr (DC > 0 && DC % 16 == 0 && std::is_same_v<scalar_t, float>) {
      if (vec) {
        weighted_sum16<DC>(s, v, v_slot_stride, n, inv, og);
        continue;
      }
    }
#endif
    if constexpr (DC > 0) {
      acc_t a[DC];
#pragma omp simd
      for (int64_t d = 0; d < DC; ++d) a[d] = 0;
      for (j = 0; j < n; ++j) {
        const scalar_t* vj = v + j * v_slot_stride;
        const acc_t w = s[j];
#pragma omp simd
        for (int64_t d = 0; d < DC; ++d) a[d] += w * static_cast<acc_t>(vj[d]);
      }
      for (int64_t d = 0; d < DC; ++d) og[d] = static_cast<scalar_t>(a[d] * inv);
    } else {
      for (int64_t d = 0; d < D; ++d) qs[d] = 0;
      for (j = 0; j < n; ++j) axpy(qs, s[j], v + j * v_slot_stride, D);
      for (int64_t d = 0; d < D; ++d) og[d] = static_cast<scalar_t>(qs[d] * inv);
    }
  }
}

template <typename scalar_t, typename acc_t>
R1K_SIMD_CLONES void attend(const scalar_t* q, int64_t q_head_stride, const scalar_t* k,
                            const scalar_t* v, int64_t k_slot_stride, int64_t v_slot_stride,
                            const acc_t* mask, int64_t n, int64_t G, int64_t D, acc_t scale,
                            scalar_t* out, int64_t out_head_stride, acc_t* buf) {
#define R1K_ATTEND(DC) attend_impl<DC>(q, q_head_stride, k, v, k_slot_stride, v_slot_stride, mask, \
                                       n, G, D, scale, out, out_head_stride, buf)
  switch (D) {
    case 32: R1K_ATTEND(32); break;
    case 64: R1K_ATTEND(64); break;
    case 128: R1K_ATTEND(128); break;
    default: R1K_ATTEND(0);
  }
#undef R1K_ATTEND
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& kv_len, const c10::optional<at::Tensor>& mask,
                                double scale, const c10::optional<at::Tensor>& kv_start) {
  TORCH_CHECK_VALUE(q.dim() == 3, "decode_attention: q must be [B, Hq, D], got shape ", r1k::msg(q.sizes()));
  TORCH_CHECK_VALUE(k.dim() == 4 && v.dim() == 4,
                    "decode_attention: k and v must be [B, Hkv, L, D], got shapes ", r1k::msg(k.sizes()),
                    " and ", r1k::msg(v.sizes()));
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D && v.sizes() == k.sizes(),
                    "decode_attention: k and v must be [B, Hkv, L, D] = [", r1k::msg(B), ", Hkv, L, ",
                    r1k::msg(D), "], got ", r1k::msg(k.sizes()), " and ", r1k::msg(v.sizes()));
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0,
                    "decode_attention: q's heads (", r1k::msg(Hq), ") must be a multiple of k's (",
                    r1k::msg(Hkv), ")");
  TORCH_CHECK_VALUE(at::isFloatingType(q.scalar_type()) && k.scalar_type() == q.scalar_type() &&
                        v.scalar_type() == q.scalar_type(),
                    "decode_attention: q, k, v must share one floating dtype, got ", r1k::msg(q.scalar_type()),
                    ", ", r1k::msg(k.scalar_type()), ", ", r1k::msg(v.scalar_type()));
  TORCH_CHECK_VALUE(kv_len.dim() == 1 && kv_len.size(0) == B && kv_len.scalar_type() == at::kLong,
                    "decode_attention: kv_len must be int64 [", r1k::msg(B), "], got ",
                    r1k::msg(kv_len.scalar_type()), " ", r1k::msg(kv_len.sizes()));
  const at::Tensor lens = kv_len.contiguous();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_INDEX(lp[b] >= 0 && lp[b] <= L, "decode_attention: kv_len[", r1k::msg(b), "] = ",
                      r1k::msg(lp[b]), " is outside [0, ", r1k::msg(L), "]");
  at::Tensor starts;
  const int64_t* sp = nullptr;
  if (kv_start.has_value()) {
    TORCH_CHECK_VALUE(kv_start->dim() == 1 && kv_start->size(0) == B &&
                          kv_start->scalar_type() == at::kLong,
                      "decode_attention: kv_start must be int64 [", r1k::msg(B), "], got ",
                      r1k::msg(kv_start->scalar_type()), " ", r1k::msg(kv_start->sizes()));
    starts = kv_start->contiguous();
    sp = starts.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK_INDEX(sp[b] >= 0 && sp[b] <= L, "decode_attention: kv_start[", r1k::msg(b),
                        "] = ", r1k::msg(sp[b]), " is outside [0, ", r1k::msg(L), "]");
  }
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == L &&
                          at::isFloatingType(mask->scalar_type()),
                      "decode_attention: mask must be a floating [B, L] = [", r1k::msg(B), ", ", r1k::msg(L),
                      "] additive mask, got ", r1k::msg(mask->scalar_type()), " ", r1k::msg(mask->sizes()));
    m = mask->to(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  }
  const at::Tensor qc = q.stride(2) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  const int64_t G = Hq / Hkv;
  if (B == 0 || Hq == 0 || D == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = kc.data_ptr<scalar_t>();
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    const acc_t* mp = m.defined() ? m.data_ptr<acc_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(static_cast<size_t>(D + L + 16));  // (scores padded to 16)
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Hkv, h = task % Hkv;
        const int64_t s0 = sp ? sp[b] : 0;  // slots s0 .. kv_len[b] - 1 (none if kv_len <= s0)
        attend<scalar_t, acc_t>(qp + b * qc.stride(0) + h * G * qc.stride(1), qc.stride(1),
                                kp + b * kc.stride(0) + h * kc.stride(1) + s0 * kc.stride(2),
                                vp + b * vc.stride(0) + h * vc.stride(1) + s0 * vc.stride(2),
                                kc.stride(2), vc.stride(2), mp ? mp + b * L + s0 : nullptr,
                                std::max<int64_t>(lp[b] - s0, 0), G, D,
                                static_cast<acc_t>(scale), op + (b * Hq + h * G) * D, D,
                                buf.data());
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace r1k
