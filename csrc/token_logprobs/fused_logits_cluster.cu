// Fused per-token log-prob (+ entropy) forward and backward over logits, one read of the logits
// and one write of their gradient: thread-block clusters (sm_90) holding each row on chip.
//
// The two-pass floor. A loss that knows dL/dlogp of a row as soon as the row's log-prob is known
// (token_logprobs_fwd_bwd: given up front; GRPOLoss.from_logits: the GRPO loss's own derivative,
// token-level ratio) needs each row's statistics (max, sum-exp, entropy sum) before it can write
// any of that row's gradient. Streaming the row twice from HBM (statistics, then gradient) costs
// read + read + write: 4.9 ms at N=16384, V=151936 bf16 on an H100. Keeping the row on chip
// between the two costs read + write: 3.3 ms. One SM cannot hold a 297 KiB row and keep enough
// loads in flight, so a row is split over the CL CTAs of a thread-block cluster: CTA r holds
// columns [r * seg, (r + 1) * seg) in registers (each thread VPT 16-byte vectors, loaded all at
// once), reduces its part to (m, s, w), publishes it in shared memory, and after one cluster
// barrier every CTA reads the CL partials through distributed shared memory and merges them in
// the same order (so every CTA gets the same bits). Then each CTA writes the gradient of the
// columns it holds, from registers. The arithmetic is in base 2 (one FFMA and one ex2 per logit
// in each pass, the max over packed 16-bit pairs): Nsight Compute showed the kernel as bound by
// instruction issue as much as by memory (H100, 2026-11-23: 69% of issue slots, 57% of DRAM
// bandwidth), and the cut took token_logprobs_fwd_bwd from 4.83 to 4.49 ms. A second cut (not
// yet timed on a GPU): the per-thread loops unswitched (w only when the entropy is needed, the
// -inf clamp only in threads whose smallest logit needs it, no per-vector tests of a dead row or
// of dL/dentropy), bf16 unpacked with one integer instruction per logit, and the warp merges as
// a max butterfly then sum butterflies (one ex2 per lane instead of two per level): about 44 instead
// of 58 instructions per 8-logit vector in the statistics, 56 instead of 70 in the gradient
// (bf16, with dL/dentropy). That arithmetic lives in fused_logits_math.cuh, host-testable. Many
// clusters are resident per SM, so the latency of one row's reductions and barriers hides behind
// the other rows' loads.
//
// Semantics are those of _token_logprobs_fused_kernel in r1kernels/ops/token_logprobs.py (its
// Triton twin, the reference of the tests): statistics relative to the running max, the label's
// logit read from global memory, a row labelled ignore_index or (MODE 1) outside the mask
// neither read nor computed (zeros written, its outputs 0), a row whose upstream gradients are
// both zero written as exact zeros. In place
// (g == x) is safe: every element is read into registers by the thread that later overwrites
// it, the label's logit is read before the first cluster barrier and written after it.
//
// A soft-capped head (p.cap > 0: z = inv_temp * tanh(cap * x), r1kernels/ops/token_logprobs.py
// head_constants) runs the kCap instances: tanh before the statistics, cap * sech^2 in the
// gradient (fused_logits_math.cuh); the plain head's instances are unchanged.
//
// This file includes CUDA headers only; the torch binding is token_logprobs_cuda.cpp.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <climits>
#include <type_traits>

#include "token_logprobs/fused_logits_cluster.h"
#include "token_logprobs/fused_logits_math.cuh"

namespace cg = cooperative_groups;

namespace r1k {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxCluster = 16;

// The statistics of the 32 lanes' statistics, in every lane: the max by a butterfly, then each
// lane's (s, w) moved to it (one ex2) and summed by a butterfly. Each butterfly step adds the
// same two values in both partner lanes, so every lane ends with the same bits.
__device__ __forceinline__ Stats warp_merge(const Stats& v) {
  float m = v.m;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, off));
  Stats r = rescale(v, m);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    r.s += __shfl_xor_sync(kFull, r.s, off);
    r.w += __shfl_xor_sync(kFull, r.w, off);
  }
  return r;
}

