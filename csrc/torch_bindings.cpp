// Every schema of the r1kernels operator library, in one place.
//
// Implementations register themselves per device next to their kernels:
//   csrc/<op>/<op>_cpu.cpp    TORCH_LIBRARY_IMPL(r1kernels, CPU, m)
//   csrc/<op>/<op>_cuda.cpp   TORCH_LIBRARY_IMPL(r1kernels, CUDA, m)  (CUDA builds only)
// Fake (meta) kernels and autograd formulas are registered from Python in
// r1kernels/_custom_ops.py, so every op works under torch.compile(fullgraph=True).
#include <Python.h>
#include <torch/library.h>

#include "common/cpu_simd.h"

TORCH_LIBRARY(r1kernels, m) {
  // Group-normalized advantages. scale: "group" | "batch" | "none".
  m.def("group_advantages(Tensor rewards, int group_size, str scale, float eps) -> Tensor");

  // Log-softmax statistics and dL/dlogits over an [n, c] tile of logits (vocabulary columns
  // col0 .. col0 + c), csrc/token_logprobs/; the CPU twins of the Triton kernels of
  // r1kernels/ops/token_logprobs.py. state [4, n] = (max, sum-exp, label logit, entropy sum),
  // read when accum, written unless final; out [3, n] = (logp, entropy, lse) written when final.
  // The head: z = inv_temp * x, or with cap != 0 (a soft-cap) inv_temp * tanh(cap * x)
  // (r1kernels/ops/token_logprobs.py head_constants).
  m.def("logprob_tile_stats(Tensor x, Tensor labels, Tensor? bias, Tensor(a!) state, Tensor(b!) out, "
        "int col0, int vocab, float inv_temp, int ignore_index, bool accum, bool final, bool entropy, "
        "float cap=0.) -> ()");
  // g = dL/dx for upstream gradients dlogp (and dent, with the entropy ent); g may be x itself.
  m.def("logprob_tile_grad(Tensor x, Tensor(a!) g, Tensor labels, Tensor? bias, Tensor lse, Tensor? ent, "
        "Tensor dlogp, Tensor? dent, int col0, float inv_temp, int ignore_index, float cap=0.) -> ()");

  // Fused statistics + dL/dlogits over logits x [B, T, V] (bf16/fp16, or fp32 with a bf16/fp16
  // gradient; sm_90 thread-block clusters; CUDA only: csrc/token_logprobs/fused_logits_cluster.cu).
  // g may alias x (in place, or a 16-bit gradient over the fp32 logits' own storage).
  // Upstream gradients glp (and gent) given (mode 0), or the GRPO loss's own dL/dlogp from
  // adv, mask, old, ref, rw, scale (mode 1). out [3, B * T] = logp, entropy, lse, zeroed by the
  // caller (rows outside the mask, and the entropy row without `entropy`, are not written).
  // variant: 0 rows in registers (a cluster per row), 1 persistent clusters with rows in
  // registers and the next row prefetched into L2.
  // cap > 0: a soft-capped head (z = inv_temp * tanh(cap * x); inv_temp > 0, cap >= 0).
  // Eager only (r1kernels/ops/token_logprobs.py does not take it under torch.compile).
  m.def("fused_logits_cluster(Tensor x, Tensor(a!) g, Tensor labels, Tensor(b!) out, Tensor? glp, "
        "Tensor? gent, Tensor? adv, Tensor? mask, Tensor? old, Tensor? ref, Tensor? rw, Tensor? scale, "
        "float inv_temp, int ignore_index, bool entropy, int loss, float eps_lo, float eps_hi, "
        "float? delta, float beta, bool bias_kl, float tau_pos, float tau_neg, int cluster, "
        "int threads, int variant, float cap=0.) -> ()");

  // GRPO loss on per-token log-probs [B, T] (csrc/grpo_loss/; the CPU twin of the Triton kernels
  // of r1kernels/ops/grpo_loss.py): (grad [B, T] fp32 unscaled dl/dlogp * mask, or [0] without
  // write_grad; partials [6, B] = sum l m, n, sum kl m, low, high, clipped).
  m.def("grpo_loss_partials(Tensor logps, Tensor adv, Tensor mask, Tensor? old, Tensor? ref, Tensor? rw, "
        "int loss, bool seq, float eps_lo, float eps_hi, float? delta, float beta, bool bias_kl, "
        "float tau_pos, float tau_neg, bool write_grad) -> (Tensor, Tensor)");
  // partials [6, B] or [6, C, B] -> (out [5] = loss, kl, clip_ratio_low, clip_ratio_high,
  // clip_ratio; the per-row gradient scale [B]).
  m.def("grpo_loss_finalize(Tensor part, Tensor? nitems, int loss, float max_len) -> (Tensor, Tensor)");

  // MoE routing (csrc/moe/). score_func: "softmax" | "sigmoid" | "sqrtsoftplus". Returns (weights [T, k] fp32,
  // ids [T, k] int32, selected scores [T, k] fp32, logsumexp [T] fp32) - the last two for backward.
  m.def("moe_route(Tensor logits, int top_k, str score_func, int n_group, int topk_group, Tensor? bias, "
        "bool norm, float scale, Tensor? replay_ids) -> (Tensor, Tensor, Tensor, Tensor)");
  // dL/dlogits [T, E] (dtype) from gs = dL/d(selected scores) [T, k]; logits only for softmax.
  m.def("moe_route_backward(Tensor gs, Tensor ids, Tensor sel, Tensor? logits, Tensor lse, int num_experts, "
        "ScalarType dtype, str score_func) -> Tensor");
  // (permuted [T*k + E*(align-1), H], counts [E], offsets [E + 1], row_ids [T, k],
  //  token_ids [T*k + E*(align-1)]), the last four int32: map and row copies in one call.
  m.def("moe_permute(Tensor hidden, Tensor ids, int num_experts, int align) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // out[row_ids[t, j]] = x[t] (* weights[t, j]); rows whose token_ids is -1 are zero.
  m.def("moe_scatter_rows(Tensor x, Tensor row_ids, Tensor token_ids, Tensor counts, Tensor offsets, "
        "Tensor? weights) -> Tensor");
  // y[t] = sum_j weights[t, j] * src[row_ids[t, j]] (weights 1 when absent), fp32 accumulation.
  m.def("moe_unpermute(Tensor src, Tensor row_ids, Tensor? weights) -> Tensor");
  // dw[t, j] = <gy[t], src[row_ids[t, j]]>, fp32.
  m.def("moe_rows_dot(Tensor gy, Tensor src, Tensor row_ids) -> Tensor");

  // One token per row of logits [B, V] from uniforms [B] (temperature, top_k, top_p, min_p) and
  // its log-prob under the unfiltered softmax(logits / temperature); csrc/sample_tokens/.
  m.def("sample_tokens(Tensor logits, Tensor uniforms, float temperature, int top_k, float top_p, "
        "float min_p) -> (Tensor, Tensor)");
  // The same with the settings in a float64 CPU tensor [temperature, top_k, top_p, min_p], read
  // at run time (CPU only): what the compiled CPU decode step calls.
  m.def("sample_tokens_params(Tensor logits, Tensor uniforms, Tensor params) -> (Tensor, Tensor)");

  // Attention of one query token per row, q [B, Hq, D], over slots kv_start[b] (default 0) ..
  // kv_len[b] - 1 of a key/value cache k, v [B, Hkv, L, D] (Hq a multiple of Hkv: grouped-query
  // heads read their shared head in place), with an optional additive mask [B, L];
  // out [B, Hq, D]. csrc/decode_attention/.
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor kv_len, Tensor? mask, float scale, "
        "Tensor? kv_start=None) -> Tensor");
}

// `import r1kernels._C` loads this shared library; the static initializers above register the
// ops with the dispatcher. The module has one function: cpu_simd_level(), which copy of the CPU
// kernels' SIMD loops this CPU runs (csrc/common/cpu_simd.h).
static PyObject* cpu_simd_level(PyObject*, PyObject*) {
  return PyUnicode_FromString(r1k::cpu_simd_level());
}

extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_simd_level", cpu_simd_level, METH_NOARGS,
       "Which copy of the CPU kernels' SIMD loops this CPU runs."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
