// CPU kernel for sample_tokens (r1kernels/ops/sample_tokens.py has the rule). One row per task:
// z = logits / temperature in fp32 and its max (SIMD), e = exp(z - max) once per element (SIMD,
// exp_simd), lse from sum(e) in fp64. The filters zero e outside the kept set: top_k and top_p
// keep a prefix of the order (z descending, id ascending), found by bisecting for its boundary
// value over z's float bits (one SIMD count or masked sum per step, at most 32), ties at the
// boundary taken in id order; min_p is a compare. Nothing is sorted. The token is the inverse CDF
// in id order of the kept mass at the row's uniform: whole blocks are skipped by their SIMD sums,
// the last one is walked.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/check_msg.h"
#include "common/cpu_simd.h"

namespace r1k {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kMaxFinite = std::numeric_limits<float>::max();
constexpr int64_t kBlock = 256;  // CDF walk: elements per SIMD block sum

// z[i] /= temp; NaN and +-inf (before or after the division) become -inf. Returns the max of the
// finite values (-inf if none) and their count.
R1K_SIMD_CLONES float scale_max(float* z, int64_t V, float temp, int64_t* n_finite) {
  float m = -kInf;
  int64_t n = 0;
#pragma omp simd reduction(max : m) reduction(+ : n)
  for (int64_t i = 0; i < V; ++i) {
    const float v = z[i] / temp;
    const bool ok = std::fabs(v) <= kMaxFinite;  // false for NaN and inf
    const float w = ok ? v : -kInf;
    z[i] = w;
    n += ok;
    m = w > m ? w : m;
  }
  *n_finite = n;
  return m;
}

// e[i] = exp(z[i] - m) (0 for -inf); returns sum(e) in fp64
R1K_SIMD_CLONES double exp_sum(const float* z, float* e, int64_t V, float m) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < V; ++i) {
    const float v = exp_simd(z[i] - m);
    e[i] = v;
    s += v;
  }
  return s;
}

R1K_SIMD_CLONES double sum_f64(const float* e, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += e[i];
  return s;
}

// Floats as int32 keys in the same order (-inf < ... < -0 < 0 < ... < inf).
inline int32_t order_key(float f) {
  const int32_t b = __builtin_bit_cast(int32_t, f);
  return b >= 0 ? b : b ^ 0x7fffffff;
}
inline float key_float(int32_t k) { return __builtin_bit_cast(float, k >= 0 ? k : k ^ 0x7fffffff); }

// sum of w[i] (or the count, w = nullptr) over z[i] >= t
R1K_SIMD_CLONES double mass_at_least(const float* z, const float* w, int64_t V, float t) {
  double s = 0.0;
  if (w == nullptr) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < V; ++i) s += z[i] >= t ? 1.0 : 0.0;
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < V; ++i) s += z[i] >= t ? static_cast<double>(w[i]) : 0.0;
  }
  return s;
}

// Keeps the shortest prefix of the order (z descending, id ascending) whose sum of w (the count
// when w = nullptr) reaches `goal`, by zeroing e outside it: the boundary value t (the largest z
// with sum over z >= t still >= goal) by bisection over the keys of z's in [lo, m], then the
// values above t and, in id order, as many of those equal to t as the goal needs. No sort.
void keep_prefix(const float* z, float* e, const float* w, int64_t V, float lo, float m,
                 double goal) {
  int64_t lo_k = order_key(lo), hi_k = int64_t{order_key(m)} + 1;  // sum(lo) >= goal > sum(> m)
  while (hi_k - lo_k > 1) {
    const int64_t mid = lo_k + (hi_k - lo_k) / 2;
    if (mass_at_least(z, w, V, key_float(static_cast<int32_t>(mid))) >= goal) lo_k = mid; else hi_k = mid;
  }
  const float t = key_float(static_cast<int32_t>(lo_k));  // a value of z: sum(t) >= goal > sum(next key)
  double cum = 0.0;
  for (int64_t i = 0; i < V; ++i)
    if (z[i] > t) cum += w == nullptr ? 1.0 : w[i];
  for (int64_t i = 0; i < V; ++i) {
    if (z[i] < t) {
      e[i] = 0.f;
    } else if (z[i] == t) {  // ties in id order, while the prefix is short of the goal
      if (cum >= goal) e[i] = 0.f; else cum += w == nullptr ? 1.0 : w[i];
    }
  }
}

R1K_SIMD_CLONES void mask_below(float* e, int64_t V, float min_e) {
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) e[i] = e[i] >= min_e ? e[i] : 0.f;
}

// The first id whose running fp64 sum of e exceeds `target`; -1 if rounding leaves none.
int64_t inverse_cdf(const float* e, int64_t V, double target) {
  double cum = 0.0;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    const double bs = sum_f64(e + b, n);
    if (cum + bs <= target) {
      cum += bs;
      continue;
    }
    for (int64_t i = b; i < b + n; ++i) {
      cum += e[i];
      if (cum > target) return i;
    }
  }
  return -1;
}