// The gradient goes out as kPerVec<TIn> elements of TOut (16-bit: 16 or 8 bytes per store).
template <typename TOut>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  uint32_t r;
  if constexpr (std::is_same_v<TOut, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    r = *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(a, b);
    r = *reinterpret_cast<const uint32_t*>(&h);
  }
  return r;
}

// E floats -> E TOut (16-bit) at p, one streaming store (16 bytes for E = 8, 8 for E = 4).
template <typename TOut, int E>
__device__ __forceinline__ void store_out(TOut* p, const float* f) {
  if constexpr (E == 8) {
    __stcs(reinterpret_cast<uint4*>(p), make_uint4(pack2<TOut>(f[0], f[1]), pack2<TOut>(f[2], f[3]),
                                                   pack2<TOut>(f[4], f[5]), pack2<TOut>(f[6], f[7])));
  } else {
    static_assert(E == 4, "4 or 8 elements per vector");
    __stcs(reinterpret_cast<uint2*>(p), make_uint2(pack2<TOut>(f[0], f[1]), pack2<TOut>(f[2], f[3])));
  }
}

// The per-row inputs of dL/dlogp, loaded by thread 0 before the first cluster barrier so that
// their latency overlaps the row's reads and reductions instead of following the barrier.
// MODE 0: the given dL/dlogp and dL/dentropy. MODE 1: the GRPO inputs of the token and its loss
// scale (old and ref stay unread when absent: old = sg(logp), beta = 0).
struct RowInputs {
  float glp = 0.f, gent = 0.f;
  float mask = 0.f, old = 0.f, adv = 0.f, rw = 1.f, ref = 0.f, scale = 0.f;
};

template <int MODE>
__device__ __forceinline__ RowInputs load_row_inputs(const FusedLogitsParams& p, int64_t row,
                                                     int64_t b, float mask) {
  RowInputs in;
  if (MODE == 0) {
    in.glp = p.glp[row];
    if (p.gent != nullptr) in.gent = p.gent[row];
  } else {
    in.mask = mask;  // (read once, for the masked-row test)
    if (p.old != nullptr) in.old = p.old[row];
    in.adv = p.adv[row];
    if (p.rw != nullptr) in.rw = p.rw[row];
    if (p.ref != nullptr) in.ref = p.ref[row];
    in.scale = p.scale[b];
  }
  return in;
}

// dL/dlogp of a token under the GRPO loss, token-level ratio, times the row's loss scale:
// _grpo_token_dlogp / _grpo_token_terms of the Triton kernels.
__device__ float grpo_dlogp(const FusedLogitsParams& p, const RowInputs& in, float lp) {
  const float m = in.mask;
  if (m == 0.f) return 0.f;
  const float old = p.old != nullptr ? in.old : lp;
  const float A = in.adv;
  const float c1 = __expf(lp - old);
  float g_dir, g_c1;
  if (p.loss == 5) {  // cispo: -sg(min(c1, eps_hi)) A lp
    g_dir = -fminf(c1, p.eps_hi) * A;
    g_c1 = 0.f;
  } else if (p.loss == 6) {  // sapo: soft gate
    const float tau = A > 0.f ? p.tau_pos : p.tau_neg;
    const float s = 1.f / (1.f + __expf(-(tau * (c1 - 1.f))));
    g_dir = 0.f;
    g_c1 = -4.f * A * s * (1.f - s);
  } else {  // clipped surrogate
    const float lo = 1.f - p.eps_lo, hi = 1.f + p.eps_hi;
    const float c2 = fminf(fmaxf(c1, lo), hi);
    const float c1d = p.has_delta ? fminf(c1, p.delta) : c1;
    const float d1 = (!p.has_delta || c1 <= p.delta) ? 1.f : 0.f;
    const float t1 = c1d * A, t2 = c2 * A;
    const float w1 = t1 < t2 ? 1.f : (t1 == t2 ? 0.5f : 0.f);  // torch.minimum splits ties
    const float d2 = (c1 >= lo && c1 <= hi) ? 1.f : 0.f;
    g_dir = 0.f;
    g_c1 = -A * (w1 * d1 + (1.f - w1) * d2);
  }
  if (p.rw != nullptr) {
    g_dir *= in.rw;
    g_c1 *= in.rw;
  }
  if (p.ref != nullptr) {  // beta != 0: k3 kl (times c1 with the bias correction)
    const float d = in.ref - lp;
    if (p.bias_kl) {  // d(c1 kl0)/dlp = -c1 d exactly (no cancellation of large terms)
      g_dir -= p.beta * d * c1;
    } else {
      g_dir += p.beta * (1.f - __expf(d));
    }
  }
  return (g_dir + (g_c1 != 0.f ? g_c1 * c1 : 0.f)) * m * in.scale;  // (c1 may be inf)
}

