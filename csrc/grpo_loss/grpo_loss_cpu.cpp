// CPU kernels of grpo_loss: the per-token GRPO loss terms, their unscaled gradient and the per-row
// partial sums in one pass over each row (sequence level: the row's mean log-ratio first), then
// a reduction of the partials into the loss, the metrics and the per-row gradient scale. The
// contract and the formulas are those of the Triton kernels in r1kernels/ops/grpo_loss.py
// (_grpo_token_terms, _grpo_loss_fwd_kernel, _grpo_finalize); see the module docstring there.
// Rows run in parallel (at::parallel_for); a row is processed in blocks of kBlock tokens, by SIMD
// passes (common/cpu_simd.h) over fp32 buffers; block sums accumulate in double, in a fixed order.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>

#include "common/cpu_simd.h"
#include "common/check_msg.h"

namespace r1k {
namespace {

enum Loss : int64_t { kGrpo = 0, kBnpo, kDrGrpo, kDapo, kLuspo, kCispo, kSapo };
constexpr int64_t kPartials = 6;  // per row: sum l m, n, sum kl m, low, high, region

struct Options {
  int64_t loss;
  bool seq, has_old, has_ref, has_rw, has_delta, bias_kl;
  float eps_lo, eps_hi, delta, beta, tau_pos, tau_neg;
};

// [B, T] input with any strides (the advantages may be broadcast: stride 0)
template <typename T>
struct View {
  const T* p = nullptr;
  int64_t s0 = 0, s1 = 0;
  T at(int64_t b, int64_t t) const { return p[b * s0 + t * s1]; }
};

template <typename T>
View<T> view_of(const std::optional<at::Tensor>& x) {
  View<T> v;
  if (x.has_value()) {
    v.p = x->const_data_ptr<T>();
    v.s0 = x->stride(0);
    v.s1 = x->stride(1);
  }
  return v;
}

constexpr int64_t kBlock = 512;  // tokens per block: the per-token buffers below stay in L1

// One block of a row's tokens, fp32: the inputs (zero at masked positions, whatever those hold:
// then every term below is finite and the mask multiplies it away) and the per-token terms.
struct Block {
  float lp[kBlock], old[kBlock], ref[kBlock], adv[kBlock], m[kBlock], rw[kBlock];
  float c1[kBlock], pol[kBlock], g_dir[kBlock], g_c1[kBlock], kl[kBlock], low[kBlock],
      high[kBlock];
};

// Per-token loss, dl/dlp = g_dir + g_c1 * dc1/dlp, k3 kl and the clip flags (1.0 / 0.0), as
// _grpo_token_terms of the Triton kernel, in SIMD passes over a block: c1 is filled already.
R1K_SIMD_CLONES void block_terms(Block& k, int64_t n, const Options& o) {
  if (o.loss == kCispo) {  // -sg(min(c1, eps_hi)) A lp
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float cl = k.c1[i] < o.eps_hi ? k.c1[i] : o.eps_hi;
      k.g_dir[i] = -cl * k.adv[i];
      k.pol[i] = k.g_dir[i] * k.lp[i];
      k.g_c1[i] = 0.f;
      k.low[i] = 0.f;
      k.high[i] = (k.c1[i] > o.eps_hi && k.adv[i] > 0.f) ? 1.f : 0.f;
    }
  } else if (o.loss == kSapo) {  // soft gate
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float tau = k.adv[i] > 0.f ? o.tau_pos : o.tau_neg;
      const float s = 1.f / (1.f + exp_simd(-(tau * (k.c1[i] - 1.f))));
      k.pol[i] = -s * 4.f / tau * k.adv[i];
      k.g_dir[i] = 0.f;
      k.g_c1[i] = -4.f * k.adv[i] * s * (1.f - s);
      k.low[i] = 0.f;
      k.high[i] = 0.f;
    }
  } else {  // clipped surrogate; the clip metrics use coef_1 after the delta clamp (as TRL)
    const float lo = 1.f - o.eps_lo, hi = 1.f + o.eps_hi;
    const float delta = o.has_delta ? o.delta : std::numeric_limits<float>::infinity();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float c1 = k.c1[i], A = k.adv[i];
      const float c2 = c1 < lo ? lo : (c1 > hi ? hi : c1);
      const float c1d = c1 < delta ? c1 : delta;
      const float d1 = c1 <= delta ? 1.f : 0.f;
      const float t1 = c1d * A, t2 = c2 * A;
      k.pol[i] = -(t1 < t2 ? t1 : t2);
      const float w1 = t1 < t2 ? 1.f : (t1 == t2 ? 0.5f : 0.f);  // torch.minimum splits ties
      const float d2 = (c1 >= lo && c1 <= hi) ? 1.f : 0.f;
      k.g_dir[i] = 0.f;
      k.g_c1[i] = -A * (w1 * d1 + (1.f - w1) * d2);
      k.low[i] = (c1d < lo && A < 0.f) ? 1.f : 0.f;
      k.high[i] = (c1d > hi && A > 0.f) ? 1.f : 0.f;
    }
  }
  if (o.has_rw) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      k.pol[i] *= k.rw[i];
      k.g_dir[i] *= k.rw[i];
      k.g_c1[i] *= k.rw[i];
    }
  }
  if (o.has_ref) {  // beta != 0: k3 kl, with bias correction kl * c1
    const float beta = o.beta;
    if (o.bias_kl) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float d = k.ref[i] - k.lp[i];
        const float ed = exp_simd(d);
        const float kl0 = ed - d - 1.f;
        const float c1 = k.c1[i];
        k.kl[i] = kl0 * c1;
        if (o.seq) {
          k.g_dir[i] += beta * (1.f - ed) * c1;
          k.g_c1[i] += beta * kl0;
        } else {
          // token level (dc1/dlp = c1): d(c1 kl0)/dlp = c1 (kl0 + 1 - ed) = -c1 d exactly;
          // summed apart, the two terms cancel when the policy is far below the reference
          k.g_dir[i] -= beta * d * c1;
        }
        k.pol[i] += beta * kl0 * c1;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float d = k.ref[i] - k.lp[i];
        const float ed = exp_simd(d);
        const float kl0 = ed - d - 1.f;
        k.kl[i] = kl0;
        k.g_dir[i] += beta * (1.f - ed);
        k.pol[i] += beta * kl0;
      }
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) k.kl[i] = 0.f;
  }
}

