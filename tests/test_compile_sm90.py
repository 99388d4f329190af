"""Every Triton kernel compiles for Hopper (sm_90) without spilling registers.

Runs without a GPU: triton.compile targets sm_90 and cuobjdump reads the cubin. Add each new
kernel to SPECS with the constexpr configurations its launcher actually uses. Skipped when
triton (with its NVIDIA backend) is not installed.
"""
import pytest

triton = pytest.importorskip("triton")

import os  # noqa: E402

from sm90 import compile_many  # noqa: E402


# ("module:kernel", signature of the runtime arguments, constexprs, num_warps, expect_wgmma)
SPECS = [
    pytest.param("r1kernels.ops.group_advantages:_group_advantages_fwd_kernel",
                 {"r_ptr": "*fp32", "out_ptr": "*fp32", "P": "i32", "G": "i32", "eps": "fp32"},
                 {"MODE": mode, "BLOCK_G": bg, "ROWS": rows, "BLOCK_B": 2048}, 4, False,
                 id=f"group_advantages-mode{mode}-G{bg}")
    for mode, bg, rows in [(0, 16, 64), (1, 16, 64), (2, 16, 64), (0, 1024, 1), (0, 1, 1024)]
]

# token_logprobs / linear_token_logprobs: statistics and gradient kernels, on bf16 logits (token
# path) and on fp32 logits tiles with a bias (hidden-state path), at the launcher's BLOCK_V/warps.
_TLP = "r1kernels.ops.token_logprobs"
SPECS += [
    pytest.param(f"{_TLP}:_token_logprobs_fwd_kernel",
                 {"x_ptr": f"*{xt}", "stride_x": "i64", "labels_ptr": "*i64", "bias_ptr": f"*{xt}",
                  "state_ptr": "*fp32", "out_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
                  "col0": "i32", "vocab": "i32", "inv_temp": "fp32", "ignore_index": "i32"},
                 {"HAS_BIAS": bias, "ACCUM": accum, "FINAL": final, "ENTROPY": ent,
                  "BLOCK_V": block}, warps, False,
                 id=f"token_logprobs_fwd-{xt}-bias{int(bias)}-acc{int(accum)}-fin{int(final)}"
                    f"-ent{int(ent)}-B{block}")
    for xt, bias, accum, final, ent, block, warps in [
        ("bf16", False, False, True, True, 4096, 8), ("bf16", False, False, True, False, 4096, 8),
        ("bf16", False, False, True, True, 2048, 1), ("bf16", False, False, True, False, 2048, 2),
        ("fp16", False, False, True, True, 1024, 4), ("fp32", True, True, False, True, 4096, 8),
        ("fp32", True, True, True, True, 4096, 8), ("fp32", False, False, False, False, 16, 4)]
] + [
    pytest.param(f"{_TLP}:_token_logprobs_bwd_kernel",
                 {"x_ptr": f"*{xt}", "stride_x": "i64", "g_ptr": f"*{gt}", "stride_g": "i64",
                  "labels_ptr": "*i64", "bias_ptr": f"*{xt}", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
                  "dlogp_ptr": "*fp32", "dent_ptr": "*fp32", "n_cols": "i32", "col0": "i32",
                  "inv_temp": "fp32", "ignore_index": "i32"},
                 {"HAS_BIAS": bias, "HAS_DENT": dent, "BLOCK_V": block}, warps, False,
                 id=f"token_logprobs_bwd-{xt}-{gt}-bias{int(bias)}-dent{int(dent)}-B{block}")
    for xt, gt, bias, dent, block, warps in [
        ("bf16", "bf16", False, True, 4096, 8), ("bf16", "bf16", False, False, 4096, 8),
        ("fp32", "bf16", True, True, 4096, 8), ("fp32", "fp32", True, False, 4096, 8),
        ("fp16", "fp16", False, True, 256, 4)]
]