template <int MODE>
__device__ __forceinline__ bool has_dent_of(const FusedLogitsParams& p) {
  return MODE == 0 && p.gent != nullptr;
}

// An opaque no-op on the packed vectors: the compiler must unpack them again after it, so it does
// not keep the 8 floats of every vector alive from one pass to the next (twice the registers).
template <int VPT>
__device__ __forceinline__ void opaque(uint4 (&data)[VPT]) {
#pragma unroll
  for (int k = 0; k < VPT; ++k)
    asm volatile("" : "+r"(data[k].x), "+r"(data[k].y), "+r"(data[k].z), "+r"(data[k].w));
}

__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
// No ordering: for a CTA that only says it has finished reading its peers' shared memory (the
// values it read are already consumed), so no fence (MEMBAR.GPU) is needed before the arrive.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// The row's statistics from the CL CTAs' base-2 partials `part` (every CTA's warp 0 reads them
// in the same order, so every CTA gets the same bits), its outputs (written by rank 0) and the
// constants of its gradient: the gradient of column j is 2^(z_j - lse2) (A + B (z_j - lse2))
// (+ dlp inv_temp at the label), with A, B the row's dL/dlogp and dL/dentropy folded with
// inv_temp and ln 2. row_vals = (lse2, A, B, the label's extra term); row_dead: both upstream
// gradients are zero. Called by warp 0 (the shared arrays by reference: they stay __shared__).
// Cluster: cg::cluster_group (a template parameter: the type exists only when compiling for
// sm_90+, and the extension's other device passes compile this file too).
template <int MODE, typename Cluster>
__device__ __forceinline__ void finish_row(const FusedLogitsParams& p, Cluster& cluster,
                                           Stats* part, int CL, int rank, int lane, bool valid,
                                           float zt, const RowInputs& in, int64_t row, int64_t n,
                                           float (&row_vals)[4], int& row_dead) {
  Stats r = empty_stats();
  if (lane < CL) r = *cluster.map_shared_rank(part, lane);
  r = warp_merge(r);
  if (lane == 0) {
    const float log2_s = __log2f(r.s);
    const float lse2 = r.m + log2_s;
    const float logp = valid ? ((zt * kLog2e - r.m) - log2_s) * kLn2
                             : __int_as_float(0x7fc00000);  // NaN: bad label
    const float ent = (log2_s - r.w / r.s) * kLn2;
    float dlp, dent = 0.f;
    if (MODE == 0) {
      dlp = in.glp;
      dent = in.gent;
    } else {
      dlp = grpo_dlogp(p, in, logp);
    }
    row_vals[0] = lse2;
    row_vals[1] = -p.inv_temp * (dlp + dent * ent);  // A
    row_vals[2] = -p.inv_temp * dent * kLn2;          // B
    row_vals[3] = dlp * p.inv_temp;                   // the label's extra term
    row_dead = dlp == 0.f && dent == 0.f;
    if (rank == 0) {
      p.out[row] = logp;
      if (p.entropy) p.out[n + row] = ent;
      p.out[2 * n + row] = lse2 * kLn2;
    }
  }
}

