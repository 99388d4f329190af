// The fused log-prob kernel over logits on thread-block clusters (sm_90): shared definitions of
// fused_logits_cluster.cu (CUDA headers only) and its torch binding token_logprobs_cuda.cpp.
#pragma once
#include <cstdint>

namespace r1k {

// Everything one launch needs; pointers are device pointers, strides count elements.
struct FusedLogitsParams {
  // logits x [B, T, V] (last dim contiguous) and its gradient g (same shape; may be x itself)
  const void* x = nullptr;
  void* g = nullptr;
  int64_t s_xb = 0, s_xt = 0, s_gb = 0, s_gt = 0;
  int64_t B = 0, T = 0, V = 0;
  const int64_t* labels = nullptr;  // [B * T]
  float* out = nullptr;             // [3, B * T]: logp, entropy, lse
  float inv_temp = 1.f;             // > 0
  float cap = 0.f;                  // > 0: a soft-capped head, z = inv_temp * tanh(cap * x)
  int64_t ignore_index = -100;
  int entropy = 0;                  // write the entropy row of out
  // mode 0: the upstream gradients dL/dlogp [B * T] (and dL/dentropy, or null)
  const float* glp = nullptr;
  const float* gent = nullptr;
  // mode 1: the GRPO loss's own dL/dlogp (token-level ratio); [B * T] fp32 inputs, scale [B]
  const float* adv = nullptr;
  const float* mask = nullptr;
  const float* old = nullptr;       // null: on-policy (old = sg(logp))
  const float* ref = nullptr;       // null when beta == 0
  const float* rw = nullptr;        // null: no rollout importance weights
  const float* scale = nullptr;
  int loss = 0;                     // r1kernels/ops/grpo_loss.py: 5 cispo, 6 sapo, else clipped
  int has_delta = 0, bias_kl = 0;
  float eps_lo = 0.f, eps_hi = 0.f, delta = 0.f, beta = 0.f, tau_pos = 0.f, tau_neg = 0.f;
};

// The kernel variants (the third field of R1K_FUSED_CLUSTER): rows in registers, one cluster
// launched per row; rows in registers, persistent clusters prefetching their next row into L2.
constexpr int kVariantRegisters = 0, kVariantPersistent = 1;

// Logits: bf16 or fp16 (gradient in the same dtype), or fp32 (the hidden-state op's chunks;
// gradient in bf16 or fp16).
enum class LogitsDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The largest vocabulary one launch takes with `cluster` CTAs of `threads` threads per row
// (each thread holds up to kMaxVecsPerThread 16-byte vectors of the row in registers).
constexpr int kMaxVecsPerThread = 16;
inline int64_t fused_logits_cluster_max_vocab(int cluster, int threads, int elem_bytes) {
  return static_cast<int64_t>(cluster) * threads * (16 / elem_bytes) * kMaxVecsPerThread;
}

// A CTA's segment of a row: V / cluster rounded up to 8 columns (whole 16-byte vectors).
inline int64_t fused_logits_seg(int64_t V, int cluster) {
  return ((V + cluster - 1) / cluster + 7) / 8 * 8;
}

}  // namespace r1k
