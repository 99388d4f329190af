// Torch binding of the cluster kernel of fused_logits_cluster.cu (compiled only in CUDA builds).
// The Python launcher (r1kernels/ops/token_logprobs.py, fused_cluster) prepares the inputs; the
// checks here keep a wrong call from reaching the kernel (a ValueError, never a bad access).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "common/check_msg.h"
#include "token_logprobs/fused_logits_cluster.h"

namespace r1k {

cudaError_t fused_logits_cluster_launch(const FusedLogitsParams& p, int in_dtype, int out_dtype,
                                        int mode, int cluster, int threads, int variant,
                                        cudaStream_t stream);
int fused_logits_cluster_vpt(int64_t V, int elem_bytes, int cluster, int threads,
                             int64_t* seg_out);

namespace {

constexpr const char* kOp = "fused_logits_cluster";

int dtype_tag(at::ScalarType t) {
  return t == at::kFloat ? static_cast<int>(LogitsDType::kFloat32)
                         : (t == at::kBFloat16 ? static_cast<int>(LogitsDType::kBFloat16)
                                               : static_cast<int>(LogitsDType::kFloat16));
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 3, kOp, ": ", name, " must be [B, T, V], got ", r1k::msg(x.dim()), "-D");
  TORCH_CHECK_VALUE(x.is_cuda(), kOp, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK_VALUE(x.stride(2) == 1 && x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 &&
                        reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
                    kOp, ": ", name, "'s rows must start on 16-byte boundaries with a contiguous "
                    "last dim, got strides ", r1k::msg(x.strides()));
}

const float* f32_rows(const std::optional<at::Tensor>& t, int64_t numel, const at::Tensor& like,
                      const char* name, bool required) {
  if (!t.has_value()) {
    TORCH_CHECK_VALUE(!required, kOp, ": ", name, " is required");
    return nullptr;
  }
  TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel &&
                        t->device() == like.device(),
                    kOp, ": ", name, " must be a contiguous float32 tensor of ", r1k::msg(numel),
                    " elements on ", r1k::msg(like.device()), ", got ", r1k::msg(t->scalar_type()), " ",
                    r1k::msg(t->sizes()));
  return t->data_ptr<float>();
}

void fused_logits_cluster_cuda(const at::Tensor& x, const at::Tensor& g, const at::Tensor& labels,
                               const at::Tensor& out, const std::optional<at::Tensor>& glp,
                               const std::optional<at::Tensor>& gent,
                               const std::optional<at::Tensor>& adv,
                               const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& old,
                               const std::optional<at::Tensor>& ref,
                               const std::optional<at::Tensor>& rw,
                               const std::optional<at::Tensor>& scale, double inv_temp,
                               int64_t ignore_index, bool entropy, int64_t loss, double eps_lo,
                               double eps_hi, std::optional<double> delta, double beta,
                               bool bias_kl, double tau_pos, double tau_neg, int64_t cluster,
                               int64_t threads, int64_t variant, double cap) {
  check_rows(x, "x");
  check_rows(g, "g");
  const bool x16 = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  TORCH_CHECK_VALUE(x16 || x.scalar_type() == at::kFloat, kOp,
                    ": x must be bfloat16, float16 or float32, got ", r1k::msg(x.scalar_type()));
  TORCH_CHECK_VALUE(g.sizes() == x.sizes() && g.device() == x.device() &&
                        (x16 ? g.scalar_type() == x.scalar_type()
                             : (g.scalar_type() == at::kBFloat16 || g.scalar_type() == at::kHalf)),
                    kOp, ": g must match x (", r1k::msg(x.sizes()), ", ", r1k::msg(x.scalar_type()),
                    "; a bfloat16 or float16 gradient of float32 logits), got ", r1k::msg(g.sizes()), ", ",
                    r1k::msg(g.scalar_type()));
  const int elem = x16 ? 2 : 4;
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2), n = B * T;
  TORCH_CHECK_VALUE(V % 8 == 0, kOp, ": the vocabulary must be a multiple of 8, got ", r1k::msg(V));
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                        labels.numel() == n && labels.device() == x.device(),
                    kOp, ": labels must be contiguous int64 [", r1k::msg(n), "] on ", r1k::msg(x.device()));
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 &&
                        out.size(0) == 3 && out.size(1) == n && out.device() == x.device(),
                    kOp, ": out must be contiguous float32 [3, ", r1k::msg(n), "]");
  TORCH_CHECK_VALUE(cluster >= 1 && cluster <= 16 && (cluster & (cluster - 1)) == 0, kOp,
                    ": cluster must be 1, 2, 4, 8 or 16, got ", r1k::msg(cluster));
  TORCH_CHECK_VALUE(threads == 256 || threads == 512, kOp, ": threads must be 256 or 512, got ",
                    r1k::msg(threads));
  TORCH_CHECK_VALUE(variant == kVariantRegisters || variant == kVariantPersistent, kOp,
                    ": variant must be 0 (rows in registers) or 1 (persistent, L2 prefetch), got ",
                    r1k::msg(variant));
  TORCH_CHECK_VALUE(fused_logits_cluster_vpt(V, elem, static_cast<int>(cluster),
                                             static_cast<int>(threads), nullptr) > 0,
                    kOp, ": V=", r1k::msg(V), " is over what ", r1k::msg(cluster), " CTAs of ", r1k::msg(threads),
                    " threads hold (", r1k::msg(fused_logits_cluster_max_vocab(static_cast<int>(cluster),
                                                                        static_cast<int>(threads),
                                                                        elem)),
                    ")");
  TORCH_CHECK_VALUE(inv_temp > 0 && cap >= 0, kOp, ": the kernel takes inv_temp > 0 and cap >= 0 "
                    "(the row's max from the raw logits' max), got inv_temp=", r1k::msg(inv_temp),
                    ", cap=", r1k::msg(cap));
  TORCH_CHECK_VALUE(cap == 0 || (threads == 256 && variant == kVariantRegisters), kOp,
                    ": a soft-capped head (cap > 0) is compiled for 256 threads and variant 0 only, "
                    "got threads=", r1k::msg(threads), ", variant=", r1k::msg(variant));
  const int mode = glp.has_value() ? 0 : 1;
  FusedLogitsParams p;
  p.x = x.data_ptr();
  p.g = g.data_ptr();
  p.s_xb = x.stride(0);
  p.s_xt = x.stride(1);
  p.s_gb = g.stride(0);
  p.s_gt = g.stride(1);
  p.B = B;
  p.T = T;
  p.V = V;
  p.labels = labels.data_ptr<int64_t>();
  p.out = out.data_ptr<float>();
  p.inv_temp = static_cast<float>(inv_temp);
  p.cap = static_cast<float>(cap);
  p.ignore_index = ignore_index;
  p.entropy = entropy ? 1 : 0;
  if (mode == 0) {
    p.glp = f32_rows(glp, n, x, "glp", true);
    p.gent = f32_rows(gent, n, x, "gent", false);
  } else {
    p.adv = f32_rows(adv, n, x, "adv", true);
    p.mask = f32_rows(mask, n, x, "mask", true);
    p.old = f32_rows(old, n, x, "old", false);
    p.ref = f32_rows(ref, n, x, "ref", false);
    p.rw = f32_rows(rw, n, x, "rw", false);
    p.scale = f32_rows(scale, B, x, "scale", true);
    p.loss = static_cast<int>(loss);
    p.has_delta = delta.has_value() ? 1 : 0;
    p.delta = static_cast<float>(delta.value_or(0.0));
    p.bias_kl = bias_kl ? 1 : 0;
    p.eps_lo = static_cast<float>(eps_lo);
    p.eps_hi = static_cast<float>(eps_hi);
    p.beta = static_cast<float>(beta);
    p.tau_pos = static_cast<float>(tau_pos);
    p.tau_neg = static_cast<float>(tau_neg);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = fused_logits_cluster_launch(
      p, dtype_tag(x.scalar_type()), dtype_tag(g.scalar_type()), mode, static_cast<int>(cluster),
      static_cast<int>(threads), static_cast<int>(variant), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err != cudaErrorInvalidConfiguration, kOp, ": a cluster of ", r1k::msg(cluster), " CTAs of ",
              r1k::msg(threads), " threads cannot be resident on this GPU; choose a smaller setting "
              "(R1K_FUSED_CLUSTER)");
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CUDA, m) { m.impl("fused_logits_cluster", &fused_logits_cluster_cuda); }

}  // namespace r1k