// dL/dlogits of a thread's first nvec vectors (columns g + k * kStep), from the row's constants
// (finish_row) and its raw logits in registers; label_off: the label's column less the thread's
// first column (the label's vector gets its extra term dl).
template <typename TIn, typename TOut, int VPT, int kStep, bool kDent, bool kClamp, bool kCap>
__device__ __forceinline__ void grad_pass(const uint4 (&data)[VPT], int nvec, TOut* g, float c2,
                                          float lse2, float A, float B, float dl, int label_off,
                                          float cap) {
  constexpr int kE = kPerVec<TIn>;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    if (k < nvec) {
      float f[kE];
      unpack<TIn>(data[k], f);
      grad_vec<kE, kDent, kClamp, kCap>(f, c2, lse2, A, B, dl,
                                        static_cast<unsigned>(label_off - k * kStep), cap);
      store_out<TOut, kE>(g + k * kStep, f);
    }
  }
}

// One cluster per row (row0 + blockIdx.x / CL), CL CTAs of THREADS threads; CTA r holds columns
// [r * seg, min((r + 1) * seg, V)), seg a multiple of 8. Column indices fit in int (V <= 2^20).
// Registers bound how much of the rows an SM holds: the launch bounds ask for 3 CTAs of 256
// threads per SM (<= 80 registers) while a thread's vectors fit in 40 of them.
//
// kPersist (R1K_FUSED_CLUSTER="8,256,1"): the same work, but the grid is only the clusters that
// fit at once, and each walks rows row0 + c, row0 + c + clusters, ... (no CTA launched per row).
// At the start of each row, one thread per CTA asks the bulk-copy engine to prefetch the CTA's
// segment of its next row into L2 (cp.async.bulk.prefetch.L2: one instruction, no registers, no
// shared memory), so that row's loads hit L2 while HBM streams the rows after it. Barriers: the
// cluster barrier pair of a row (arrive/wait before reading the peers' partials, arrive/wait
// after) closes before the next row writes cta_part again; a row that no CTA reads (ignored,
// masked) is skipped by the whole cluster at once, so every CTA passes the same barriers.
template <int THREADS, int VPT>
constexpr int min_ctas_per_sm() {
  return THREADS == 256 ? (VPT <= 10 ? 3 : 2) : (VPT <= 6 ? 2 : 1);
}

// this CTA's segment [c_lo, c_hi) of a row into L2 (bytes: multiples of 16, 16-byte aligned)
__device__ __forceinline__ void prefetch_l2(const void* src, uint32_t bytes) {
  constexpr uint32_t kPiece = 65536;
  for (uint32_t off = 0; off < bytes; off += kPiece) {
    const uint32_t n = bytes - off < kPiece ? bytes - off : kPiece;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(
                     reinterpret_cast<const unsigned char*>(src) + off),
                 "r"(n)
                 : "memory");
  }
}