# the fused forward+backward kernel (token_logprobs_fwd_bwd: MODE 0; GRPOLoss.from_logits: MODE 1)
_FUSED_SIG = {"x_ptr": "*bf16", "s_xb": "i64", "s_xt": "i64", "g_ptr": "*bf16", "s_gb": "i64",
              "s_gt": "i64", "labels_ptr": "*i64", "out_ptr": "*fp32", "glp_ptr": "*fp32",
              "gent_ptr": "*fp32", "old_ptr": "*fp32", "ref_ptr": "*fp32", "adv_ptr": "*fp32",
              "mask_ptr": "*u8", "rw_ptr": "*fp32", "scale_ptr": "*fp32", "N": "i32", "T": "i32",
              "V": "i32", "inv_temp": "fp32", "ignore_index": "i32", "eps_lo": "fp32",
              "eps_hi": "fp32", "delta": "fp32", "beta": "fp32", "tau_pos": "fp32", "tau_neg": "fp32"}
SPECS += [
    pytest.param(f"{_TLP}:_token_logprobs_fused_kernel", {**_FUSED_SIG, "x_ptr": xt, "g_ptr": xt},
                 {"MODE": mode, "ENTROPY": True, "HAS_DENT": mode == 0, "LOSS": loss,
                  "HAS_OLD": True, "HAS_DELTA": loss < 5, "HAS_RW": True, "BETA_NZ": True,
                  "BIAS_KL": True, "BLOCK_V": block, "LANES": lanes, "PHASE": phase}, warps, False,
                 id=f"token_logprobs_fused-mode{mode}-loss{loss}-{xt[1:]}-B{block}-w{warps}-l{int(lanes)}"
                    f"-p{phase}")
    for phase in (0, 1, 2)
    for mode, loss, xt, block, warps, lanes in [
        (0, 0, "*bf16", 4096, 16, True), (1, 0, "*bf16", 8192, 16, True),
        (1, 5, "*fp32", 4096, 16, True), (1, 6, "*fp16", 2048, 8, True), (1, 3, "*bf16", 2048, 8, True),
        (0, 0, "*bf16", 4096, 16, False), (1, 3, "*bf16", 4096, 16, False),
        (0, 0, "*bf16", 16384, 16, False), (1, 3, "*bf16", 4096, 8, True)]
]

# the two-launch mode's statistics launch with its own (small) warps and block: PHASE 1 only
SPECS += [
    pytest.param(f"{_TLP}:_token_logprobs_fused_kernel", {**_FUSED_SIG, "x_ptr": "*bf16", "g_ptr": "*bf16"},
                 {"MODE": mode, "ENTROPY": True, "HAS_DENT": mode == 0, "LOSS": 3, "HAS_OLD": True,
                  "HAS_DELTA": True, "HAS_RW": True, "BETA_NZ": True, "BIAS_KL": True,
                  "BLOCK_V": block, "LANES": False, "PHASE": 1}, warps, False,
                 id=f"token_logprobs_fused-stats-mode{mode}-B{block}-w{warps}")
    for mode in (0, 1) for block, warps in ((2048, 1), (2048, 2))
]

# linear_token_logprobs' opt-in fused GEMM kernels (tl.dot on bf16: wgmma), at FUSED_BLOCKS
_LIN = "r1kernels.ops.linear_token_logprobs"
_GEMM_ARGS = {"N": "i32", "H": "i32", "stride_hn": "i32", "stride_hk": "i32", "stride_wv": "i32",
              "stride_wk": "i32", "inv_temp": "fp32"}
SPECS += [
    pytest.param(f"{_LIN}:_linear_logprobs_fwd_kernel",
                 {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "labels_ptr": "*i64",
                  "part_ptr": "*fp32", "V": "i32", "v_per_split": "i32", **_GEMM_ARGS},
                 {"HAS_BIAS": bias, "ENTROPY": ent, "IEEE": False, "BM": 128, "BN": 64, "BK": 64},
                 8, True, id=f"linear_logprobs_fwd-bf16-bias{int(bias)}-ent{int(ent)}")
    for bias, ent in [(False, True), (True, True), (False, False)]
] + [
    pytest.param(f"{_LIN}:_linear_logprobs_grad_kernel",
                 {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "labels_ptr": "*i64",
                  "lse_ptr": "*fp32", "ent_ptr": "*fp32", "dlogp_ptr": "*fp32", "dent_ptr": "*fp32",
                  "g_ptr": "*bf16", "stride_g": "i32", "c": "i32", "col0": "i32",
                  "ignore_index": "i32", **_GEMM_ARGS},
                 {"HAS_BIAS": bias, "HAS_DENT": dent, "IEEE": False, "BM": 128, "BN": 64, "BK": 64},
                 8, True, id=f"linear_logprobs_grad-bf16-bias{int(bias)}-dent{int(dent)}")
    for bias, dent in [(False, True), (True, False), (False, False)]
]


