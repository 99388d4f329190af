// Host test of the cluster kernel's per-thread arithmetic (csrc/token_logprobs/fused_logits_math.cuh),
// the very functions the kernel calls, compiled here for the CPU (the kernel needs an sm_90 GPU).
// Built and run by tests/test_fused_logits_cluster.py::test_thread_math_on_host; prints one line
// per failed check and exits non-zero on any.
//
// Checked against float64 and against each other: unpacking (every bf16 bit pattern), the logits'
// range with partial vectors, -inf and NaN, the statistics' sums with and without the -inf clamp
// (bit-identical wherever needs_clamp says the clamp is not needed, and finite where it is), the
// gradient (the same for its two forms, and against float64), the merge of statistics by
// rescaling (parts merged = the whole), and the soft-capped head (kCap: head_tanh's tanh and
// sech^2 against float64 over the whole fp32 range, the sums and the gradient of tanh(cap * x)).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "token_logprobs/fused_logits_math.cuh"

using namespace r1k;

static int failures = 0, checks = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    ++checks;                                              \
    if (!(cond)) {                                         \
      if (++failures <= 30) {                              \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);   \
        std::printf(__VA_ARGS__);                          \
        std::printf("\n");                                 \
      }                                                    \
    }                                                      \
  } while (0)

static uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static bool same_bits(float a, float b) { return f2u(a) == f2u(b) || (a != a && b != b); }