// One row on one cluster (the body of the kernel below): row r0 + blockIdx.x / CL, or with
// kPersist row r0 itself, and then first the L2 prefetch of the CTA's segment of row next_row
// (the row this cluster takes next; none when < 0).
template <typename TIn, typename TOut, int THREADS, int VPT, int MODE, bool kPersist, bool kCap>
__device__ __forceinline__ void cluster_row(const FusedLogitsParams& p, int64_t r0,
                                            int64_t next_row, int seg) {
  constexpr int kWarps = THREADS / 32;
  constexpr int kE = kPerVec<TIn>;     // logits per vector
  constexpr int kStep = kE * THREADS;  // columns between a thread's vectors
  __shared__ Stats warp_part[kWarps];
  __shared__ Stats cta_part;
  __shared__ float row_vals[4];  // lse, entropy, dL/dlogp, dL/dentropy
  __shared__ int row_dead;

  cg::cluster_group cluster = cg::this_cluster();
  const int CL = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t n = p.B * p.T;
  const int64_t row = kPersist ? r0 : r0 + blockIdx.x / CL;
  const int64_t b = row / p.T, t = row - b * p.T;
  const TIn* x_row = static_cast<const TIn*>(p.x) + b * p.s_xb + t * p.s_xt;
  TOut* g_row = static_cast<TOut*>(p.g) + b * p.s_gb + t * p.s_gt;
  const int V = static_cast<int>(p.V);
  const int c_lo = rank * seg;
  const int c_hi = c_lo + seg < V ? c_lo + seg : V;
  // this thread's vectors: columns c_thread + k * kStep .. + kE, for k < nvec (<= VPT)
  const int c_thread = c_lo + kE * tid;
  const int nvec = c_thread < c_hi ? (c_hi - c_thread + kStep - 1) / kStep : 0;
  const TIn* x_mine = x_row + c_thread;
  TOut* g_mine = g_row + c_thread;
  if (kPersist && next_row >= 0 && tid == 0 && c_lo < c_hi) {  // the next row's segment
    const int64_t nb = next_row / p.T, nt = next_row - nb * p.T;
    if (p.labels[next_row] != p.ignore_index && (MODE == 0 || p.mask[next_row] != 0.f))
      prefetch_l2(static_cast<const TIn*>(p.x) + nb * p.s_xb + nt * p.s_xt + c_lo,
                  static_cast<uint32_t>(c_hi - c_lo) * sizeof(TIn));
  }

  const int64_t label = p.labels[row];
  const bool ignored = label == p.ignore_index;
  const float mask = MODE == 1 ? p.mask[row] : 1.f;
  if (ignored || mask == 0.f) {
    // labelled ignore_index or outside the GRPO mask: not read, zeros written (out, lse
    // included, is zeroed by the caller)
    const float zero[kE] = {};
#pragma unroll
    for (int k = 0; k < VPT; ++k)
      if (k < nvec) store_out<TOut, kE>(g_mine + k * kStep, zero);
    return;  // the whole cluster takes this branch: no barrier is left waiting
  }

  // ---- read the CTA's columns, all loads in flight before the first use
  uint4 data[VPT];
#pragma unroll
  for (int k = 0; k < VPT; ++k)
    if (k < nvec) data[k] = __ldcs(reinterpret_cast<const uint4*>(x_mine + k * kStep));
  const bool valid = label >= 0 && label < V;
  float zt = 0.f;
  RowInputs in;
  if (tid == 0) {
    if (valid) {
      zt = to_float(x_row[label]);
      zt = (kCap ? head_tanh(zt * p.cap) : zt) * p.inv_temp;
    }
    in = load_row_inputs<MODE>(p, row, b, mask);
  }

  // ---- this thread's statistics, in base 2: z = x * inv_temp * log2(e) (one FFMA, then ex2),
  // m2 = max z (from the max of the raw logits: inv_temp > 0), s = sum 2^(z - m2),
  // w2 = sum 2^(z - m2) (z - m2). Natural units come back in the row's finishing step. The
  // loops are unswitched (fused_logits_math.cuh): w only when the entropy is needed, the -inf
  // clamp only in a thread whose smallest logit needs it.
  const float c2 = p.inv_temp * kLog2e;
  const bool has_dent = has_dent_of<MODE>(p);
  const bool need_w = p.entropy != 0 || has_dent;
  // (the smallest logit only feeds the clamp tests, which need_w guards)
  const float2 range = head_range<kCap>(need_w ? logit_range<TIn, VPT, true>(data, nvec)
                                                : logit_range<TIn, VPT, false>(data, nvec),
                                         nvec > 0, p.cap);
  const float m2 = range.y * c2;
  opaque(data);
  const float ref = m2 == -INFINITY ? 0.f : m2;
  float s = 0.f, w = 0.f;
  if (!need_w)
    thread_sums<TIn, VPT, false, false, kCap>(data, nvec, c2, ref, s, w, p.cap);
  else if (!needs_clamp(range.x, c2, ref))
    thread_sums<TIn, VPT, true, false, kCap>(data, nvec, c2, ref, s, w, p.cap);
  else
    thread_sums<TIn, VPT, true, true, kCap>(data, nvec, c2, ref, s, w, p.cap);
  opaque(data);
  // ---- the CTA's statistics, published for the cluster
  Stats v = warp_merge(Stats{m2, s, w});
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_part[lane] : empty_stats();
    v = warp_merge(v);
    if (lane == 0) cta_part = v;
  }
  cluster_arrive();  // release: cta_part (and every read of the logits) before the barrier
  cluster_wait();

  // ---- the row's statistics from the CL partials, and its gradient's constants
  if (warp == 0)
    finish_row<MODE>(p, cluster, &cta_part, CL, rank, lane, valid, zt, in, row, n, row_vals,
                     row_dead);
  cluster_arrive_relaxed();  // this CTA is done reading its peers' shared memory
  __syncthreads();

  // ---- dL/dlogits of the CTA's columns, from registers
  const float lse2 = row_vals[0], A = row_vals[1], B = row_vals[2], dl = row_vals[3];
  const int label_off = valid ? static_cast<int>(label) - c_thread : -1;  // label's column - mine
  if (row_dead != 0) {
    const float zero[kE] = {};
#pragma unroll
    for (int k = 0; k < VPT; ++k)
      if (k < nvec) store_out<TOut, kE>(g_mine + k * kStep, zero);
  } else if (!has_dent) {
    grad_pass<TIn, TOut, VPT, kStep, false, false, kCap>(data, nvec, g_mine, c2, lse2, A, B, dl,
                                                         label_off, p.cap);
  } else if (!needs_clamp(range.x, c2, lse2)) {
    grad_pass<TIn, TOut, VPT, kStep, true, false, kCap>(data, nvec, g_mine, c2, lse2, A, B, dl,
                                                        label_off, p.cap);
  } else {
    grad_pass<TIn, TOut, VPT, kStep, true, true, kCap>(data, nvec, g_mine, c2, lse2, A, B, dl,
                                                       label_off, p.cap);
  }
  cluster_wait();  // keep cta_part alive until every CTA of the cluster has read it
}

