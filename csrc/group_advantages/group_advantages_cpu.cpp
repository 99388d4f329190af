// CPU kernel for group_advantages: one pass per group for count/sum/min/max, one for the
// squared deviations, one to write. Values in fp32; the two sums accumulate in fp64: a running
// fp32 sum over a long group or the whole batch (scale="batch": every reward) loses the low
// bits of each term (65536 rewards near 10: advantages off by 0.8), where the GPU kernels'
// tree reductions do not.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <string_view>

#include "group_advantages/group_advantages.h"
#include "common/check_msg.h"

namespace r1k {

AdvScale parse_adv_scale(std::string_view scale) {
  if (scale == "group") return AdvScale::kGroup;
  if (scale == "batch") return AdvScale::kBatch;
  if (scale == "none") return AdvScale::kNone;
  TORCH_CHECK_VALUE(false, "group_advantages: scale must be 'group', 'batch' or 'none', got '",
                    r1k::msg(std::string(scale)), "'");
}

namespace {

struct Moments {
  int64_t n = 0;
  double sum = 0.0;
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
};

// Branch-free loops over the group (vectorizable): NaN rewards contribute nothing.
Moments moments(const float* r, int64_t n) {
  Moments m;
  int64_t count = 0;
  double sum = 0.0;
  float lo = m.lo, hi = m.hi;
  for (int64_t i = 0; i < n; ++i) {
    const float v = r[i];
    const bool ok = v == v;
    count += ok;
    sum += ok ? static_cast<double>(v) : 0.0;
    lo = std::min(lo, ok ? v : std::numeric_limits<float>::infinity());
    hi = std::max(hi, ok ? v : -std::numeric_limits<float>::infinity());
  }
  m.n = count;
  m.sum = sum;
  m.lo = lo;
  m.hi = hi;
  return m;
}

double sum_sq_dev(const float* r, int64_t n, double mean) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = r[i];
    const double d = v == v ? static_cast<double>(v) - mean : 0.0;
    s += d * d;
  }
  return s;
}

at::Tensor group_advantages_cpu(const at::Tensor& rewards, int64_t group_size,
                                std::string_view scale, double eps) {
  TORCH_CHECK_VALUE(rewards.dim() == 1, "group_advantages: rewards must be 1-D [P * G], got ",
                    r1k::msg(rewards.dim()), "-D");
  TORCH_CHECK_VALUE(rewards.scalar_type() == at::kFloat,
                    "group_advantages: rewards must be float32, got ", r1k::msg(rewards.scalar_type()));
  TORCH_CHECK_VALUE(group_size >= 1, "group_advantages: group_size must be >= 1, got ", r1k::msg(group_size));
  const int64_t total = rewards.numel();
  TORCH_CHECK_VALUE(total % group_size == 0, "group_advantages: rewards.numel() (", r1k::msg(total),
                    ") is not a multiple of group_size (", r1k::msg(group_size), ")");
  const AdvScale mode = parse_adv_scale(scale);

  at::Tensor r = rewards.contiguous();
  at::Tensor out = at::empty_like(r);
  const float* rp = r.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t G = group_size;
  const int64_t P = total / G;

  double batch_std = 0.0;
  if (mode == AdvScale::kBatch && total > 0) {
    const Moments m = moments(rp, total);
    const double mean = m.n > 0 ? m.sum / m.n : 0.0;
    batch_std = m.n > 1 ? std::sqrt(sum_sq_dev(rp, total, mean) / (m.n - 1)) : 0.0;
  }

  at::parallel_for(0, P, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* rg = rp + p * G;
      float* og = op + p * G;
      const Moments m = moments(rg, G);
      const bool constant = m.n <= 1 || m.lo == m.hi;
      const double mean = m.n > 0 ? m.sum / m.n : 0.0;
      double denom = 1.0;
      if (!constant && mode == AdvScale::kGroup) {
        denom = std::sqrt(sum_sq_dev(rg, G, mean) / (m.n - 1)) + eps;
      } else if (mode == AdvScale::kBatch) {
        denom = batch_std + eps;
      }
      for (int64_t i = 0; i < G; ++i) {
        const float v = rg[i];
        og[i] = (constant || v != v) ? 0.0f : static_cast<float>((v - mean) / denom);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CPU, m) { m.impl("group_advantages", &group_advantages_cpu); }

}  // namespace r1k
