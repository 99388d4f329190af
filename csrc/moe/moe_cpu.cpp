// CPU kernels of the MoE ops (routing, its backward, the permutation map and the row moves).
// Same ranking as the CUDA and Triton kernels (moe.h); fp32 math for routing, fp32 (fp64 for
// fp64 data) accumulation for the row combines. Parallel over tokens with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string_view>
#include <vector>

#include "moe/moe.h"
#include "common/check_msg.h"

namespace r1k {
namespace moe {

ScoreFunc parse_score_func(std::string_view s) {
  if (s == "softmax") return ScoreFunc::kSoftmax;
  if (s == "sigmoid") return ScoreFunc::kSigmoid;
  if (s == "sqrtsoftplus") return ScoreFunc::kSqrtSoftplus;
  TORCH_CHECK_VALUE(false, "moe_route: score_func must be 'softmax', 'sigmoid' or 'sqrtsoftplus', got '", r1k::msg(std::string(s)),
                    "'");
}

// Shared argument checks of moe_route (CPU and CUDA bindings).
void check_route_args(const at::Tensor& logits, int64_t top_k, int64_t n_group, int64_t topk_group,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& replay) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "moe_route: router_logits must be 2-D [T, E], got ", r1k::msg(logits.dim()),
                    "-D");
  const auto dt = logits.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                    "moe_route: router_logits must be float32, bfloat16 or float16, got ", r1k::msg(dt));
  const int64_t E = logits.size(1);
  TORCH_CHECK_VALUE(E < (1 << 20), "moe_route: at most 2^20 experts, got E=", r1k::msg(E));
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, "moe_route: top_k must be in [1, E=", r1k::msg(E), "], got ",
                    r1k::msg(top_k));
  TORCH_CHECK_VALUE(n_group >= 1 && E % n_group == 0, "moe_route: n_group must divide E=", r1k::msg(E), ", got ",
                    r1k::msg(n_group));
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group, "moe_route: topk_group must be in [1, n_group=",
                    r1k::msg(n_group), "], got ", r1k::msg(topk_group));
  TORCH_CHECK_VALUE(n_group == 1 || top_k <= topk_group * (E / n_group), "moe_route: top_k=", r1k::msg(top_k),
                    " exceeds the experts of the kept groups (", r1k::msg(topk_group * (E / n_group)), ")");
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == E && bias->scalar_type() == at::kFloat,
                      "moe_route: correction_bias must be float32 [E=", r1k::msg(E), "], got ",
                      r1k::msg(bias->scalar_type()), " ",
                      r1k::msg(bias->sizes()));
    TORCH_CHECK_VALUE(bias->device() == logits.device(), "moe_route: correction_bias must be on ",
                      r1k::msg(logits.device()));
  }
  if (replay) {
    TORCH_CHECK_VALUE(replay->dim() == 2 && replay->size(0) == logits.size(0) && replay->size(1) == top_k,
                      "moe_route: replay_ids must be [T, top_k]=[", r1k::msg(logits.size(0)), ", ",
                      r1k::msg(top_k), "], got ",
                      r1k::msg(replay->sizes()));
    TORCH_CHECK_VALUE(replay->scalar_type() == at::kInt || replay->scalar_type() == at::kLong,
                      "moe_route: replay_ids must be int32 or int64, got ", r1k::msg(replay->scalar_type()));
    TORCH_CHECK_VALUE(replay->device() == logits.device(), "moe_route: replay_ids must be on ",
                      r1k::msg(logits.device()));
  }
}

// IndexError unless every id is in [0, E). One reduction (a device sync on CUDA).
void check_ids_in_range(const char* what, const at::Tensor& ids, int64_t E) {
  if (ids.numel() == 0) return;
  auto mm = at::aminmax(ids);
  const int64_t lo = std::get<0>(mm).item<int64_t>();
  const int64_t hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < E, r1k::msg(what), ": expert ids must be in [0, ", r1k::msg(E), "), got ",
                    r1k::msg(lo < 0 ? lo : hi));
}

void check_map_args(const at::Tensor& ids, int64_t num_experts, int64_t align) {
  TORCH_CHECK_VALUE(ids.dim() == 2, "moe_permute: ids must be 2-D [T, k], got ", r1k::msg(ids.dim()), "-D");
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                    "moe_permute: ids must be int32 or int64, got ", r1k::msg(ids.scalar_type()));
  TORCH_CHECK_VALUE(num_experts >= 1, "moe_permute: num_experts must be >= 1, got ", r1k::msg(num_experts));
  TORCH_CHECK_VALUE(align >= 1, "moe_permute: align must be >= 1, got ", r1k::msg(align));
  TORCH_CHECK_VALUE(ids.numel() + num_experts * (align - 1) < (int64_t{1} << 31),
                    "moe_permute: T*k + E*(align-1) must fit in int32");
}