template <typename TIn, typename TOut, int THREADS, int VPT, int MODE, bool kPersist, bool kCap>
__global__ void __launch_bounds__(THREADS, (min_ctas_per_sm<THREADS, VPT>()))
    fused_logits_cluster_kernel(const FusedLogitsParams p, int64_t row0, int seg) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kPersist) {
    const int CL = static_cast<int>(cg::this_cluster().num_blocks());
    const int64_t n = p.B * p.T, clusters = gridDim.x / CL;
    for (int64_t r = row0 + blockIdx.x / CL; r < n; r += clusters)
      cluster_row<TIn, TOut, THREADS, VPT, MODE, true, kCap>(
          p, r, r + clusters < n ? r + clusters : -1, seg);
  } else {
    cluster_row<TIn, TOut, THREADS, VPT, MODE, false, kCap>(p, row0, -1, seg);
  }
#else
  __trap();  // launched only on sm_90+ (the launcher checks)
#endif
}

template <typename TIn, typename TOut, int THREADS, int MODE, bool kPersist, bool kCap>
void (*pick_kernel(int vpt))(const FusedLogitsParams, int64_t, int) {
  switch (vpt) {
    case 2: return fused_logits_cluster_kernel<TIn, TOut, THREADS, 2, MODE, kPersist, kCap>;
    case 4: return fused_logits_cluster_kernel<TIn, TOut, THREADS, 4, MODE, kPersist, kCap>;
    case 6: return fused_logits_cluster_kernel<TIn, TOut, THREADS, 6, MODE, kPersist, kCap>;
    case 8: return fused_logits_cluster_kernel<TIn, TOut, THREADS, 8, MODE, kPersist, kCap>;
    case 10: return fused_logits_cluster_kernel<TIn, TOut, THREADS, 10, MODE, kPersist, kCap>;
    case 12: return fused_logits_cluster_kernel<TIn, TOut, THREADS, 12, MODE, kPersist, kCap>;
    case 16: return fused_logits_cluster_kernel<TIn, TOut, THREADS, 16, MODE, kPersist, kCap>;
    default: return nullptr;
  }
}