_GRPO_FWD_SIG = {
    "lp_ptr": "*fp32", "old_ptr": "*fp32", "ref_ptr": "*fp32", "adv_ptr": "*fp32", "mask_ptr": "*u8",
    "rw_ptr": "*fp32", "grad_ptr": "*fp32", "part_ptr": "*fp32", "B": "i32", "T": "i32",
    "C": "i32", "CHUNK_T": "i32",
    **{f"s_{n}{i}": "i64" for n in ("lp", "old", "ref", "adv", "m", "rw") for i in (0, 1)},
    "eps_lo": "fp32", "eps_hi": "fp32", "delta": "fp32", "beta": "fp32", "tau_pos": "fp32",
    "tau_neg": "fp32", "ticket_ptr": "*i32", "nitems_ptr": "*fp32", "out_ptr": "*fp32",
    "scale_ptr": "*fp32", "max_len": "fp32",
}
SPECS += [
    pytest.param("r1kernels.ops.grpo_loss:_grpo_loss_fwd_kernel",
                 {**_GRPO_FWD_SIG, "lp_ptr": lp_ty},
                 {"LOSS": loss, "SEQ": seq, "HAS_OLD": True, "HAS_DELTA": loss < 5, "HAS_RW": True,
                  "BETA_NZ": True, "BIAS_KL": True, "WRITE_GRAD": True, "BLOCK_T": 1024,
                  "FINALIZE": final, "HAS_NITEMS": loss in (3, 5), "BLOCK_B": 256}, 4, False,
                 id=f"grpo_loss_fwd-loss{loss}-seq{int(seq)}-{lp_ty[1:]}-final{int(final)}")
    for loss in range(7) for seq in (False, True) for lp_ty in ("*fp32", "*bf16")
    for final in (False, True)
] + [
    pytest.param("r1kernels.ops.grpo_loss:_grpo_loss_finalize_kernel",
                 {"part_ptr": "*fp32", "nitems_ptr": "*fp32", "out_ptr": "*fp32", "scale_ptr": "*fp32",
                  "B": "i32", "C": "i32", "max_len": "fp32"},
                 {"LOSS": loss, "HAS_NITEMS": True, "BLOCK_B": 1024}, 4, False,
                 id=f"grpo_loss_finalize-loss{loss}")
    for loss in range(7)
] + [
    # ints equal to 1 may be specialized to constexprs: B = 1 (one row) and T = 1 must compile
    pytest.param("r1kernels.ops.grpo_loss:_grpo_loss_finalize_kernel",
                 {"part_ptr": "*fp32", "nitems_ptr": "*fp32", "out_ptr": "*fp32", "scale_ptr": "*fp32",
                  "max_len": "fp32"},
                 {"B": 1, "C": 1, "LOSS": loss, "HAS_NITEMS": False, "BLOCK_B": 16}, 4, False,
                 id=f"grpo_loss_finalize-loss{loss}-B1")
    for loss in (0, 2, 3)
] + [
    pytest.param("r1kernels.ops.grpo_loss:_grpo_loss_fwd_kernel",
                 {k: v for k, v in _GRPO_FWD_SIG.items() if k not in ("B", "T", "C", "CHUNK_T", "s_lp1", "s_m1")},
                 {"B": 1, "T": 1, "C": 1, "CHUNK_T": 1, "s_lp1": 1, "s_m1": 1, "LOSS": 0, "SEQ": seq, "HAS_OLD": True,
                  "HAS_DELTA": True, "HAS_RW": False, "BETA_NZ": True, "BIAS_KL": False,
                  "WRITE_GRAD": True, "BLOCK_T": 16, "FINALIZE": True, "HAS_NITEMS": False,
                  "BLOCK_B": 16}, 4, False, id=f"grpo_loss_fwd-B1-T1-seq{int(seq)}")
    for seq in (False, True)
]