template <typename scalar_t>
void sample_row(const scalar_t* x, int64_t V, float temp, float u, int64_t top_k, double top_p,
                double min_p, bool greedy, std::vector<float>& z, std::vector<float>& e,
                int64_t* tok_out, float* logp_out) {
  for (int64_t i = 0; i < V; ++i) z[i] = static_cast<float>(x[i]);
  int64_t n = 0;
  const float m = scale_max(z.data(), V, temp, &n);
  if (n == 0) {
    *tok_out = 0;
    *logp_out = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  int64_t arg = 0;
  while (z[arg] != m) ++arg;  // the first maximum
  const double s = exp_sum(z.data(), e.data(), V, m);
  const float lse = m + static_cast<float>(std::log(s));
  int64_t tok = arg;
  if (!greedy) {
    const bool filter_k = top_k > 0 && top_k < n, filter_p = top_p < 1.0, filter_m = min_p > 0.0;
    double mass = s;
    if (filter_k || filter_p || filter_m) {
      float lo = m;  // the smallest finite z
      for (int64_t i = 0; i < V; ++i) lo = z[i] > -kInf && z[i] < lo ? z[i] : lo;
      if (filter_k) keep_prefix(z.data(), e.data(), nullptr, V, lo, m, static_cast<double>(top_k));
      if (filter_p) {  // of the mass that top_k kept; e outside it is already 0
        mass = filter_k ? sum_f64(e.data(), V) : s;
        keep_prefix(z.data(), e.data(), e.data(), V, lo, m, top_p * mass);
      }
      if (filter_m) mask_below(e.data(), V, static_cast<float>(min_p));
      mass = sum_f64(e.data(), V);
    }
    tok = inverse_cdf(e.data(), V, static_cast<double>(u) * mass);
    if (tok < 0) {  // u * mass rounded past the end: the last token with mass
      tok = V - 1;
      while (tok > 0 && !(e[tok] > 0.f)) --tok;
    }
  }
  *tok_out = tok;
  *logp_out = z[tok] - lse;
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cpu(const at::Tensor& logits,
                                                     const at::Tensor& uniforms, double temperature,
                                                     int64_t top_k, double top_p, double min_p) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1,
                    "sample_tokens: logits must be [B, V] with V >= 1, got shape ",
                    r1k::msg(logits.sizes()));
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()),
                    "sample_tokens: logits must be floating point, got ", r1k::msg(logits.scalar_type()));
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(uniforms.dim() == 1 && uniforms.size(0) == B && uniforms.scalar_type() == at::kFloat,
                    "sample_tokens: uniforms must be float32 [", r1k::msg(B), "], got ",
                    r1k::msg(uniforms.scalar_type()), " ", r1k::msg(uniforms.sizes()));
  TORCH_CHECK_VALUE(temperature >= 0 && std::isfinite(temperature),
                    "sample_tokens: temperature must be a finite number >= 0, got ", r1k::msg(temperature));
  TORCH_CHECK_VALUE(top_k >= 0, "sample_tokens: top_k must be >= 0, got ", r1k::msg(top_k));
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "sample_tokens: top_p must be in (0, 1], got ", r1k::msg(top_p));
  TORCH_CHECK_VALUE(min_p >= 0 && min_p <= 1, "sample_tokens: min_p must be in [0, 1], got ", r1k::msg(min_p));
  const at::Tensor x = logits.contiguous();
  const at::Tensor u = uniforms.contiguous();
  at::Tensor tok = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logp = at::empty({B}, logits.options().dtype(at::kFloat));
  const bool greedy = temperature == 0;
  const float temp = greedy ? 1.0f : static_cast<float>(temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sample_tokens_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const float* up = u.data_ptr<float>();
    int64_t* tp = tok.data_ptr<int64_t>();
    float* lp = logp.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> z(V), e(V);
      for (int64_t b = begin; b < end; ++b)
        sample_row(xp + b * V, V, temp, up[b], top_k, top_p, min_p, greedy, z, e, tp + b, lp + b);
    });
  });
  return {tok, logp};
}

// The settings read from a tensor at run time (a compiled decode step takes them as an input,
// not as constants: one graph serves greedy and sampled rollouts of any settings).
std::tuple<at::Tensor, at::Tensor> sample_tokens_params_cpu(const at::Tensor& logits,
                                                            const at::Tensor& uniforms,
                                                            const at::Tensor& params) {
  TORCH_CHECK_VALUE(params.dim() == 1 && params.size(0) == 4 &&
                        params.scalar_type() == at::kDouble && params.device().is_cpu(),
                    "sample_tokens_params: params must be float64 [4] on the CPU (temperature, "
                    "top_k, top_p, min_p), got ", r1k::msg(params.scalar_type()), " ",
                    r1k::msg(params.sizes()), " on ", params.device().str());
  const at::Tensor pc = params.contiguous();
  const double* p = pc.data_ptr<double>();
  TORCH_CHECK_VALUE(p[1] >= 0 && p[1] <= 9.0e15 && p[1] == std::floor(p[1]),
                    "sample_tokens_params: top_k (params[1]) must be a whole number >= 0, got ",
                    r1k::msg(p[1]));
  return sample_tokens_cpu(logits, uniforms, p[0], static_cast<int64_t>(p[1]), p[2], p[3]);
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CPU, m) {
  m.impl("sample_tokens", &sample_tokens_cpu);
  m.impl("sample_tokens_params", &sample_tokens_params_cpu);
}

}  // namespace r1k