R1K_SIMD_CLONES void block_exp_ratio(Block& k, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) k.c1[i] = exp_simd(k.lp[i] - k.old[i]);
}

// the block's sums: l m, n, kl m, low m, high m, (low or high) m, g_c1 m
R1K_SIMD_CLONES void block_sums(const Block& k, int64_t n, double* acc) {
  float s_l = 0.f, s_n = 0.f, s_kl = 0.f, s_lo = 0.f, s_hi = 0.f, s_rg = 0.f, s_s = 0.f;
#pragma omp simd reduction(+ : s_l, s_n, s_kl, s_lo, s_hi, s_rg, s_s)
  for (int64_t i = 0; i < n; ++i) {
    const float m = k.m[i];
    s_l += k.pol[i] * m;
    s_n += m;
    s_kl += k.kl[i] * m;
    s_lo += k.low[i] * m;
    s_hi += k.high[i] * m;
    s_rg += (k.low[i] > k.high[i] ? k.low[i] : k.high[i]) * m;
    s_s += k.g_c1[i] * m;
  }
  acc[0] += s_l;
  acc[1] += s_n;
  acc[2] += s_kl;
  acc[3] += s_lo;
  acc[4] += s_hi;
  acc[5] += s_rg;
  acc[6] += s_s;
}

// token level: g = (g_dir + g_c1 c1) m; sequence level: g = g_dir m (+ the ratio term later)
R1K_SIMD_CLONES void block_grad(const Block& k, int64_t n, bool seq, float* g) {
  if (seq) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) g[i] = k.g_dir[i] * k.m[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      // dl/dc1 = 0 (a clipped token) where c1 overflowed to inf: 0, not 0 * inf = NaN
      const float gc = k.g_c1[i] != 0.f ? k.g_c1[i] * k.c1[i] : 0.f;
      g[i] = (k.g_dir[i] + gc) * k.m[i];
    }
  }
}

