// CPU kernels of grpo_loss: the per-token GRPO loss terms, their unscaled gradient and the per-row
// partial sums in one pass over each row (sequence level: the row's mean log-ratio first), then
// a reduction of the partials into the loss, the metrics and the per-row gradient scale. The
// contract and the formulas are those of the Triton kernels in r1kernels/ops/grpo_loss.py
// (_grpo_token_terms, _grpo_loss_fwd_kernel, _grpo_finalize); see the module docstring there.
// Rows run in parallel (at::parallel_for); row sums accumulate in double, in a fixed order.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

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

struct Terms {
  float pol, g_dir, g_c1, kl;
  bool low, high;
};

// Per-token loss, dl/dlp = g_dir + g_c1 * dc1/dlp, k3 kl and the clip flags (as _grpo_token_terms)
inline Terms token_terms(float lp, float ref, float A, float rw, float c1, const Options& o) {
  Terms r{0.f, 0.f, 0.f, 0.f, false, false};
  if (o.loss == kCispo) {  // -sg(min(c1, eps_hi)) A lp
    const float cl = std::min(c1, o.eps_hi);
    r.pol = -cl * A * lp;
    r.g_dir = -cl * A;
    r.high = c1 > o.eps_hi && A > 0.f;
  } else if (o.loss == kSapo) {  // soft gate
    const float tau = A > 0.f ? o.tau_pos : o.tau_neg;
    const float s = 1.f / (1.f + std::exp(-(tau * (c1 - 1.f))));
    r.pol = -s * 4.f / tau * A;
    r.g_c1 = -4.f * A * s * (1.f - s);
  } else {  // clipped surrogate; the clip metrics use coef_1 after the delta clamp (as TRL)
    const float lo = 1.f - o.eps_lo, hi = 1.f + o.eps_hi;
    const float c2 = std::min(std::max(c1, lo), hi);
    const float c1d = o.has_delta ? std::min(c1, o.delta) : c1;
    const float d1 = o.has_delta ? (c1 <= o.delta ? 1.f : 0.f) : 1.f;
    const float t1 = c1d * A, t2 = c2 * A;
    r.pol = -std::min(t1, t2);
    const float w1 = t1 < t2 ? 1.f : (t1 == t2 ? 0.5f : 0.f);  // torch.minimum splits ties
    const float d2 = (c1 >= lo && c1 <= hi) ? 1.f : 0.f;
    r.g_c1 = -A * (w1 * d1 + (1.f - w1) * d2);
    r.low = c1d < lo && A < 0.f;
    r.high = c1d > hi && A > 0.f;
  }
  if (o.has_rw) {
    r.pol *= rw;
    r.g_dir *= rw;
    r.g_c1 *= rw;
  }
  if (o.has_ref) {  // beta != 0
    const float d = ref - lp;
    const float ed = std::exp(d);
    const float kl0 = ed - d - 1.f;
    const float dkl0 = 1.f - ed;
    if (o.bias_kl) {
      r.kl = kl0 * c1;
      r.g_dir += o.beta * dkl0 * c1;
      r.g_c1 += o.beta * kl0;
    } else {
      r.kl = kl0;
      r.g_dir += o.beta * dkl0;
    }
    r.pol += o.beta * r.kl;
  }
  return r;
}

template <typename L, typename M>
void grpo_rows(const View<L>& lp_v, const View<float>& adv_v, const View<M>& mask_v,
               const View<float>& old_v, const View<float>& ref_v, const View<float>& rw_v,
               float* grad, float* part, int64_t B, int64_t T, const Options& o) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      // masked positions may hold anything (-inf, NaN): their inputs read as 0
      auto load = [&](int64_t t, float& lp, float& old, float& m) {
        m = static_cast<float>(mask_v.at(b, t));
        const bool on = m != 0.f;
        lp = on ? static_cast<float>(lp_v.at(b, t)) : 0.f;
        old = o.has_old ? (on ? old_v.at(b, t) : 0.f) : lp;
      };
      double n = 0.0;
      float c1_row = 1.f;
      if (o.seq) {  // pass 1: the row's mean log-ratio
        double lr = 0.0;
        for (int64_t t = 0; t < T; ++t) {
          float lp, old, m;
          load(t, lp, old, m);
          lr += static_cast<double>((lp - old) * m);
          n += m;
        }
        c1_row = std::exp(static_cast<float>(lr / std::max(n, 1.0)));
        n = 0.0;
      }
      // pass 2: loss, metrics, (token level) gradient
      double a_l = 0.0, a_kl = 0.0, a_lo = 0.0, a_hi = 0.0, a_rg = 0.0, a_s = 0.0;
      float* g_row = grad != nullptr ? grad + b * T : nullptr;
      for (int64_t t = 0; t < T; ++t) {
        float lp, old, m;
        load(t, lp, old, m);
        const bool on = m != 0.f;
        const float A = on ? adv_v.at(b, t) : 0.f;
        const float ref = o.has_ref && on ? ref_v.at(b, t) : 0.f;
        const float rw = o.has_rw && on ? rw_v.at(b, t) : 0.f;
        const float c1 = o.seq ? c1_row : std::exp(lp - old);
        const Terms r = token_terms(lp, ref, A, rw, c1, o);
        n += m;
        if (on) {
          a_l += static_cast<double>(r.pol * m);
          a_kl += static_cast<double>(r.kl * m);
          a_lo += r.low ? m : 0.f;
          a_hi += r.high ? m : 0.f;
          a_rg += (r.low || r.high) ? m : 0.f;
          a_s += static_cast<double>(r.g_c1 * m);
        }
        if (g_row != nullptr) {
          // sequence level: the direct term now, the ratio term added below
          g_row[t] = on ? (o.seq ? r.g_dir : r.g_dir + r.g_c1 * c1) * m : 0.f;
        }
      }
      if (o.seq && g_row != nullptr) {
        // dc1/dlp_t = c1 m_t / max(n, 1): every masked-in token gets sum_t' m dl/dc1 * that
        const float s_row = static_cast<float>(a_s) * c1_row / static_cast<float>(std::max(n, 1.0));
        for (int64_t t = 0; t < T; ++t) {
          const float m = static_cast<float>(mask_v.at(b, t));
          if (m != 0.f) g_row[t] += s_row * m;
        }
      }
      part[b] = static_cast<float>(a_l);
      part[B + b] = static_cast<float>(n);
      part[2 * B + b] = static_cast<float>(a_kl);
      part[3 * B + b] = static_cast<float>(a_lo);
      part[4 * B + b] = static_cast<float>(a_hi);
      part[5 * B + b] = static_cast<float>(a_rg);
    }
  });
}