void check_rows_args(const char* op, const at::Tensor& data, const at::Tensor& row_ids,
                     const std::optional<at::Tensor>& weights) {
  TORCH_CHECK_VALUE(data.dim() == 2, r1k::msg(op), ": data must be 2-D, got ", r1k::msg(data.dim()), "-D");
  TORCH_CHECK_VALUE(row_ids.dim() == 2 && row_ids.scalar_type() == at::kInt, r1k::msg(op),
                    ": row_ids must be int32 [T, k], got ", r1k::msg(row_ids.scalar_type()), " ",
                    r1k::msg(row_ids.sizes()));
  TORCH_CHECK_VALUE(row_ids.device() == data.device(), r1k::msg(op), ": row_ids must be on ", r1k::msg(data.device()));
  if (weights) {
    TORCH_CHECK_VALUE(weights->sizes() == row_ids.sizes(), r1k::msg(op), ": weights must be [T, k]=",
                      r1k::msg(row_ids.sizes()),
                      ", got ", r1k::msg(weights->sizes()));
    TORCH_CHECK_VALUE(weights->is_floating_point() && weights->device() == data.device(), r1k::msg(op),
                      ": weights must be floating point on ", r1k::msg(data.device()));
  }
}

void check_route_backward_args(const at::Tensor& gs, const at::Tensor& ids, const at::Tensor& sel,
                               const std::optional<at::Tensor>& logits, const at::Tensor& lse, int64_t num_experts,
                               at::ScalarType dtype, ScoreFunc sf) {
  TORCH_CHECK_VALUE(gs.dim() == 2 && gs.sizes() == ids.sizes() && sel.sizes() == ids.sizes() && lse.dim() == 1 &&
                        lse.size(0) == gs.size(0),
                    "moe_route_backward: expected gs, ids, sel [T, k] and lse [T]");
  TORCH_CHECK_VALUE(gs.scalar_type() == at::kFloat && sel.scalar_type() == at::kFloat &&
                        lse.scalar_type() == at::kFloat && ids.scalar_type() == at::kInt,
                    "moe_route_backward: gs, sel, lse must be float32 and ids int32");
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "moe_route_backward: dtype must be float32, bfloat16 or float16, got ", r1k::msg(dtype));
  TORCH_CHECK_VALUE(num_experts >= 1, "moe_route_backward: num_experts must be >= 1");
  if (sf == ScoreFunc::kSoftmax) {
    TORCH_CHECK_VALUE(logits.has_value() && logits->dim() == 2 && logits->size(0) == gs.size(0) &&
                          logits->size(1) == num_experts && logits->scalar_type() == dtype,
                      "moe_route_backward: softmax needs the logits [T, num_experts] of dtype ", r1k::msg(dtype));
  }
}

