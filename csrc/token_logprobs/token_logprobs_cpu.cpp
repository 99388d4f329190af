// CPU kernels of token_logprobs and linear_token_logprobs: per-row log-softmax statistics and
// dL/dlogits over an [n, c] tile of logits (columns col0 .. col0 + c of the vocabulary), with the
// contract of the Triton kernels in r1kernels/ops/token_logprobs.py (_token_logprobs_fwd_kernel,
// _token_logprobs_bwd_kernel; the Python launchers stats_cpp / grad_cpp there).
//
// Rows run in parallel (at::parallel_for). A row is processed in blocks of kBlock columns copied
// to an fp32 buffer ((x + bias) * inv_temp, or with a soft-cap inv_temp * tanh(cap * (x + bias)):
// the head's constants, r1kernels/ops/token_logprobs.py head_constants); the loops over a block
// are SIMD loops (common/cpu_simd.h: AVX-512, AVX2 or baseline clones, a polynomial exp). One
// exp per element in each kernel, like the GPU kernels (the soft-capped head adds a tanh, and in
// the gradient an exp, per element, in scalar loops). The gradient may be written over the logits (g aliasing x, also a 16-bit g over fp32 x): a block is read whole before any of it
// is written, and a block's writes only touch bytes of columns already read.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "common/cpu_simd.h"
#include "common/check_msg.h"

namespace r1k {
namespace {

constexpr int64_t kBlock = 2048;  // columns per block: an 8 KiB fp32 buffer, in L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

R1K_SIMD_CLONES float block_max(const float* z, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

// sum_i e_i and sum_i e_i * (z_i - ref) over e_i = exp(z_i - ref) > 0 (the entropy's sum)
R1K_SIMD_CLONES void block_sum_exp(const float* z, int64_t n, float ref, bool entropy, float* s_out,
                                   float* w_out) {
  float s = 0.f, w = 0.f;
  if (entropy) {
#pragma omp simd reduction(+ : s, w)
    for (int64_t i = 0; i < n; ++i) {
      const float d = z[i] - ref;
      const float e = exp_simd(d);
      s += e;
      w += e > 0.f ? e * d : 0.f;
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += exp_simd(z[i] - ref);
  }
  *s_out = s;
  *w_out = w;
}

// z (scaled logits) -> dL/dlogits without the label's term, in place:
// g = -p * (dlogp + dent * (log p + H)) / T, p = exp(z - lse) (the dent term only where p > 0)
R1K_SIMD_CLONES void block_grad(float* z, int64_t n, float lse, float ent, float dlogp, float dent,
                                float inv_temp, bool has_dent) {
  if (has_dent) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float lv = z[i] - lse;
      const float p = exp_simd(lv);
      const float g = -dlogp * p - dent * p * (p > 0.f ? lv + ent : 0.f);
      z[i] = g * inv_temp;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) z[i] = (-dlogp * exp_simd(z[i] - lse)) * inv_temp;
  }
}

// buf[i] = (x[i] + bias[i]) * inv_temp in fp32
template <typename T>
R1K_INLINE void load_block(const T* x, const float* bias, int64_t n, float inv_temp, float* buf) {
  if (bias != nullptr) {
    for (int64_t i = 0; i < n; ++i) buf[i] = (static_cast<float>(x[i]) + bias[i]) * inv_temp;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]) * inv_temp;
  }
}

// The soft-capped head of one logit y = cap * (x + bias): tanh y and sech^2 y = 1 - tanh^2 y, the
// latter as 4e / (1 + e)^2 with e = exp(-2|y|) (no cancellation where tanh saturates).
R1K_INLINE float softcap_tanh(float y) { return std::tanh(y); }
R1K_INLINE float softcap_sech2(float y) {
  const float e = std::exp(-2.f * std::fabs(y));
  return 4.f * e / ((1.f + e) * (1.f + e));
}

// With a soft-cap (cap != 0): buf[i] = inv_temp * tanh(cap * (x[i] + bias[i])), and when d is
// given d[i] = cap * sech^2(cap * (x[i] + bias[i])) (the factor dz/dx / inv_temp)
template <typename T>
void load_block_capped(const T* x, const float* bias, int64_t n, float inv_temp, float cap,
                       float* buf, float* d) {
  for (int64_t i = 0; i < n; ++i) {
    const float y = cap * (static_cast<float>(x[i]) + (bias != nullptr ? bias[i] : 0.f));
    buf[i] = inv_temp * softcap_tanh(y);
    if (d != nullptr) d[i] = cap * softcap_sech2(y);
  }
}