at::Tensor f32(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat); }

void check_bt(const char* name, const at::Tensor& x, int64_t B, int64_t T) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 2 && x.size(0) == B && x.size(1) == T,
                    "grpo_loss_partials: ", name, " must be a CPU tensor [", B, ", ", T, "], got ",
                    x.sizes(), " on ", x.device());
}

// (grad [B, T] fp32 unscaled, or [0] without write_grad; partials [6, B] fp32)
std::tuple<at::Tensor, at::Tensor> grpo_loss_partials_cpu(
    const at::Tensor& logps, const at::Tensor& adv, const at::Tensor& mask,
    const std::optional<at::Tensor>& old, const std::optional<at::Tensor>& ref,
    const std::optional<at::Tensor>& rw, int64_t loss, bool seq, double eps_lo, double eps_hi,
    std::optional<double> delta, double beta, bool bias_kl, double tau_pos, double tau_neg,
    bool write_grad) {
  TORCH_CHECK_VALUE(logps.dim() == 2, "grpo_loss_partials: logps must be [B, T], got ", logps.sizes());
  TORCH_CHECK_VALUE(loss >= kGrpo && loss <= kSapo, "grpo_loss_partials: unknown loss type ", loss);
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
  // float32 views of the data inputs (no copy when they already are; a broadcast [B] advantage
  // keeps its stride 0)
  const at::Tensor adv_f = f32(adv);
  const std::optional<at::Tensor> old_f = old.has_value() ? std::optional(f32(*old)) : std::nullopt;
  const std::optional<at::Tensor> ref_f = o.has_ref ? std::optional(f32(*ref)) : std::nullopt;
  const std::optional<at::Tensor> rw_f = rw.has_value() ? std::optional(f32(*rw)) : std::nullopt;
  at::Tensor m = mask;
  if (m.scalar_type() == at::kBool) m = m.view(at::kByte);
  if (m.scalar_type() != at::kByte && m.scalar_type() != at::kFloat) m = m.to(at::kFloat);
  const View<float> adv_v = view_of<float>(adv_f), old_v = view_of<float>(old_f),
                    ref_v = view_of<float>(ref_f), rw_v = view_of<float>(rw_f);
  float* gp = write_grad ? grad.data_ptr<float>() : nullptr;
  float* pp = part.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logps.scalar_type(), "grpo_loss_partials_cpu", [&] {
    const View<scalar_t> lp_v = view_of<scalar_t>(logps);
    if (m.scalar_type() == at::kByte) {
      grpo_rows(lp_v, adv_v, view_of<uint8_t>(m), old_v, ref_v, rw_v, gp, pp, B, T, o);
    } else {
      grpo_rows(lp_v, adv_v, view_of<float>(m), old_v, ref_v, rw_v, gp, pp, B, T, o);
    }
  });
  return {grad, part};
}

// partials [6, B] or [6, C, B] (chunks of rows, reduced in order) -> (out [5] = loss, kl,
// clip_ratio_low, clip_ratio_high, clip_ratio; scale [B]): the loss is sum_b scale_b sum_t l m
std::tuple<at::Tensor, at::Tensor> grpo_loss_finalize_cpu(const at::Tensor& part,
                                                          const std::optional<at::Tensor>& nitems,
                                                          int64_t loss, double max_len) {
  TORCH_CHECK_VALUE(part.device().is_cpu() && (part.dim() == 2 || part.dim() == 3) &&
                        part.size(0) == kPartials,
                    "grpo_loss_finalize: part must be [6, B] or [6, C, B] on CPU, got ", part.sizes());
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