namespace {

// ---- routing ---------------------------------------------------------------------------------

template <typename scalar_t>
void route_rows(const at::Tensor& x, int64_t top_k, ScoreFunc sf, int64_t n_group, int64_t topk_group,
                const float* bias, bool norm, float scale, const int64_t* replay, float* w, int32_t* ids,
                float* sel, float* lse) {
  const int64_t T = x.size(0), E = x.size(1), sx = x.stride(0), sy = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t gs = E / n_group;
  const int take = bias != nullptr ? static_cast<int>(std::min<int64_t>(2, gs)) : 1;
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> s(E);
    std::vector<uint64_t> key(E);
    std::vector<uint64_t> gkey(n_group);
    std::vector<char> kept(n_group);
    for (int64_t t = begin; t < end; ++t) {
      bool row_nan = false;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < E; ++e) {
        const float v = static_cast<float>(xp[t * sx + e * sy]);
        s[e] = v;
        if (v != v) row_nan = true; else mx = std::max(mx, v);
      }
      float row_lse = 0.f;
      if (sf == ScoreFunc::kSigmoid) {
        for (int64_t e = 0; e < E; ++e) s[e] = 1.f / (1.f + std::exp(-s[e]));
      } else if (sf == ScoreFunc::kSqrtSoftplus) {
        for (int64_t e = 0; e < E; ++e) s[e] = sqrt_softplus(s[e]);
      } else {
        float den = 0.f;
        for (int64_t e = 0; e < E; ++e) { s[e] = std::exp(s[e] - mx); den += s[e]; }
        const float inv = 1.f / den;
        for (int64_t e = 0; e < E; ++e) s[e] = row_nan ? NAN : s[e] * inv;
        row_lse = row_nan ? NAN : mx + std::log(den);
      }
      lse[t] = row_lse;
      float* wt = w + t * top_k;
      int32_t* it = ids + t * top_k;
      if (replay != nullptr) {
        for (int64_t j = 0; j < top_k; ++j) it[j] = static_cast<int32_t>(replay[t * top_k + j]);
      } else {
        for (int64_t e = 0; e < E; ++e) {
          const float c = bias ? s[e] + bias[e] : s[e];
          key[e] = rank_key(c, static_cast<int>(e), kTierEligible);
        }
        if (n_group > 1) {
          for (int64_t g = 0; g < n_group; ++g) {
            uint64_t b1 = 0, b2 = 0;  // top-2 keys of the group (0: none)
            for (int64_t e = g * gs; e < (g + 1) * gs; ++e) {
              if (key[e] > b1) { b2 = b1; b1 = key[e]; } else if (key[e] > b2) { b2 = key[e]; }
            }
            auto val = [&](uint64_t k) { const int e = key_index(k); return bias ? s[e] + bias[e] : s[e]; };
            float score = val(b1);
            if (take == 2 && b2 != 0) score += val(b2);
            gkey[g] = rank_key(score, static_cast<int>(g), kTierOutside);
            kept[g] = 0;
          }
          for (int64_t r = 0; r < topk_group; ++r) {
            int64_t best = -1;
            for (int64_t g = 0; g < n_group; ++g)
              if (!kept[g] && (best < 0 || gkey[g] > gkey[best])) best = g;
            kept[best] = 1;
          }
          for (int64_t e = 0; e < E; ++e) {
            const bool nan = (key[e] >> kTierShift) == kTierNaN;
            if (!nan && !kept[e / gs]) key[e] = (key[e] & ((uint64_t{1} << kTierShift) - 1)) | (kTierOutside << kTierShift);
          }
        }
        for (int64_t j = 0; j < top_k; ++j) {
          int64_t best = 0;
          for (int64_t e = 1; e < E; ++e) if (key[e] > key[best]) best = e;
          it[j] = static_cast<int32_t>(best);
          key[best] = 0;
        }
      }
      float sum = 0.f;
      for (int64_t j = 0; j < top_k; ++j) { sel[t * top_k + j] = s[it[j]]; sum += s[it[j]]; }
      const float mul = norm ? scale / (sum + 1e-20f) : scale;
      for (int64_t j = 0; j < top_k; ++j) wt[j] = s[it[j]] * mul;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cpu(
    const at::Tensor& logits, int64_t top_k, std::string_view score_func, int64_t n_group, int64_t topk_group,
    const std::optional<at::Tensor>& bias, bool norm, double scale, const std::optional<at::Tensor>& replay_ids) {
  check_route_args(logits, top_k, n_group, topk_group, bias, replay_ids);
  const ScoreFunc sf = parse_score_func(score_func);
  const int64_t T = logits.size(0), E = logits.size(1);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor w = at::empty({T, top_k}, f32), sel = at::empty({T, top_k}, f32), lse = at::empty({T}, f32);
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  at::Tensor rep;
  if (replay_ids) {
    check_ids_in_range("moe_route: replay_ids", *replay_ids, E);
    rep = replay_ids->to(at::kLong).contiguous();
  }
  at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_route_cpu", [&] {
    route_rows<scalar_t>(logits, top_k, sf, n_group, topk_group, bias ? b.data_ptr<float>() : nullptr, norm,
                         static_cast<float>(scale), replay_ids ? rep.data_ptr<int64_t>() : nullptr,
                         w.data_ptr<float>(), ids.data_ptr<int32_t>(), sel.data_ptr<float>(), lse.data_ptr<float>());
  });
  return {w, ids, sel, lse};
}