template <typename T>
void stats_rows(const T* x, int64_t sx, const int64_t* labels, const float* bias, float* state,
                float* out, int64_t n, int64_t c, int64_t col0, int64_t vocab, float inv_temp,
                float cap, int64_t ignore_index, bool accum, bool final_, bool entropy) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    float buf[kBlock];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = labels[row];
      const int64_t loc = label - col0;  // the label's column in this tile (may be outside it)
      const bool ignored = label == ignore_index;
      float m = kNegInf, s = 0.f, t = 0.f, w = 0.f;
      if (accum) {
        m = state[row];
        s = state[n + row];
        t = state[2 * n + row];
        w = state[3 * n + row];
      }
      // an ignored row (a prompt or padding token) is not read: zero outputs
      const int64_t n_read = ignored ? 0 : c;
      const T* xr = x + row * sx;
      if (loc >= 0 && loc < n_read) {
        const float zt = static_cast<float>(xr[loc]) + (bias != nullptr ? bias[loc] : 0.f);
        t += cap != 0.f ? inv_temp * softcap_tanh(cap * zt) : zt * inv_temp;
      }
      for (int64_t b0 = 0; b0 < n_read; b0 += kBlock) {
        const int64_t len = std::min(kBlock, n_read - b0);
        if (cap != 0.f)
          load_block_capped(xr + b0, bias != nullptr ? bias + b0 : nullptr, len, inv_temp, cap, buf,
                            nullptr);
        else
          load_block(xr + b0, bias != nullptr ? bias + b0 : nullptr, len, inv_temp, buf);
        const float m_new = std::max(m, block_max(buf, len));
        const float ref = m_new == kNegInf ? 0.f : m_new;  // all -inf so far: any finite ref
        const float alpha = std::exp(m - ref);
        float sb, wb;
        block_sum_exp(buf, len, ref, entropy, &sb, &wb);
        if (entropy) w = alpha * (w + s * (s > 0.f ? m - ref : 0.f)) + wb;
        s = s * alpha + sb;
        m = m_new;
      }
      if (final_) {
        const float log_s = std::log(s);
        const bool valid = label >= 0 && label < vocab;
        const float logp = valid ? (t - m) - log_s : std::numeric_limits<float>::quiet_NaN();
        out[row] = ignored ? 0.f : logp;
        out[2 * n + row] = ignored ? 0.f : m + log_s;
        if (entropy) out[n + row] = ignored ? 0.f : log_s - w / s;
      } else {
        state[row] = m;
        state[n + row] = s;
        state[2 * n + row] = t;
        state[3 * n + row] = w;
      }
    }
  });
}

template <typename T, typename G>
void grad_rows(const T* x, int64_t sx, G* g, int64_t sg, const int64_t* labels, const float* bias,
               const float* lse, const float* ent, const float* dlogp, const float* dent, int64_t n,
               int64_t c, int64_t col0, float inv_temp, float cap, int64_t ignore_index) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    float buf[kBlock];
    float dhead[kBlock];  // with a soft-cap: cap * sech^2 of each logit (load_block_capped)
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = labels[row];
      const bool ignored = label == ignore_index;
      const int64_t loc = label - col0;
      const float l = lse[row];
      const float gl = ignored ? 0.f : dlogp[row];
      const float ge = (dent == nullptr || ignored) ? 0.f : dent[row];
      const float h = dent == nullptr ? 0.f : ent[row];
      const T* xr = x + row * sx;
      G* gr = g + row * sg;
      // upstream gradients both zero (a masked token, an ignored label): an exact zero row,
      // written without reading the logits (nothing a masked position holds can leak)
      if (ignored || (gl == 0.f && ge == 0.f)) {
        for (int64_t i = 0; i < c; ++i) gr[i] = G(0.f);
        continue;
      }
      for (int64_t b0 = 0; b0 < c; b0 += kBlock) {
        const int64_t len = std::min(kBlock, c - b0);
        if (cap != 0.f)
          load_block_capped(xr + b0, bias != nullptr ? bias + b0 : nullptr, len, inv_temp, cap, buf,
                            dhead);
        else
          load_block(xr + b0, bias != nullptr ? bias + b0 : nullptr, len, inv_temp, buf);
        const int64_t j = loc - b0;
        const float zl = (j >= 0 && j < len) ? buf[j] : 0.f;
        block_grad(buf, len, l, h, gl, ge, inv_temp, dent != nullptr);
        if (j >= 0 && j < len) {  // the label's column: + dlogp
          const float lv = zl - l;
          const float p = std::exp(lv);
          float v = gl - gl * p;
          if (dent != nullptr) v -= ge * p * (p > 0.f ? lv + h : 0.f);
          buf[j] = v * inv_temp;
        }
        if (cap != 0.f) {
          for (int64_t i = 0; i < len; ++i) gr[b0 + i] = static_cast<G>(buf[i] * dhead[i]);
        } else {
          for (int64_t i = 0; i < len; ++i) gr[b0 + i] = static_cast<G>(buf[i]);
        }
      }
    }
  });
}

