// Torch bindings of the MoE CUDA kernels (compiled only in CUDA builds).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string_view>

#include "moe/moe.h"
#include "common/check_msg.h"

namespace r1k {
namespace moe {

// moe_cpu.cpp
ScoreFunc parse_score_func(std::string_view s);
void check_route_args(const at::Tensor& logits, int64_t top_k, int64_t n_group, int64_t topk_group,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& replay);
void check_ids_in_range(const char* what, const at::Tensor& ids, int64_t E);
void check_route_backward_args(const at::Tensor& gs, const at::Tensor& ids, const at::Tensor& sel,
                               const std::optional<at::Tensor>& logits, const at::Tensor& lse, int64_t num_experts,
                               at::ScalarType dtype, ScoreFunc sf);
void check_map_args(const at::Tensor& ids, int64_t num_experts, int64_t align);
void check_rows_args(const char* op, const at::Tensor& data, const at::Tensor& row_ids,
                     const std::optional<at::Tensor>& weights);

// moe_route.cu / moe_permute.cu
cudaError_t moe_route_cuda_launch(int dtype, const void* x, int64_t T_, int E, int64_t stride, int top_k,
                                  int score_func, int n_group, int topk_group, const float* bias, int norm,
                                  float scale, const int64_t* replay, float* w, int32_t* ids, float* sel,
                                  float* lse, cudaStream_t stream);
cudaError_t moe_route_backward_cuda_launch(int dtype, const float* gs, const int32_t* ids, const float* sel,
                                           const void* x, const float* lse, void* dx, int64_t T_, int E, int K,
                                           int score_func, cudaStream_t stream);
cudaError_t moe_permute_map_cuda_launch(const int32_t* ids, int64_t N, int K, int E, int align, int32_t* rank,
                                        int32_t* counts, int32_t* offsets, int32_t* row_ids, int32_t* token_ids,
                                        int64_t R, cudaStream_t stream);
cudaError_t moe_scatter_rows_cuda_launch(int dtype, const void* x, int64_t stride_x, const int32_t* row_ids,
                                         const int32_t* counts, const int32_t* offsets, const float* w, void* out,
                                         int64_t T_, int64_t H, int K, int E, int64_t R, cudaStream_t stream);
cudaError_t moe_gather_rows_cuda_launch(int dtype, const void* src, const int32_t* row_ids, const float* w, void* out,
                                        int64_t T_, int64_t H, int K, int64_t R, cudaStream_t stream);
cudaError_t moe_rows_dot_cuda_launch(int dtype, const void* gy, const void* src, const int32_t* row_ids, float* out,
                                     int64_t T_, int64_t H, int K, int64_t R, cudaStream_t stream);

namespace {

int dtype_tag(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK_VALUE(false, r1k::msg(op), ": unsupported dtype ", r1k::msg(t));
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, r1k::msg(op), ": CUDA launch failed: ", r1k::msg(cudaGetErrorString(err)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(
    const at::Tensor& logits, int64_t top_k, std::string_view score_func, int64_t n_group, int64_t topk_group,
    const std::optional<at::Tensor>& bias, bool norm, double scale, const std::optional<at::Tensor>& replay_ids) {
  check_route_args(logits, top_k, n_group, topk_group, bias, replay_ids);
  const ScoreFunc sf = parse_score_func(score_func);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK_VALUE(E <= kMaxKernelExperts && top_k <= kMaxKernelTopK, "moe_route: the CUDA kernel takes E <= ",
                    r1k::msg(kMaxKernelExperts), " and top_k <= ", r1k::msg(kMaxKernelTopK), ", got E=",
                    r1k::msg(E), ", top_k=", r1k::msg(top_k));
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor x = logits.stride(1) == 1 ? logits : logits.contiguous();
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor w = at::empty({T, top_k}, f32), sel = at::empty({T, top_k}, f32), lse = at::empty({T}, f32);
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  at::Tensor rep, b;
  if (replay_ids) {
    check_ids_in_range("moe_route: replay_ids", *replay_ids, E);
    rep = replay_ids->to(at::kLong).contiguous();
  }
  if (bias) b = bias->contiguous();
  check_launch(moe_route_cuda_launch(dtype_tag(x.scalar_type(), "moe_route"), x.data_ptr(), T, static_cast<int>(E),
                                     x.stride(0), static_cast<int>(top_k), static_cast<int>(sf),
                                     static_cast<int>(n_group), static_cast<int>(topk_group),
                                     bias ? b.data_ptr<float>() : nullptr, norm ? 1 : 0, static_cast<float>(scale),
                                     replay_ids ? rep.data_ptr<int64_t>() : nullptr, w.data_ptr<float>(),
                                     ids.data_ptr<int32_t>(), sel.data_ptr<float>(), lse.data_ptr<float>(),
                                     at::cuda::getCurrentCUDAStream()),
               "moe_route");
  return {w, ids, sel, lse};
}

at::Tensor moe_route_backward_cuda(const at::Tensor& gs, const at::Tensor& ids, const at::Tensor& sel,
                                   const std::optional<at::Tensor>& logits, const at::Tensor& lse, int64_t num_experts,
                                   at::ScalarType dtype, std::string_view score_func) {
  const ScoreFunc sf = parse_score_func(score_func);
  check_route_backward_args(gs, ids, sel, logits, lse, num_experts, dtype, sf);
  const c10::cuda::CUDAGuard guard(gs.device());
  at::Tensor x = logits ? logits->contiguous() : at::Tensor();
  at::Tensor dx = at::empty({gs.size(0), num_experts}, gs.options().dtype(dtype));
  at::Tensor g = gs.contiguous(), i = ids.contiguous(), s = sel.contiguous(), l = lse.contiguous();
  check_launch(moe_route_backward_cuda_launch(dtype_tag(dtype, "moe_route_backward"), g.data_ptr<float>(),
                                              i.data_ptr<int32_t>(), s.data_ptr<float>(),
                                              logits ? x.data_ptr() : nullptr, l.data_ptr<float>(), dx.data_ptr(),
                                              gs.size(0), static_cast<int>(num_experts), static_cast<int>(ids.size(1)),
                                              static_cast<int>(sf), at::cuda::getCurrentCUDAStream()),
               "moe_route_backward");
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_map_cuda(const at::Tensor& ids,
                                                                                 int64_t num_experts, int64_t align) {
  check_map_args(ids, num_experts, align);
  check_ids_in_range("moe_permute: ids", ids, num_experts);
  const c10::cuda::CUDAGuard guard(ids.device());
  const int64_t T = ids.size(0), K = ids.size(1), N = T * K, E = num_experts, R = N + E * (align - 1);
  at::Tensor flat = ids.reshape({-1}).to(at::kInt).contiguous();
  auto i32 = ids.options().dtype(at::kInt);
  at::Tensor counts = at::empty({E}, i32), offsets = at::empty({E + 1}, i32);
  at::Tensor rank = at::empty({N}, i32), row_ids = at::empty({T, K}, i32), token_ids = at::empty({R}, i32);
  check_launch(moe_permute_map_cuda_launch(flat.data_ptr<int32_t>(), N, static_cast<int>(K), static_cast<int>(E),
                                           static_cast<int>(align), rank.data_ptr<int32_t>(),
                                           counts.data_ptr<int32_t>(),
                                           offsets.data_ptr<int32_t>(), row_ids.data_ptr<int32_t>(),
                                           token_ids.data_ptr<int32_t>(), R, at::cuda::getCurrentCUDAStream()),
               "moe_permute_map");
  return {counts, offsets, row_ids, token_ids};
}

at::Tensor moe_scatter_rows_cuda(const at::Tensor& x, const at::Tensor& row_ids, const at::Tensor& token_ids,
                                 const at::Tensor& counts, const at::Tensor& offsets,
                                 const std::optional<at::Tensor>& weights) {
  check_rows_args("moe_scatter_rows", x, row_ids, weights);
  TORCH_CHECK_VALUE(row_ids.size(0) == x.size(0), "moe_scatter_rows: row_ids must have ", r1k::msg(x.size(0)), " rows");
  TORCH_CHECK_VALUE(counts.scalar_type() == at::kInt && offsets.scalar_type() == at::kInt &&
                        offsets.numel() == counts.numel() + 1,
                    "moe_scatter_rows: counts [E] and offsets [E + 1] must be int32");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor rc = row_ids.contiguous(), cc = counts.contiguous(), oc = offsets.contiguous();
  at::Tensor wc = weights ? weights->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t R = token_ids.size(0);
  at::Tensor out = at::empty({R, x.size(1)}, x.options());
  check_launch(moe_scatter_rows_cuda_launch(dtype_tag(x.scalar_type(), "moe_scatter_rows"), xc.data_ptr(),
                                            xc.stride(0), rc.data_ptr<int32_t>(), cc.data_ptr<int32_t>(),
                                            oc.data_ptr<int32_t>(), weights ? wc.data_ptr<float>() : nullptr,
                                            out.data_ptr(), x.size(0), x.size(1), static_cast<int>(row_ids.size(1)),
                                            static_cast<int>(counts.numel()), R, at::cuda::getCurrentCUDAStream()),
               "moe_scatter_rows");
  return out;
}

at::Tensor moe_unpermute_cuda(const at::Tensor& src, const at::Tensor& row_ids,
                                const std::optional<at::Tensor>& weights) {
  check_rows_args("moe_unpermute", src, row_ids, weights);
  const c10::cuda::CUDAGuard guard(src.device());
  at::Tensor sc = src.contiguous(), rc = row_ids.contiguous();
  at::Tensor wc = weights ? weights->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t T = row_ids.size(0), K = row_ids.size(1);
  at::Tensor out = K == 0 ? at::zeros({T, src.size(1)}, src.options()) : at::empty({T, src.size(1)}, src.options());
  if (K > 0) {
    check_launch(moe_gather_rows_cuda_launch(dtype_tag(src.scalar_type(), "moe_unpermute"), sc.data_ptr(),
                                             rc.data_ptr<int32_t>(), weights ? wc.data_ptr<float>() : nullptr,
                                             out.data_ptr(), T, src.size(1), static_cast<int>(K), src.size(0),
                                             at::cuda::getCurrentCUDAStream()),
                 "moe_unpermute");
  }
  return out;
}

at::Tensor moe_rows_dot_cuda(const at::Tensor& gy, const at::Tensor& src, const at::Tensor& row_ids) {
  check_rows_args("moe_rows_dot", src, row_ids, std::nullopt);
  TORCH_CHECK_VALUE(gy.dim() == 2 && gy.size(0) == row_ids.size(0) && gy.size(1) == src.size(1) &&
                        gy.scalar_type() == src.scalar_type(),
                    "moe_rows_dot: gy must be [T, H] with src's dtype");
  const c10::cuda::CUDAGuard guard(src.device());
  at::Tensor gc = gy.contiguous(), sc = src.contiguous(), rc = row_ids.contiguous();
  at::Tensor out = at::zeros({row_ids.size(0), row_ids.size(1)}, src.options().dtype(at::kFloat));
  check_launch(moe_rows_dot_cuda_launch(dtype_tag(src.scalar_type(), "moe_rows_dot"), gc.data_ptr(), sc.data_ptr(),
                                        rc.data_ptr<int32_t>(), out.data_ptr<float>(), row_ids.size(0), src.size(1),
                                        static_cast<int>(row_ids.size(1)), src.size(0),
                                        at::cuda::getCurrentCUDAStream()),
               "moe_rows_dot");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& hidden,
                                                                                 const at::Tensor& ids,
                                                                                 int64_t num_experts, int64_t align) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && ids.dim() == 2 && hidden.size(0) == ids.size(0),
                    "moe_permute: expected hidden [T, H] and ids [T, k], got ", r1k::msg(hidden.sizes()),
                    " and ", r1k::msg(ids.sizes()));
  TORCH_CHECK_VALUE(hidden.device() == ids.device(), "moe_permute: ids must be on ", r1k::msg(hidden.device()));
  auto [counts, offsets, row_ids, token_ids] = moe_permute_map_cuda(ids, num_experts, align);
  at::Tensor out = moe_scatter_rows_cuda(hidden, row_ids, token_ids, counts, offsets, std::nullopt);
  return {out, counts, offsets, row_ids, token_ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CUDA, m) {
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_route_backward", &moe_route_backward_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_scatter_rows", &moe_scatter_rows_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
  m.impl("moe_rows_dot", &moe_rows_dot_cuda);
}

}  // namespace moe
}  // namespace r1k