// dx from gs = dL/ds[ids] (see r1kernels/ops/moe.py): sigmoid puts gs*s*(1-s) at the ids,
// sqrtsoftplus gs*ds/dx (from s: sqrt_softplus_grad); softmax
// gives s_e (G_e - sum_e' G_e' s_e').
at::Tensor moe_route_backward_cpu(const at::Tensor& gs, const at::Tensor& ids, const at::Tensor& sel,
                                  const std::optional<at::Tensor>& logits, const at::Tensor& lse, int64_t num_experts,
                                  at::ScalarType dtype, std::string_view score_func) {
  const ScoreFunc sf = parse_score_func(score_func);
  check_route_backward_args(gs, ids, sel, logits, lse, num_experts, dtype, sf);
  const int64_t T = gs.size(0), E = num_experts, K = ids.size(1);
  at::Tensor g = gs.contiguous(), i = ids.contiguous(), sv = sel.contiguous(), l = lse.contiguous();
  at::Tensor x = logits ? logits->contiguous() : at::empty({0}, gs.options().dtype(dtype));
  at::Tensor dx = at::empty({T, E}, gs.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "moe_route_backward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    const float* gp = g.data_ptr<float>();
    const float* sp = sv.data_ptr<float>();
    const float* lp = l.data_ptr<float>();
    const int32_t* ip = i.data_ptr<int32_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> G(E);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(G.begin(), G.end(), 0.f);
        for (int64_t j = 0; j < K; ++j) {
          const int32_t e = ip[t * K + j];
          if (e < 0 || e >= E) continue;
          float v = gp[t * K + j];
          if (sf == ScoreFunc::kSigmoid) v *= sp[t * K + j] * (1.f - sp[t * K + j]);
          if (sf == ScoreFunc::kSqrtSoftplus) v *= sqrt_softplus_grad(sp[t * K + j]);
          G[e] += v;
        }
        if (sf != ScoreFunc::kSoftmax) {
          for (int64_t e = 0; e < E; ++e) dp[t * E + e] = static_cast<scalar_t>(G[e]);
        } else {
          float d = 0.f;
          for (int64_t j = 0; j < K; ++j) {
            const int32_t e = ip[t * K + j];
            if (e >= 0 && e < E) d += gp[t * K + j] * std::exp(static_cast<float>(xp[t * E + e]) - lp[t]);
          }
          for (int64_t e = 0; e < E; ++e) {
            const float s = std::exp(static_cast<float>(xp[t * E + e]) - lp[t]);
            dp[t * E + e] = static_cast<scalar_t>(s * (G[e] - d));
          }
        }
      }
    });
  });
  return dx;
}

// ---- permutation map --------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_map_cpu(const at::Tensor& ids,
                                                                                int64_t num_experts, int64_t align) {
  check_map_args(ids, num_experts, align);
  check_ids_in_range("moe_permute: ids", ids, num_experts);
  const int64_t T = ids.size(0), K = ids.size(1), N = T * K, E = num_experts;
  at::Tensor flat = ids.to(at::kLong).contiguous();
  const int64_t* ip = flat.data_ptr<int64_t>();
  auto i32 = ids.options().dtype(at::kInt);
  at::Tensor counts = at::zeros({E}, i32), offsets = at::empty({E + 1}, i32);
  at::Tensor row_ids = at::empty({T, K}, i32);
  at::Tensor token_ids = at::full({N + E * (align - 1)}, -1, i32);
  int32_t* cp = counts.data_ptr<int32_t>();
  int32_t* op = offsets.data_ptr<int32_t>();
  int32_t* rp = row_ids.data_ptr<int32_t>();
  int32_t* tp = token_ids.data_ptr<int32_t>();
  for (int64_t i = 0; i < N; ++i) cp[ip[i]] += 1;
  op[0] = 0;
  for (int64_t e = 0; e < E; ++e) op[e + 1] = op[e] + static_cast<int32_t>((cp[e] + align - 1) / align * align);
  std::vector<int32_t> cursor(op, op + E);
  for (int64_t i = 0; i < N; ++i) {  // flat order = token, then slot: stable by construction
    const int32_t r = cursor[ip[i]]++;
    rp[i] = r;
    tp[r] = static_cast<int32_t>(i / K);
  }
  return {counts, offsets, row_ids, token_ids};
}

// ---- row moves --------------------------------------------------------------------------------

// out[row(t, j)] = x[t] (* w[t, j]); rows with token_ids < 0 are zero.
at::Tensor moe_scatter_rows_cpu(const at::Tensor& x, const at::Tensor& row_ids, const at::Tensor& token_ids,
                                const at::Tensor& counts, const at::Tensor& offsets,
                                const std::optional<at::Tensor>& weights) {
  check_rows_args("moe_scatter_rows", x, row_ids, weights);
  TORCH_CHECK_VALUE(row_ids.size(0) == x.size(0), "moe_scatter_rows: row_ids must have ", r1k::msg(x.size(0)), " rows");
  const int64_t T = x.size(0), H = x.size(1), K = row_ids.size(1), R = token_ids.size(0);
  at::Tensor xc = x.contiguous(), rc = row_ids.contiguous(), tc = token_ids.to(at::kInt).contiguous();
  at::Tensor wc = weights ? weights->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({R, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_scatter_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int32_t* rp = rc.data_ptr<int32_t>();
    const int32_t* tp = tc.data_ptr<int32_t>();
    const float* wp = weights ? wc.data_ptr<float>() : nullptr;
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t j = 0; j < K; ++j) {
          const int64_t r = rp[t * K + j];
          if (r < 0 || r >= R) continue;
          scalar_t* dst = op + r * H;
          const scalar_t* src = xp + t * H;
          if (wp) {
            const acc_t wj = wp[t * K + j];
            for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(static_cast<acc_t>(src[h]) * wj);
          } else {
            std::copy(src, src + H, dst);
          }
        }
      }
    });
    at::parallel_for(0, R, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        if (tp[r] < 0) std::fill(op + r * H, op + (r + 1) * H, static_cast<scalar_t>(0));
    });
  });
  return out;
}