// Launch configuration of `ctas` CTAs of `threads` threads in clusters of `cluster` CTAs; `attr`
// (the caller's) holds its one attribute, the cluster shape.
cudaLaunchConfig_t cluster_launch(int64_t ctas, int threads, int cluster, cudaStream_t stream,
                                  cudaLaunchAttribute* attr) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(cluster);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(ctas), 1, 1);
  cfg.blockDim = dim3(static_cast<unsigned>(threads), 1, 1);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// The register kernel: one cluster per row (a grid of every row's clusters, in launches of at
// most INT_MAX / 2 CTAs), or with `persist` only the clusters that fit at once, each walking rows.
template <typename TIn, typename TOut, int MODE, bool kCap>
cudaError_t launch_vpt(int vpt, const FusedLogitsParams& p, int cluster, int threads, bool persist,
                       cudaStream_t stream, int seg) {
  void (*kern)(const FusedLogitsParams, int64_t, int) = nullptr;
  if constexpr (kCap) {  // soft-capped heads: the default setting's instances only (256 threads,
    // rows in registers; token_logprobs.cluster_setting sends the others to Triton): a quarter
    // of the plain head's instances, so the file compiles in about 1.25x the plain-only time
    if (threads == 256 && !persist) kern = pick_kernel<TIn, TOut, 256, MODE, false, true>(vpt);
  } else {
    kern = persist ? (threads == 256 ? pick_kernel<TIn, TOut, 256, MODE, true, false>(vpt)
                                     : pick_kernel<TIn, TOut, 512, MODE, true, false>(vpt))
                   : (threads == 256 ? pick_kernel<TIn, TOut, 256, MODE, false, false>(vpt)
                                     : pick_kernel<TIn, TOut, 512, MODE, false, false>(vpt));
  }
  if (kern == nullptr) return cudaErrorInvalidValue;
  if (cluster > 8) {
    const cudaError_t e =
        cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e != cudaSuccess) return e;
  }
  cudaLaunchAttribute attr;
  {  // a cluster that cannot be resident at all (e.g. 16 CTAs of 512 threads) is an error here,
     // not a hang or a launch failure later
    const cudaLaunchConfig_t probe = cluster_launch(cluster, threads, cluster, stream, &attr);
    int active = 0;
    const cudaError_t e = cudaOccupancyMaxActiveClusters(&active, kern, &probe);
    if (e != cudaSuccess) return e;
    if (active < 1) return cudaErrorInvalidConfiguration;
    if (persist) {
      const int64_t n = p.B * p.T;
      const int64_t clusters = n < active ? n : active;
      const cudaLaunchConfig_t cfg = cluster_launch(clusters * cluster, threads, cluster, stream,
                                                    &attr);
      return cudaLaunchKernelEx(&cfg, kern, p, static_cast<int64_t>(0), seg);
    }
  }
  const int64_t n = p.B * p.T;
  const int64_t rows_per_launch = (INT_MAX / cluster) / 2;
  for (int64_t row0 = 0; row0 < n; row0 += rows_per_launch) {
    const int64_t rows = n - row0 < rows_per_launch ? n - row0 : rows_per_launch;
    const cudaLaunchConfig_t cfg = cluster_launch(rows * cluster, threads, cluster, stream, &attr);
    const cudaError_t e = cudaLaunchKernelEx(&cfg, kern, p, row0, seg);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename TIn, typename TOut, bool kCap>
cudaError_t launch_head(int vpt, const FusedLogitsParams& p, int mode, int cluster, int threads,
                        int variant, cudaStream_t stream, int seg) {
  const bool persist = variant == kVariantPersistent;
  return mode == 0 ? launch_vpt<TIn, TOut, 0, kCap>(vpt, p, cluster, threads, persist, stream, seg)
                   : launch_vpt<TIn, TOut, 1, kCap>(vpt, p, cluster, threads, persist, stream, seg);
}

template <typename TIn, typename TOut>
cudaError_t launch_types(int vpt, const FusedLogitsParams& p, int mode, int cluster, int threads,
                         int variant, cudaStream_t stream, int seg) {
  return p.cap != 0.f ? launch_head<TIn, TOut, true>(vpt, p, mode, cluster, threads, variant, stream, seg)
                      : launch_head<TIn, TOut, false>(vpt, p, mode, cluster, threads, variant, stream, seg);
}

}  // namespace