// dst[i] = src[i * stride] where m[i] != 0, else 0 (the load is unconditional, so the loop is a
// SIMD loop: masked positions are read, never used)
R1K_SIMD_CLONES void load_masked(const float* src, int64_t stride, const float* m, int64_t n,
                                 float* dst) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float v = src[i];
      dst[i] = m[i] != 0.f ? v : 0.f;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float v = src[i * stride];
      dst[i] = m[i] != 0.f ? v : 0.f;
    }
  }
}

R1K_SIMD_CLONES void load_mask(const uint8_t* src, int64_t stride, int64_t n, float* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
}

R1K_SIMD_CLONES void load_mask(const float* src, int64_t stride, int64_t n, float* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
}

// The block's mask, lp and old (all a log-ratio needs); with `all`, also adv, ref and rw.
template <typename M>
void load_block(Block& k, int64_t b, int64_t t0, int64_t n, const View<float>& lp_v,
                const View<float>& adv_v, const View<M>& mask_v, const View<float>& old_v,
                const View<float>& ref_v, const View<float>& rw_v, const Options& o, bool all) {
  auto at = [&](const auto& v) { return v.p + b * v.s0 + t0 * v.s1; };
  load_mask(at(mask_v), mask_v.s1, n, k.m);
  load_masked(at(lp_v), lp_v.s1, k.m, n, k.lp);
  if (o.has_old) {
    load_masked(at(old_v), old_v.s1, k.m, n, k.old);
  } else {
    std::copy(k.lp, k.lp + n, k.old);
  }
  if (!all) return;
  load_masked(at(adv_v), adv_v.s1, k.m, n, k.adv);
  if (o.has_ref) load_masked(at(ref_v), ref_v.s1, k.m, n, k.ref);
  if (o.has_rw) load_masked(at(rw_v), rw_v.s1, k.m, n, k.rw);
}

template <typename M>
void grpo_rows(const View<float>& lp_v, const View<float>& adv_v, const View<M>& mask_v,
               const View<float>& old_v, const View<float>& ref_v, const View<float>& rw_v,
               float* grad, float* part, int64_t B, int64_t T, const Options& o) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    auto k = std::make_unique<Block>();
    for (int64_t b = begin; b < end; ++b) {
      float c1_row = 1.f;
      if (o.seq) {  // pass 1: the row's mean log-ratio
        double lr = 0.0, n = 0.0;
        for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
          const int64_t len = std::min(kBlock, T - t0);
          load_block(*k, b, t0, len, lp_v, adv_v, mask_v, old_v, ref_v, rw_v, o, false);
          for (int64_t i = 0; i < len; ++i) {
            lr += static_cast<double>((k->lp[i] - k->old[i]) * k->m[i]);
            n += k->m[i];
          }
        }
        c1_row = std::exp(static_cast<float>(lr / std::max(n, 1.0)));
      }
      // pass 2: loss, metrics, (token level) gradient
      double acc[7] = {0, 0, 0, 0, 0, 0, 0};
      float* g_row = grad != nullptr ? grad + b * T : nullptr;
      for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
        const int64_t len = std::min(kBlock, T - t0);
        load_block(*k, b, t0, len, lp_v, adv_v, mask_v, old_v, ref_v, rw_v, o, true);
        if (o.seq) {
          std::fill(k->c1, k->c1 + len, c1_row);
        } else {
          block_exp_ratio(*k, len);
        }
        block_terms(*k, len, o);
        block_sums(*k, len, acc);
        if (g_row != nullptr) block_grad(*k, len, o.seq, g_row + t0);
      }
      const double n = acc[1];
      if (o.seq && g_row != nullptr) {
        // dc1/dlp_t = c1 m_t / max(n, 1): every masked-in token gets sum_t' m dl/dc1 * that
        const float s_sum = static_cast<float>(acc[6]);
        const float s_row = (s_sum != 0.f ? s_sum * c1_row : 0.f) / static_cast<float>(std::max(n, 1.0));
        for (int64_t t = 0; t < T; ++t) {
          const float m = static_cast<float>(mask_v.at(b, t));
          if (m != 0.f) g_row[t] += s_row * m;
        }
      }
      for (int j = 0; j < kPartials; ++j) part[j * B + b] = static_cast<float>(acc[j]);
    }
  });
}