// y[t] = sum_j w[t, j] * src[row(t, j)] (w = 1 when absent), accumulated in opmath (fp32/fp64).
at::Tensor moe_unpermute_cpu(const at::Tensor& src, const at::Tensor& row_ids,
                               const std::optional<at::Tensor>& weights) {
  check_rows_args("moe_unpermute", src, row_ids, weights);
  const int64_t T = row_ids.size(0), K = row_ids.size(1), H = src.size(1), R = src.size(0);
  if (row_ids.numel() > 0) {
    auto mm = at::aminmax(row_ids);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < R, "moe_unpermute: perm.row_ids must be in [0, ", r1k::msg(R),
                      ") (the rows of expert_out), got ", r1k::msg(lo < 0 ? lo : hi));
  }
  at::Tensor sc = src.contiguous(), rc = row_ids.contiguous();
  at::Tensor wc = weights ? weights->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({T, H}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "moe_unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = sc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int32_t* rp = rc.data_ptr<int32_t>();
    const float* wp = weights ? wc.data_ptr<float>() : nullptr;
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(H);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < K; ++j) {
          const int64_t r = rp[t * K + j];
          if (r < 0 || r >= R) continue;
          const acc_t wj = wp ? static_cast<acc_t>(wp[t * K + j]) : acc_t(1);
          const scalar_t* row = sp + r * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<acc_t>(row[h]);
        }
        for (int64_t h = 0; h < H; ++h) op[t * H + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

// dw[t, j] = <gy[t], src[row(t, j)]> in opmath, returned as float32.
at::Tensor moe_rows_dot_cpu(const at::Tensor& gy, const at::Tensor& src, const at::Tensor& row_ids) {
  check_rows_args("moe_rows_dot", src, row_ids, std::nullopt);
  TORCH_CHECK_VALUE(gy.dim() == 2 && gy.size(0) == row_ids.size(0) && gy.size(1) == src.size(1) &&
                        gy.scalar_type() == src.scalar_type(),
                    "moe_rows_dot: gy must be [T, H] with src's dtype");
  const int64_t T = row_ids.size(0), K = row_ids.size(1), H = src.size(1), R = src.size(0);
  at::Tensor gc = gy.contiguous(), sc = src.contiguous(), rc = row_ids.contiguous();
  at::Tensor out = at::zeros({T, K}, src.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "moe_rows_dot_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* sp = sc.data_ptr<scalar_t>();
    const int32_t* rp = rc.data_ptr<int32_t>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t j = 0; j < K; ++j) {
          const int64_t r = rp[t * K + j];
          if (r < 0 || r >= R) continue;
          acc_t acc = 0;
          for (int64_t h = 0; h < H; ++h) acc += static_cast<acc_t>(gp[t * H + h]) * static_cast<acc_t>(sp[r * H + h]);
          op[t * K + j] = static_cast<float>(acc);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& hidden,
                                                                                const at::Tensor& ids,
                                                                                int64_t num_experts, int64_t align) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && ids.dim() == 2 && hidden.size(0) == ids.size(0),
                    "moe_permute: expected hidden [T, H] and ids [T, k], got ", r1k::msg(hidden.sizes()),
                    " and ", r1k::msg(ids.sizes()));
  auto [counts, offsets, row_ids, token_ids] = moe_permute_map_cpu(ids, num_experts, align);
  at::Tensor out = moe_scatter_rows_cpu(hidden, row_ids, token_ids, counts, offsets, std::nullopt);
  return {out, counts, offsets, row_ids, token_ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CPU, m) {
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_route_backward", &moe_route_backward_cpu);
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_scatter_rows", &moe_scatter_rows_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("moe_rows_dot", &moe_rows_dot_cpu);
}

}  // namespace moe
}  // namespace r1k