// Vectors per thread the launch uses for a row of V columns of elem_bytes-byte logits: the
// smallest compiled count that holds the CTA's segment; 0 when none does (V too large for
// cluster x threads).
int fused_logits_cluster_vpt(int64_t V, int elem_bytes, int cluster, int threads,
                             int64_t* seg_out) {
  const int64_t per_vec = 16 / elem_bytes;
  const int64_t seg = fused_logits_seg(V, cluster);  // whole vectors in and out
  const int64_t need = (seg / per_vec + threads - 1) / threads;
  if (seg_out != nullptr) *seg_out = seg;
  static const int kCompiled[] = {2, 4, 6, 8, 10, 12, 16};
  for (int v : kCompiled)
    if (v >= need) return v;
  return 0;
}

cudaError_t fused_logits_cluster_launch(const FusedLogitsParams& p, int in_dtype, int out_dtype,
                                        int mode, int cluster, int threads, int variant,
                                        cudaStream_t stream) {
  using D = LogitsDType;
  if (cluster < 1 || cluster > kMaxCluster || (cluster & (cluster - 1)) != 0 ||
      (threads != 256 && threads != 512) || p.V % 8 != 0 || p.V < 1 || variant < 0 ||
      variant > kVariantPersistent || !(p.inv_temp > 0.f) || !(p.cap >= 0.f))
    return cudaErrorInvalidValue;  // (the max of the scaled logits comes from the raw max)
  if (p.B * p.T == 0) return cudaSuccess;
  int dev = 0, major = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return e;
  if (major < 9) return cudaErrorNotSupported;
  const bool f32 = in_dtype == static_cast<int>(D::kFloat32);
  const int elem = f32 ? 4 : 2;
  int64_t seg = 0;
  const int vpt = fused_logits_cluster_vpt(p.V, elem, cluster, threads, &seg);
  if (vpt == 0) return cudaErrorInvalidValue;
  if (seg > INT_MAX / 2) return cudaErrorInvalidValue;
  const int sg = static_cast<int>(seg);
  const bool out_bf16 = out_dtype == static_cast<int>(D::kBFloat16);
  if (!out_bf16 && out_dtype != static_cast<int>(D::kFloat16)) return cudaErrorInvalidValue;
  const int pl = variant;
  if (f32)
    return out_bf16 ? launch_types<float, __nv_bfloat16>(vpt, p, mode, cluster, threads, pl, stream, sg)
                    : launch_types<float, __half>(vpt, p, mode, cluster, threads, pl, stream, sg);
  if (in_dtype != out_dtype) return cudaErrorInvalidValue;  // 16-bit logits: same-dtype gradient
  return out_bf16
             ? launch_types<__nv_bfloat16, __nv_bfloat16>(vpt, p, mode, cluster, threads, pl, stream, sg)
             : launch_types<__half, __half>(vpt, p, mode, cluster, threads, pl, stream, sg);
}

}  // namespace r1k