# MoE (r1kernels/ops/moe.py): the tiles `_route_tiles` / `_rows_tiles` pick for real router and
# hidden sizes.
_MOE = "r1kernels.ops.moe"
_ROUTE_SIG = {"x_ptr": "*fp32", "bias_ptr": "*fp32", "replay_ptr": "*i64", "w_ptr": "*fp32", "ids_ptr": "*i32",
              "sel_ptr": "*fp32", "lse_ptr": "*fp32", "T": "i32", "E": "i32", "stride_x": "i32", "top_k": "i32",
              "n_group": "i32", "topk_group": "i32", "group_size": "i32", "scale": "fp32"}
SPECS += [
    pytest.param(f"{_MOE}:_moe_route_fwd_kernel", dict(_ROUTE_SIG, x_ptr=xt),
                 dict(SCORE=sig, HAS_BIAS=bias, REPLAY=rep, GROUPED=grp, GROUP_TAKE=take, NORM=True,
                      BLOCK_E=be, BLOCK_K=bk, BLOCK_G=bg, ROWS=rows), 4, False, id=f"moe_route_fwd-{name}")
    for name, xt, sig, bias, rep, grp, take, be, bk, bg, rows in [
        ("deepseek-v3", "*fp32", 1, True, False, True, 2, 256, 8, 8, 4),
        ("deepseek-v4", "*fp32", 2, True, False, False, 1, 256, 8, 2, 4),
        ("qwen3", "*bf16", 0, False, False, False, 1, 128, 8, 2, 8),
        ("E512-k32", "*fp32", 0, False, False, False, 1, 512, 32, 2, 2),
        ("E8-k2", "*fp16", 0, False, False, False, 1, 16, 2, 2, 16),
        ("replay", "*fp32", 1, False, True, False, 1, 256, 8, 2, 4),
    ]
] + [
    pytest.param(f"{_MOE}:_moe_route_bwd_kernel",
                 {"gs_ptr": "*fp32", "ids_ptr": "*i32", "sel_ptr": "*fp32", "x_ptr": "*fp32", "lse_ptr": "*fp32",
                  "dx_ptr": "*fp32", "T": "i32", "E": "i32", "stride_x": "i32", "top_k": "i32"},
                 dict(SCORE=sc, BLOCK_E=be, ROWS=rows), 4, False, id=f"moe_route_bwd-score{sc}-E{be}")
    for sc, be, rows in [(0, 256, 4), (1, 256, 4), (2, 256, 4), (0, 512, 2)]
] + [
    pytest.param(f"{_MOE}:_moe_route_bwd_kernel",
                 {"gs_ptr": "*fp32", "ids_ptr": "*i32", "sel_ptr": "*fp32", "x_ptr": "*bf16", "lse_ptr": "*fp32",
                  "dx_ptr": "*bf16", "T": "i32", "E": "i32", "stride_x": "i32", "top_k": "i32"},
                 dict(SCORE=0, BLOCK_E=128, ROWS=8), 4, False, id="moe_route_bwd-bf16-E128"),
] + [
    pytest.param(f"{_MOE}:_moe_chunk_count_kernel", {"ids_ptr": "*i32", "chunk_counts_ptr": "*i32", "N": "i32",
                                                      "n_chunks": "i32"}, dict(BLOCK=4096), 8, False,
                 id="moe_chunk_count"),
    pytest.param(f"{_MOE}:_moe_count_rank_kernel", {"ids_ptr": "*i32", "chunk_counts_ptr": "*i32", "rank_ptr": "*i32",
                                                     "counts_ptr": "*i32", "N": "i32", "n_chunks": "i32"},
                 dict(BLOCK=4096, BLOCK_C=32), 8, False, id="moe_count_rank"),
    pytest.param(f"{_MOE}:_moe_offsets_kernel", {"counts_ptr": "*i32", "offsets_ptr": "*i32", "E": "i32",
                                                  "align": "i32"}, dict(BLOCK_E=256), 4, False, id="moe_offsets"),
    pytest.param(f"{_MOE}:_moe_rows_kernel", {"ids_ptr": "*i32", "rank_ptr": "*i32", "offsets_ptr": "*i32",
                                               "row_ptr": "*i32", "token_ptr": "*i32", "N": "i32", "E": "i32",
                                               "K": "i32"}, dict(BLOCK=1024), 4, False, id="moe_rows"),
    pytest.param(f"{_MOE}:_moe_zero_pad_kernel", {"out_ptr": "*bf16", "counts_ptr": "*i32", "offsets_ptr": "*i32",
                                                   "E": "i32", "R": "i32", "H": "i32"}, dict(BLOCK_H=1024), 4, False,
                 id="moe_zero_pad"),
] + [
    pytest.param(f"{_MOE}:_moe_scatter_rows_kernel", {"x_ptr": "*bf16", "row_ptr": "*i32", "w_ptr": "*fp32",
                                                       "out_ptr": "*bf16", "H": "i32", "K": "i32", "R": "i32", "stride_x": "i32"},
                 dict(HAS_W=hw, BLOCK_K=8, BLOCK_H=512), 4, False, id=f"moe_scatter_rows-w{int(hw)}")
    for hw in (False, True)
] + [
    pytest.param(f"{_MOE}:_moe_unpermute_kernel", {"src_ptr": "*bf16", "row_ptr": "*i32", "w_ptr": "*fp32",
                                                    "out_ptr": "*bf16", "H": "i32", "K": "i32", "R": "i32"},
                 dict(HAS_W=hw, BLOCK_K=8, BLOCK_H=512), 4, False, id=f"moe_unpermute-w{int(hw)}")
    for hw in (False, True)
] + [
    pytest.param(f"{_MOE}:_moe_rows_dot_kernel", {"gy_ptr": "*bf16", "src_ptr": "*bf16", "row_ptr": "*i32",
                                                   "out_ptr": "*fp32", "H": "i32", "K": "i32", "R": "i32"},
                 dict(BLOCK_K=8, BLOCK_H=512), 4, False, id="moe_rows_dot"),
]