void check_tile(const char* op, const at::Tensor& x, const at::Tensor& labels,
                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1),
                    r1k::msg(op), ": x must be a 2-D CPU tensor with contiguous rows, got ", r1k::msg(x.sizes()),
                    " strides ", r1k::msg(x.strides()));
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == x.size(0), r1k::msg(op),
                    ": labels must be [", r1k::msg(x.size(0)), "], got ", r1k::msg(labels.sizes()));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == x.size(1), r1k::msg(op), ": bias must be [",
                      r1k::msg(x.size(1)), "], got ", r1k::msg(bias->sizes()));
  }
}

at::Tensor f32_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::optional<at::Tensor> f32_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional(f32_contiguous(*t)) : std::nullopt;
}

void check_f32(const char* op, const char* name, const at::Tensor& t, int64_t numel) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() >= numel, r1k::msg(op),
                    ": ", r1k::msg(name), " must be a contiguous float32 tensor of at least ", r1k::msg(numel),
                    " elements, got ", r1k::msg(t.scalar_type()), " ", r1k::msg(t.sizes()));
}

// state [4, n] (m, s, t, w) read when accum, written unless final; out [3, n] (logp, entropy,
// lse) written when final. May be the same tensor (a whole-row call uses one buffer).
void logprob_tile_stats_cpu(const at::Tensor& x, const at::Tensor& labels,
                            const std::optional<at::Tensor>& bias, const at::Tensor& state,
                            const at::Tensor& out, int64_t col0, int64_t vocab, double inv_temp,
                            int64_t ignore_index, bool accum, bool final_, bool entropy,
                            double cap) {
  const char* op = "logprob_tile_stats";
  check_tile(op, x, labels, bias);
  const int64_t n = x.size(0), c = x.size(1);
  if (accum || !final_) check_f32(op, "state", state, 4 * n);
  if (final_) check_f32(op, "out", out, 3 * n);
  if (n == 0) return;
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const std::optional<at::Tensor> b = f32_contiguous(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "logprob_tile_stats_cpu", [&] {
    stats_rows<scalar_t>(x.const_data_ptr<scalar_t>(), x.stride(0), y.const_data_ptr<int64_t>(),
                         b.has_value() ? b->const_data_ptr<float>() : nullptr,
                         state.data_ptr<float>(), out.data_ptr<float>(), n, c, col0, vocab,
                         static_cast<float>(inv_temp), static_cast<float>(cap), ignore_index,
                         accum, final_, entropy);
  });
}

// g = dL/dx (g may be x itself, or a 16-bit view over fp32 x's rows: see the top of this file)
void logprob_tile_grad_cpu(const at::Tensor& x, const at::Tensor& g, const at::Tensor& labels,
                           const std::optional<at::Tensor>& bias, const at::Tensor& lse,
                           const std::optional<at::Tensor>& ent, const at::Tensor& dlogp,
                           const std::optional<at::Tensor>& dent, int64_t col0, double inv_temp,
                           int64_t ignore_index, double cap) {
  const char* op = "logprob_tile_grad";
  check_tile(op, x, labels, bias);
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK_VALUE(g.device().is_cpu() && g.dim() == 2 && g.size(0) == n && g.size(1) == c &&
                        (c <= 1 || g.stride(1) == 1),
                    r1k::msg(op), ": g must be a CPU tensor [", r1k::msg(n), ", ", r1k::msg(c),
                    "] with contiguous rows, got ",
                    r1k::msg(g.sizes()), " strides ", r1k::msg(g.strides()));
  TORCH_CHECK_VALUE(dent.has_value() == ent.has_value(), r1k::msg(op), ": ent and dent go together");
  if (n == 0) return;
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const at::Tensor lse_f = f32_contiguous(lse), dlogp_f = f32_contiguous(dlogp);
  const std::optional<at::Tensor> b = f32_contiguous(bias), ent_f = f32_contiguous(ent),
                                  dent_f = f32_contiguous(dent);
  TORCH_CHECK_VALUE(lse_f.numel() == n && dlogp_f.numel() == n, r1k::msg(op), ": lse and dlogp must have ", r1k::msg(n),
                    " elements");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "logprob_tile_grad_cpu", [&] {
    using xt = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "logprob_tile_grad_cpu_g", [&] {
      grad_rows<xt, scalar_t>(x.const_data_ptr<xt>(), x.stride(0), g.data_ptr<scalar_t>(), g.stride(0),
                              y.const_data_ptr<int64_t>(),
                              b.has_value() ? b->const_data_ptr<float>() : nullptr,
                              lse_f.const_data_ptr<float>(),
                              ent_f.has_value() ? ent_f->const_data_ptr<float>() : nullptr,
                              dlogp_f.const_data_ptr<float>(),
                              dent_f.has_value() ? dent_f->const_data_ptr<float>() : nullptr, n, c,
                              col0, static_cast<float>(inv_temp), static_cast<float>(cap),
                              ignore_index);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CPU, m) {
  m.impl("logprob_tile_stats", &logprob_tile_stats_cpu);
  m.impl("logprob_tile_grad", &logprob_tile_grad_cpu);
}

}  // namespace r1k