at::Tensor f32(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat); }

std::optional<at::Tensor> f32(const std::optional<at::Tensor>& x) {
  return x.has_value() ? std::optional(f32(*x)) : std::nullopt;
}

void check_bt(const char* name, const at::Tensor& x, int64_t B, int64_t T) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 2 && x.size(0) == B && x.size(1) == T,
                    "grpo_loss_partials: ", r1k::msg(name), " must be a CPU tensor [", r1k::msg(B), ", ",
                    r1k::msg(T), "], got ",
                    r1k::msg(x.sizes()), " on ", r1k::msg(x.device()));
}

// (grad [B, T] fp32 unscaled, or [0] without write_grad; partials [6, B] fp32)
std::tuple<at::Tensor, at::Tensor> grpo_loss_partials_cpu(
    const at::Tensor& logps, const at::Tensor& adv, const at::Tensor& mask,
    const std::optional<at::Tensor>& old, const std::optional<at::Tensor>& ref,
    const std::optional<at::Tensor>& rw, int64_t loss, bool seq, double eps_lo, double eps_hi,
    std::optional<double> delta, double beta, bool bias_kl, double tau_pos, double tau_neg,
    bool write_grad) {
  TORCH_CHECK_VALUE(logps.dim() == 2, "grpo_loss_partials: logps must be [B, T], got ", r1k::msg(logps.sizes()));
  TORCH_CHECK_VALUE(loss >= kGrpo && loss <= kSapo, "grpo_loss_partials: unknown loss type ", r1k::msg(loss));
  const int64_t B = logps.size(0), T = logps.size(1);
  check_bt("logps", logps, B, T);
  check_bt("advantages", adv, B, T);
  check_bt("mask", mask, B, T);
  if (old.has_value()) check_bt("old_logps", *old, B, T);
  if (ref.has_value()) check_bt("ref_logps", *ref, B, T);
  if (rw.has_value()) check_bt("rollout_is_weights", *rw, B, T);
  const Options o{loss, seq, old.has_value(), beta != 0.0 && ref.has_value(), rw.has_value(),
                  delta.has_value(), bias_kl, static_cast<float>(eps_lo),
                  static_cast<float>(eps_hi), static_cast<float>(delta.value_or(0.0)),
                  static_cast<float>(beta), static_cast<float>(tau_pos), static_cast<float>(tau_neg)};
  TORCH_CHECK_VALUE(beta == 0.0 || ref.has_value(), "grpo_loss_partials: beta != 0 needs ref_logps");
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor grad = write_grad ? at::empty({B, T}, fopt) : at::empty({0}, fopt);
  at::Tensor part = at::empty({kPartials, B}, fopt);
  if (B == 0) return {grad, part};
  // float32 views of the inputs (no copy when they already are; a broadcast [B] advantage keeps
  // its stride 0)
  const at::Tensor lp_f = f32(logps), adv_f = f32(adv);
  const std::optional<at::Tensor> old_f = f32(old), ref_f = o.has_ref ? f32(ref) : std::nullopt,
                                  rw_f = f32(rw);
  at::Tensor m = mask;
  if (m.scalar_type() == at::kBool) m = m.view(at::kByte);
  if (m.scalar_type() != at::kByte && m.scalar_type() != at::kFloat) m = m.to(at::kFloat);
  const View<float> adv_v = view_of<float>(adv_f), old_v = view_of<float>(old_f),
                    ref_v = view_of<float>(ref_f), rw_v = view_of<float>(rw_f);
  float* gp = write_grad ? grad.data_ptr<float>() : nullptr;
  float* pp = part.data_ptr<float>();
  const View<float> lp_v = view_of<float>(lp_f);
  if (m.scalar_type() == at::kByte) {
    grpo_rows(lp_v, adv_v, view_of<uint8_t>(m), old_v, ref_v, rw_v, gp, pp, B, T, o);
  } else {
    grpo_rows(lp_v, adv_v, view_of<float>(m), old_v, ref_v, rw_v, gp, pp, B, T, o);
  }
  return {grad, part};
}

