// CPU kernel for sample_tokens (r1kernels/ops/sample_tokens.py has the rule). One row per task:
// z = logits / temperature in fp32, online max and sum of exp; the filters select a prefix of
// the order (z descending, id ascending) with nth_element (top_k) and a sort of the survivors
// (top_p only); the token is the inverse CDF in id order of the kept mass at the row's uniform,
// with the running sums in fp64. Plain temperature sampling reads the row twice and sorts nothing.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/check_msg.h"

namespace r1k {
namespace {

template <typename scalar_t>
void sample_row(const scalar_t* x, int64_t V, float temp, float u, int64_t top_k, double top_p,
                double min_p, bool greedy, std::vector<float>& z, std::vector<int32_t>& cand,
                std::vector<char>& keep, int64_t* tok_out, float* logp_out) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float m = -kInf;
  int64_t arg = 0, n = 0;
  for (int64_t i = 0; i < V; ++i) {
    const float v = static_cast<float>(x[i]) / temp;
    const bool ok = std::isfinite(v);
    z[i] = ok ? v : -kInf;
    n += ok;
    if (ok && v > m) {
      m = v;
      arg = i;
    }
  }
  if (n == 0) {
    *tok_out = 0;
    *logp_out = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  double s = 0.0;
  for (int64_t i = 0; i < V; ++i) s += std::exp(z[i] - m);  // -inf gives 0
  const float lse = m + static_cast<float>(std::log(s));
  int64_t tok = arg;
  if (!greedy) {
    auto p = [&](int64_t i) { return std::exp(z[i] - m); };
    const bool filter_k = top_k > 0 && top_k < n, filter_p = top_p < 1.0, filter_m = min_p > 0.0;
    double target;
    if (filter_k || filter_p) {
      cand.clear();
      for (int64_t i = 0; i < V; ++i)
        if (z[i] > -kInf) cand.push_back(static_cast<int32_t>(i));
      auto before = [&](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };
      if (filter_k) {
        std::nth_element(cand.begin(), cand.begin() + (top_k - 1), cand.end(), before);
        cand.resize(top_k);
      }
      if (filter_p) {
        std::sort(cand.begin(), cand.end(), before);
        double mass = 0.0;
        for (int32_t i : cand) mass += p(i);
        const double goal = top_p * mass;
        double cum = 0.0;
        size_t j = 0;
        while (j < cand.size() && cum < goal) cum += p(cand[j++]);  // shortest prefix >= goal
        cand.resize(std::max<size_t>(j, 1));
      }
      std::fill(keep.begin(), keep.end(), 0);
      for (int32_t i : cand) keep[i] = 1;
    } else {
      for (int64_t i = 0; i < V; ++i) keep[i] = z[i] > -kInf;
    }
    double mass = 0.0;
    for (int64_t i = 0; i < V; ++i) {
      const float pi = p(i);
      keep[i] = keep[i] && !(filter_m && pi < min_p);
      mass += keep[i] ? pi : 0.0;
    }
    target = static_cast<double>(u) * mass;
    double cum = 0.0;
    tok = -1;
    int64_t last = arg;
    for (int64_t i = 0; i < V; ++i) {
      if (!keep[i]) continue;
      last = i;
      cum += p(i);
      if (cum > target) {
        tok = i;
        break;
      }
    }
    if (tok < 0) tok = last;  // u * mass rounded past the last kept token
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
      std::vector<float> z(V);
      std::vector<int32_t> cand;
      std::vector<char> keep(V);
      for (int64_t b = begin; b < end; ++b)
        sample_row(xp + b * V, V, temp, up[b], top_k, top_p, min_p, greedy, z, cand, keep, tp + b, lp + b);
    });
  });
  return {tok, logp};
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CPU, m) { m.impl("sample_tokens", &sample_tokens_cpu); }

}  // namespace r1k