# the backward's in-place scaling by grad_output (r1kernels/nn.py), on bf16 and fp32 gradients
SPECS += [
    pytest.param("r1kernels.nn:_scale_rows_kernel",
                 {"t_ptr": f"*{ty}", "s_ptr": "*fp32", "n_rows": "i32", "T": "i32", "C": "i32",
                  "stride_b": "i64", "stride_t": "i64"}, dict(BLOCK=4096), 4, False,
                 id=f"scale_rows-{ty}")
    for ty in ("bf16", "fp32")
]

# sample_tokens (r1kernels/ops/sample_tokens.py): greedy, plain sampling, and every filter
_ST = "r1kernels.ops.sample_tokens"
SPECS += [
    pytest.param(f"{_ST}:_sample_tokens_kernel",
                 {"logits_ptr": f"*{xt}", "stride": "i64", "u_ptr": "*fp32", "tok_ptr": "*i64",
                  "logp_ptr": "*fp32", "V": "i32", "temp": "fp32", "top_k": "i32", "top_p": "fp32",
                  "min_p": "fp32"},
                 dict(GREEDY=g, TOPK=k, TOPP=p, MINP=m, BLOCK=1024, NPIV=16), 8, False,
                 id=f"sample_tokens-{xt}-g{int(g)}-k{int(k)}-p{int(p)}-m{int(m)}")
    for xt, g, k, p, m in [("bf16", True, False, False, False), ("bf16", False, False, False, False),
                           ("fp32", False, True, True, True), ("bf16", False, False, True, False)]
]


def _spec_id(param) -> str:
    return param.id


@pytest.fixture(scope="module")
def compiled():
    """Every spec compiled once, in two worker processes."""
    from sm90 import cuobjdump_path

    if not os.path.exists(cuobjdump_path()):  # pragma: no cover
        pytest.skip("Triton's NVIDIA tools (cuobjdump, ptxas) are missing")
    specs = [(p.id, *p.values[:4]) for p in SPECS]
    return compile_many(specs, workers=2)


@pytest.mark.parametrize("fn,signature,constexprs,num_warps,expect_wgmma", SPECS)
def test_compiles_for_sm90(compiled, request, fn, signature, constexprs, num_warps, expect_wgmma):
    sid = request.node.callspec.id
    c = compiled.get(sid, compiled.get("__worker__", "not compiled"))
    assert not isinstance(c, str), f"compiling {fn} for sm_90 failed:\n{c}"
    print(c)
    assert c.local == 0 and c.stack == 0, f"register spills: {c}"
    assert c.shared <= 227 * 1024, f"too much shared memory for an H100 SM: {c}"
    if expect_wgmma:
        assert "wgmma" in c.ptx, f"{c.name} does not use wgmma on sm_90"
