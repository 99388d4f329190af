"""Every Triton kernel compiles for Hopper (sm_90) without spilling registers.

Runs without a GPU: triton.compile targets sm_90 and cuobjdump reads the cubin. Add each new
kernel to SPECS with the constexpr configurations its launcher actually uses. Skipped when
triton (with its NVIDIA backend) is not installed.
"""
import pytest

triton = pytest.importorskip("triton")

from sm90 import compile_sm90  # noqa: E402


# ("module:kernel", signature of the runtime arguments, constexprs, num_warps, expect_wgmma)
SPECS = [
    pytest.param("r1kernels.ops.group_advantages:_group_advantages_fwd_kernel",
                 {"r_ptr": "*fp32", "out_ptr": "*fp32", "P": "i32", "G": "i32", "eps": "fp32"},
                 {"MODE": mode, "BLOCK_G": bg, "ROWS": rows, "BLOCK_B": 2048}, 4, False,
                 id=f"group_advantages-mode{mode}-G{bg}")
    for mode, bg, rows in [(0, 16, 64), (1, 16, 64), (2, 16, 64), (0, 1024, 1), (0, 1, 1024)]
]

# MoE (r1kernels/ops/moe.py): the tiles `_route_tiles` / `_rows_tiles` pick for real router and
# hidden sizes.
_MOE = "r1kernels.ops.moe"
_ROUTE_SIG = {"x_ptr": "*fp32", "bias_ptr": "*fp32", "replay_ptr": "*i64", "w_ptr": "*fp32", "ids_ptr": "*i32",
              "sel_ptr": "*fp32", "lse_ptr": "*fp32", "T": "i32", "E": "i32", "stride_x": "i32", "top_k": "i32",
              "n_group": "i32", "topk_group": "i32", "group_size": "i32", "scale": "fp32"}
SPECS += [
    pytest.param(f"{_MOE}:_moe_route_fwd_kernel", dict(_ROUTE_SIG, x_ptr=xt),
                 dict(SIGMOID=sig, HAS_BIAS=bias, REPLAY=rep, GROUPED=grp, GROUP_TAKE=take, NORM=True,
                      BLOCK_E=be, BLOCK_K=bk, BLOCK_G=bg, ROWS=rows), 4, False, id=f"moe_route_fwd-{name}")
    for name, xt, sig, bias, rep, grp, take, be, bk, bg, rows in [
        ("deepseek-v3", "*fp32", True, True, False, True, 2, 256, 8, 8, 4),
        ("qwen3", "*bf16", False, False, False, False, 1, 128, 8, 2, 8),
        ("E512-k32", "*fp32", False, False, False, False, 1, 512, 32, 2, 2),
        ("E8-k2", "*fp16", False, False, False, False, 1, 16, 2, 2, 16),
        ("replay", "*fp32", True, False, True, False, 1, 256, 8, 2, 4),
    ]
] + [
    pytest.param(f"{_MOE}:_moe_route_bwd_kernel",
                 {"gs_ptr": "*fp32", "ids_ptr": "*i32", "sel_ptr": "*fp32", "x_ptr": "*fp32", "lse_ptr": "*fp32",
                  "dx_ptr": "*fp32", "T": "i32", "E": "i32", "stride_x": "i32", "top_k": "i32"},
                 dict(SIGMOID=sig, BLOCK_E=be, ROWS=rows), 4, False, id=f"moe_route_bwd-sig{int(sig)}-E{be}")
    for sig, be, rows in [(False, 256, 4), (True, 256, 4), (False, 512, 2)]
] + [
    pytest.param(f"{_MOE}:_moe_route_bwd_kernel",
                 {"gs_ptr": "*fp32", "ids_ptr": "*i32", "sel_ptr": "*fp32", "x_ptr": "*bf16", "lse_ptr": "*fp32",
                  "dx_ptr": "*bf16", "T": "i32", "E": "i32", "stride_x": "i32", "top_k": "i32"},
                 dict(SIGMOID=False, BLOCK_E=128, ROWS=8), 4, False, id="moe_route_bwd-bf16-E128"),
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
                                                       "out_ptr": "*bf16", "H": "i32", "K": "i32", "stride_x": "i32"},
                 dict(HAS_W=hw, BLOCK_K=8, BLOCK_H=512), 4, False, id=f"moe_scatter_rows-w{int(hw)}")
    for hw in (False, True)
] + [
    pytest.param(f"{_MOE}:_moe_unpermute_kernel", {"src_ptr": "*bf16", "row_ptr": "*i32", "w_ptr": "*fp32",
                                                    "out_ptr": "*bf16", "H": "i32", "K": "i32"},
                 dict(HAS_W=hw, BLOCK_K=8, BLOCK_H=512), 4, False, id=f"moe_unpermute-w{int(hw)}")
    for hw in (False, True)
] + [
    pytest.param(f"{_MOE}:_moe_rows_dot_kernel", {"gy_ptr": "*bf16", "src_ptr": "*bf16", "row_ptr": "*i32",
                                                   "out_ptr": "*fp32", "H": "i32", "K": "i32"},
                 dict(BLOCK_K=8, BLOCK_H=512), 4, False, id="moe_rows_dot"),
]


@pytest.mark.parametrize("fn,signature,constexprs,num_warps,expect_wgmma", SPECS)
def test_compiles_for_sm90(fn, signature, constexprs, num_warps, expect_wgmma):
    try:
        c = compile_sm90(fn, signature, constexprs, num_warps=num_warps)
    except RuntimeError as exc:
        if "No such file" in str(exc) and "cuobjdump" in str(exc):  # pragma: no cover
            pytest.skip(f"Triton's NVIDIA tools are missing: {exc}")
        raise
    print(c)
    assert c.local == 0 and c.stack == 0, f"register spills: {c}"
    assert c.shared <= 227 * 1024, f"too much shared memory for an H100 SM: {c}"
    if expect_wgmma:
        assert "wgmma" in c.ptx, f"{c.name} does not use wgmma on sm_90"