template <typename T>
static uint16_t to_bits16(float v) {
  T h = std::is_same_v<T, __nv_bfloat16> ? T(__float2bfloat16_rn(v)) : T(__float2half_rn(v));
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

// VPT vectors of TIn holding xs (16-bit: rounded; the rounded values are written back to xs)
template <typename TIn, int VPT>
static void pack(std::vector<float>& xs, uint4 (&data)[VPT]) {
  constexpr int kE = kPerVec<TIn>;
  std::vector<uint32_t> words(VPT * 4, 0);
  for (size_t j = 0; j < xs.size(); ++j) {
    if constexpr (sizeof(TIn) == 4) {
      words[j] = f2u(xs[j]);
    } else {
      const uint16_t b = to_bits16<TIn>(xs[j]);
      words[j / 2] |= static_cast<uint32_t>(b) << (16 * (j % 2));
      TIn h;
      std::memcpy(&h, &b, 2);
      xs[j] = to_float(h);
    }
  }
  (void)kE;
  for (int k = 0; k < VPT; ++k)
    data[k] = make_uint4(words[4 * k], words[4 * k + 1], words[4 * k + 2], words[4 * k + 3]);
}

static void test_unpack_bf16_every_pattern() {
  for (uint32_t lo = 0; lo < 65536; lo += 1) {
    const uint32_t hi = (lo * 40503u) & 0xffffu;  // a scrambled partner pattern
    const uint32_t w = lo | (hi << 16);
    const uint4 u = make_uint4(w, w, w, w);
    float f[8];
    unpack<__nv_bfloat16>(u, f);
    __nv_bfloat16 a, b;
    const uint16_t la = static_cast<uint16_t>(lo), hb = static_cast<uint16_t>(hi);
    std::memcpy(&a, &la, 2);
    std::memcpy(&b, &hb, 2);
    CHECK(same_bits(f[0], __bfloat162float(a)) && same_bits(f[1], __bfloat162float(b)),
          "unpack bf16 word %08x", w);
  }
}

// s, w of the logits xs (already in TIn precision) in float64, relative to the max z
static void ref_sums(const std::vector<float>& xs, float c2, double& m, double& s, double& w) {
  m = -INFINITY;
  for (float x : xs) m = std::max(m, static_cast<double>(x) * c2);
  s = w = 0;
  for (float x : xs) {
    const double d = static_cast<double>(x) * c2 - m;
    if (d == -INFINITY) continue;
    s += std::exp2(d);
    w += std::exp2(d) * d;
  }
}

template <typename TIn, int VPT>
static void test_sums_and_grad(std::mt19937& gen, int nvec, float scale, float inv_temp,
                               int n_neg_inf, bool with_nan) {
  constexpr int kE = kPerVec<TIn>;
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<float> xs(nvec * kE);
  for (float& x : xs) x = nd(gen);
  for (int i = 0; i < n_neg_inf && i < static_cast<int>(xs.size()); ++i)
    xs[(i * 7) % xs.size()] = -INFINITY;
  if (with_nan && !xs.empty()) xs[xs.size() / 2] = NAN;
  uint4 data[VPT];
  pack<TIn, VPT>(xs, data);
  const float c2 = inv_temp * kLog2e;

  // the range, against a scan of the values (NaN skipped, as max/min do)
  const float2 r = logit_range<TIn, VPT, true>(data, nvec);
  float lo = INFINITY, hi = -INFINITY;
  for (float x : xs)
    if (x == x) lo = std::min(lo, x), hi = std::max(hi, x);
  CHECK(same_bits(r.x, lo) && same_bits(r.y, hi), "range (%g, %g) != (%g, %g)", r.x, r.y, lo, hi);
  CHECK(same_bits(logit_range<TIn, VPT, false>(data, nvec).y, hi), "range without the min");

  const float m2 = r.y * c2;
  const float ref = m2 == -INFINITY ? 0.f : m2;
  float s0 = 0, w0 = 0, s1 = 0, w1 = 0, s2 = 0, w2 = 0;
  thread_sums<TIn, VPT, true, true>(data, nvec, c2, ref, s0, w0);   // clamped
  thread_sums<TIn, VPT, true, false>(data, nvec, c2, ref, s1, w1);  // not clamped
  thread_sums<TIn, VPT, false, false>(data, nvec, c2, ref, s2, w2);
  const bool clamp = needs_clamp(r.x, c2, ref);
  bool any_inf = false, any_nan = false;
  for (float x : xs) any_inf |= x == -INFINITY, any_nan |= x != x;
  CHECK(clamp == (any_inf || (nvec > 0 && static_cast<double>(r.x) * c2 - ref < -1e20)),
        "needs_clamp %d with %d -inf logits", clamp, n_neg_inf);
  if (!clamp) CHECK(same_bits(s0, s1) && same_bits(w0, w1), "the clamp changed bits it may not");
  CHECK(same_bits(s0, s2) && w2 == 0.f, "s without w");
  double dm, ds, dw;
  ref_sums(xs, c2, dm, ds, dw);
  if (any_nan) {
    CHECK(s0 != s0 && s1 != s1, "a NaN logit must make the sums NaN (s %g %g)", s0, s1);
    return;
  }
  if (nvec == 0) {
    CHECK(s0 == 0.f && w0 == 0.f && r.y == -INFINITY, "empty thread");
    return;
  }
  CHECK(std::isfinite(w0) && std::abs(s0 - ds) <= 1e-5 * ds && std::abs(w0 - dw) <= 1e-5 * (std::abs(dw) + ds),
        "sums (%g, %g) vs float64 (%g, %g)", s0, w0, ds, dw);

  // the gradient: lse2 of the thread's own set, A and B of some upstream gradients, the label at
  // column `lab` of vector 1
  const float lse2 = static_cast<float>(dm + std::log2(ds));
  const float A = -inv_temp * 0.7f, B = -inv_temp * -1.3f * kLn2, dl = 0.7f * inv_temp;
  const bool clamp_g = needs_clamp(r.x, c2, lse2);
  for (int k = 0; k < nvec; ++k) {
    float f0[kE], f1[kE], f2[kE], f3[kE];
    unpack<TIn>(data[k], f0);
    std::memcpy(f1, f0, sizeof(f0));
    std::memcpy(f2, f0, sizeof(f0));
    std::memcpy(f3, f0, sizeof(f0));
    const unsigned at = k == 1 ? 3u : 1000u;
    grad_vec<kE, true, true>(f0, c2, lse2, A, B, dl, at);
    grad_vec<kE, true, false>(f1, c2, lse2, A, B, dl, at);
    grad_vec<kE, false, false>(f2, c2, lse2, A, 0.f, dl, at);
    grad_vec<kE, false, true>(f3, c2, lse2, A, 0.f, dl, at);
    for (int i = 0; i < kE; ++i) {
      const double x = xs[k * kE + i];
      const double l2 = x * c2 - lse2;
      const double p = x == -INFINITY ? 0.0 : std::exp2(l2);
      const double g = p * (A + (x == -INFINITY ? 0.0 : B * l2)) + (k == 1 && i == 3 ? dl : 0.0);
      const double g_nodent = p * A + (k == 1 && i == 3 ? dl : 0.0);
      // fp32 accuracy relative to the terms' size (the label's term may cancel p A)
      const double tol = 1e-5 * (std::abs(g) + std::abs(dl) * (k == 1 && i == 3)) + 1e-30;
      if (!clamp_g) CHECK(same_bits(f0[i], f1[i]), "gradient: the clamp changed bits");
      CHECK(std::isfinite(f0[i]) && std::abs(f0[i] - g) <= tol,
            "gradient %g vs float64 %g (x %g, c2 %g, lse2 %g, l2 %g)", f0[i], g, x, c2, lse2, l2);
      CHECK(std::abs(f2[i] - g_nodent) <= tol + 1e-5 * std::abs(g_nodent) && same_bits(f2[i], f3[i]),
            "gradient without dL/dentropy %g vs %g", f2[i], g_nodent);
    }
  }
}

// parts of a set of statistics merged by rescaling to the common max = the whole set's
static void test_merge(std::mt19937& gen) {
  std::normal_distribution<float> nd(0.f, 4.f);
  for (int trial = 0; trial < 200; ++trial) {
    const int parts = 1 + trial % 9;
    std::vector<float> all;
    std::vector<Stats> st;
    for (int pi = 0; pi < parts; ++pi) {
      const int len = (trial + pi) % 4 == 0 ? 0 : 1 + (trial * 7 + pi * 13) % 40;  // some empty
      std::vector<float> xs(len);
      for (float& x : xs) x = nd(gen) + (pi % 3) * 20.f;
      double m, s, w;
      ref_sums(xs, 1.f, m, s, w);
      st.push_back(Stats{static_cast<float>(m), static_cast<float>(s), static_cast<float>(w)});
      all.insert(all.end(), xs.begin(), xs.end());
    }
    float m = -INFINITY;
    for (const Stats& v : st) m = std::max(m, v.m);
    Stats tot{m, 0.f, 0.f};
    for (const Stats& v : st) {
      const Stats r = rescale(v, m);
      tot.s += r.s;
      tot.w += r.w;
    }
    double dm, ds, dw;
    ref_sums(all, 1.f, dm, ds, dw);
    if (all.empty()) {
      CHECK(tot.m == -INFINITY && tot.s == 0.f && tot.w == 0.f, "merge of empty sets");
      continue;
    }
    CHECK(tot.m == static_cast<float>(dm) && std::abs(tot.s - ds) <= 1e-5 * ds &&
              std::abs(tot.w - dw) <= 1e-5 * (std::abs(dw) + ds),
          "merge (%g, %g, %g) vs (%g, %g, %g)", tot.m, tot.s, tot.w, dm, ds, dw);
  }
}

// head_tanh against float64: tanh within a few fp32 ulps of |tanh| (the series below 0.25, the
// exp form above), sech^2 at relative accuracy ~|y| 2^-24 down to its underflow, +-inf and NaN
static void test_head_tanh() {
  std::vector<float> ys = {0.f, -0.f, 1e-30f, -1e-8f, 0.1f, 0.2499f, 0.25f, -0.2501f, 0.5f, 1.f,
                           -3.f, 9.f, 20.f, -44.f, 87.f, 1e3f, -3e38f, INFINITY, -INFINITY, NAN};
  for (int i = -4000; i <= 4000; ++i) ys.push_back(i * 0.01f);
  for (float y : ys) {
    float d;
    const float t = head_tanh(y, &d);
    if (y != y) {
      CHECK(t != t && d != d, "head_tanh(NaN) must be NaN");
      continue;
    }
    const double tr = std::tanh(static_cast<double>(y));
    const double dr = std::isinf(y) ? 0.0 : 1.0 / (std::cosh(static_cast<double>(y)) *
                                                    std::cosh(static_cast<double>(y)));
    CHECK(std::abs(t - tr) <= 4e-7 * std::abs(tr) + 1e-45, "tanh(%g) = %.9g vs %.9g", y, t, tr);
    // (relative: the fp32 rounding of -2 log2(e) |y|, amplified by the exponential, ~|y| 2^-24)
    CHECK(std::isinf(y) ? d == 0.f : std::abs(d - dr) <= 1e-6 * (1.0 + std::abs(y)) * dr + 1e-44,
          "sech^2(%g) = %.9g vs %.9g", y, d, dr);
    CHECK(head_tanh(y) == t, "head_tanh without sech2 differs at %g", y);
  }
}

// the sums and the gradient of a soft-capped head: z = tanh(cap * x) * c2, against float64 (with
// -inf logits: tanh gives -1, a finite z; and saturating ones)
template <typename TIn, int VPT>
static void test_cap_sums_and_grad(std::mt19937& gen, int nvec, float scale, float inv_temp,
                                   float cap, int n_neg_inf) {
  constexpr int kE = kPerVec<TIn>;
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<float> xs(nvec * kE);
  for (float& x : xs) x = nd(gen);
  for (int i = 0; i < n_neg_inf && i < static_cast<int>(xs.size()); ++i)
    xs[(i * 7) % xs.size()] = -INFINITY;
  uint4 data[VPT];
  pack<TIn, VPT>(xs, data);
  const float c2 = inv_temp * kLog2e;
  const float2 r = head_range<true>(logit_range<TIn, VPT, true>(data, nvec), nvec > 0, cap);
  const float m2 = r.y * c2;
  const float ref = m2 == -INFINITY ? 0.f : m2;
  float s = 0, w = 0, s1 = 0, w1 = 0;
  thread_sums<TIn, VPT, true, false, true>(data, nvec, c2, ref, s, w, cap);
  thread_sums<TIn, VPT, false, false, true>(data, nvec, c2, ref, s1, w1, cap);
  CHECK(!needs_clamp(r.x, c2, ref), "a soft-capped head needs no clamp");
  CHECK(same_bits(s, s1) && w1 == 0.f, "capped s without w");
  if (nvec == 0) {
    CHECK(s == 0.f && w == 0.f && m2 == -INFINITY, "empty capped thread");
    return;
  }
  double dm = -INFINITY, ds = 0, dw = 0;
  for (float x : xs) dm = std::max(dm, std::tanh(static_cast<double>(cap) * x) * c2);
  for (float x : xs) {
    const double d = std::tanh(static_cast<double>(cap) * x) * c2 - dm;
    ds += std::exp2(d);
    dw += std::exp2(d) * d;
  }
  CHECK(std::abs(m2 - dm) <= 1e-6 * std::abs(dm) + 1e-30, "capped max %g vs %g", m2, dm);
  CHECK(std::abs(s - ds) <= 1e-5 * ds && std::abs(w - dw) <= 1e-5 * (std::abs(dw) + ds),
        "capped sums (%g, %g) vs float64 (%g, %g)", s, w, ds, dw);
  const float lse2 = static_cast<float>(dm + std::log2(ds));
  const float A = -inv_temp * 0.7f, B = -inv_temp * -1.3f * kLn2, dl = 0.7f * inv_temp;
  for (int k = 0; k < nvec; ++k) {
    float f0[kE], f1[kE];
    unpack<TIn>(data[k], f0);
    std::memcpy(f1, f0, sizeof(f0));
    const unsigned at = k == 1 ? 3u : 1000u;
    grad_vec<kE, true, false, true>(f0, c2, lse2, A, B, dl, at, cap);
    grad_vec<kE, false, false, true>(f1, c2, lse2, A, 0.f, dl, at, cap);
    for (int i = 0; i < kE; ++i) {
      const double x = xs[k * kE + i];
      const double y = static_cast<double>(cap) * x;
      const double dh = std::isinf(y) ? 0.0 : cap / (std::cosh(y) * std::cosh(y));
      const double l2 = std::tanh(y) * c2 - lse2;
      const double p = std::exp2(l2);
      const double lab = k == 1 && i == 3 ? dl : 0.0;
      const double g = (p * (A + B * l2) + lab) * dh;
      const double g_nodent = (p * A + lab) * dh;
      const double tol = 1e-5 * (std::abs(p * (A + B * l2)) + std::abs(lab)) * dh + 1e-30;
      CHECK(std::isfinite(f0[i]) && std::abs(f0[i] - g) <= tol,
            "capped gradient %g vs float64 %g (x %g, cap %g)", f0[i], g, x, cap);
      CHECK(std::abs(f1[i] - g_nodent) <= tol + 1e-5 * std::abs(g_nodent),
            "capped gradient without dL/dentropy %g vs %g", f1[i], g_nodent);
    }
  }
}

template <typename TIn>
static void test_type(std::mt19937& gen) {
  for (int nvec : {0, 1, 3, 9, 10}) {
    for (float scale : {1.f, 3.f, 30.f}) {
      for (float inv_temp : {1.f, 1.f / 0.7f, 1.f / 1.3f}) {
        test_sums_and_grad<TIn, 10>(gen, nvec, scale, inv_temp, 0, false);
        test_sums_and_grad<TIn, 10>(gen, nvec, scale, inv_temp, 3, false);
        test_sums_and_grad<TIn, 10>(gen, nvec, scale, inv_temp, 0, true);
        // soft-caps: Gemma's 30 (cap = 1 / 30), and one the logits saturate (cap = 2)
        for (float cap : {1.f / 30.f, 2.f}) {
          test_cap_sums_and_grad<TIn, 10>(gen, nvec, scale, inv_temp * 30.f, cap, 0);
          test_cap_sums_and_grad<TIn, 10>(gen, nvec, scale, inv_temp, cap, 3);
        }
      }
    }
  }
}

int main() {
  std::mt19937 gen(1234);
  test_unpack_bf16_every_pattern();
  test_head_tanh();
  test_type<__nv_bfloat16>(gen);
  test_type<__half>(gen);
  test_type<float>(gen);
  test_merge(gen);
  // fp32 chunks: a finite logit whose z - ref overflows (x * c2 of -3e38 at inv_temp 2) clamps
  {
    std::vector<float> xs = {1.f, -3e38f, 2.f, 0.5f};
    uint4 data[1];
    pack<float, 1>(xs, data);
    const float c2 = 2.f * kLog2e;
    const float2 r = logit_range<float, 1, true>(data, 1);
    const float ref = r.y * c2;
    CHECK(needs_clamp(r.x, c2, ref), "overflowing fp32 logit must need the clamp");
    float s = 0, w = 0;
    thread_sums<float, 1, true, true>(data, 1, c2, ref, s, w);
    CHECK(std::isfinite(s) && std::isfinite(w), "clamped sums finite (%g, %g)", s, w);
  }
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