// partials [6, B] or [6, C, B] (chunks of rows, reduced in order) -> (out [5] = loss, kl,
// clip_ratio_low, clip_ratio_high, clip_ratio; scale [B]): the loss is sum_b scale_b sum_t l m
std::tuple<at::Tensor, at::Tensor> grpo_loss_finalize_cpu(const at::Tensor& part,
                                                          const std::optional<at::Tensor>& nitems,
                                                          int64_t loss, double max_len) {
  TORCH_CHECK_VALUE(part.device().is_cpu() && (part.dim() == 2 || part.dim() == 3) &&
                        part.size(0) == kPartials,
                    "grpo_loss_finalize: part must be [6, B] or [6, C, B] on CPU, got ", r1k::msg(part.sizes()));
  const at::Tensor p = f32(part).contiguous();
  const int64_t B = p.size(-1), C = p.dim() == 3 ? p.size(1) : 1, CB = C * B;
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::zeros({5}, fopt), scale = at::empty({B}, fopt);
  if (B == 0) return {out, scale};
  const float* pp = p.const_data_ptr<float>();
  double s_l = 0, s_lr = 0, s_n = 0, s_kl = 0, s_lo = 0, s_hi = 0, s_rg = 0;
  for (int64_t b = 0; b < B; ++b) {
    double l = 0, n = 0;
    for (int64_t c = 0; c < C; ++c) {
      const float* pc = pp + c * B + b;
      l += pc[0];
      n += pc[CB];
      s_kl += pc[2 * CB];
      s_lo += pc[3 * CB];
      s_hi += pc[4 * CB];
      s_rg += pc[5 * CB];
    }
    s_l += l;
    s_lr += l / std::max(n, 1.0);
    s_n += n;
  }
  const double fb = static_cast<double>(B);
  double inv, value;
  if (loss == kGrpo || loss == kSapo) {  // mean over rows of the row means
    value = s_lr / fb;
    inv = 1.0 / fb;  // times 1 / max(n_b, 1) per row
  } else {
    if (loss == kBnpo) {
      inv = 1.0 / std::max(s_n, 1.0);
    } else if (loss == kDrGrpo) {
      inv = 1.0 / std::max(fb * max_len, 1.0);
    } else if (loss == kLuspo) {
      inv = 1.0 / fb;
    } else {  // dapo, cispo
      const double items = nitems.has_value() ? f32(*nitems).reshape({-1})[0].item<float>() : s_n;
      inv = 1.0 / std::max(items, 1.0);
    }
    value = s_l * inv;
  }
  const double m_inv = 1.0 / std::max(s_n, 1.0);
  float* o = out.data_ptr<float>();
  o[0] = static_cast<float>(value);
  o[1] = static_cast<float>(s_kl * m_inv);
  o[2] = static_cast<float>(s_lo * m_inv);
  o[3] = static_cast<float>(s_hi * m_inv);
  o[4] = static_cast<float>(s_rg * m_inv);
  float* sc = scale.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    if (loss == kGrpo || loss == kSapo) {
      double n = 0;
      for (int64_t c = 0; c < C; ++c) n += pp[CB + c * B + b];
      sc[b] = static_cast<float>(inv / std::max(n, 1.0));
    } else {
      sc[b] = static_cast<float>(inv);
    }
  }
  return {out, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CPU, m) {
  m.impl("grpo_loss_partials", &grpo_loss_partials_cpu);
  m.impl("grpo_loss_finalize", &grpo_loss_finalize_cpu);
}

}  // namespace r1k
