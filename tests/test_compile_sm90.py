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


_GRPO_FWD_SIG = {
    "lp_ptr": "*fp32", "old_ptr": "*fp32", "ref_ptr": "*fp32", "adv_ptr": "*fp32", "mask_ptr": "*u8",
    "rw_ptr": "*fp32", "grad_ptr": "*fp32", "part_ptr": "*fp32", "B": "i32", "T": "i32",
    **{f"s_{n}{i}": "i64" for n in ("lp", "old", "ref", "adv", "m", "rw") for i in (0, 1)},
    "eps_lo": "fp32", "eps_hi": "fp32", "delta": "fp32", "beta": "fp32", "tau_pos": "fp32",
    "tau_neg": "fp32",
}
SPECS += [
    pytest.param("r1kernels.ops.grpo_loss:_grpo_loss_fwd_kernel",
                 {**_GRPO_FWD_SIG, "lp_ptr": lp_ty},
                 {"LOSS": loss, "SEQ": seq, "HAS_OLD": True, "HAS_DELTA": loss < 5, "HAS_RW": True,
                  "BETA_NZ": True, "BIAS_KL": True, "WRITE_GRAD": True, "BLOCK_T": 1024}, 4, False,
                 id=f"grpo_loss_fwd-loss{loss}-seq{int(seq)}-{lp_ty[1:]}")
    for loss in range(7) for seq in (False, True) for lp_ty in ("*fp32", "*bf16")
] + [
    pytest.param("r1kernels.ops.grpo_loss:_grpo_loss_finalize_kernel",
                 {"part_ptr": "*fp32", "nitems_ptr": "*fp32", "out_ptr": "*fp32", "scale_ptr": "*fp32",
                  "B": "i32", "max_len": "fp32"},
                 {"LOSS": loss, "HAS_NITEMS": True, "BLOCK_B": 1024}, 4, False,
                 id=f"grpo_loss_finalize-loss{loss}")
    for loss in range(7)
] + [
    pytest.param("r1kernels.ops.grpo_loss:_grpo_loss_bwd_kernel",
                 {"grad_ptr": "*fp32", "scale_ptr": "*fp32", "gout_ptr": "*fp32", "out_ptr": out_ty,
                  "T": "i32"},
                 {"BLOCK_T": 1024}, 4, False, id=f"grpo_loss_bwd-{out_ty[1:]}")
    for out_ty in ("*fp32", "*bf16")
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
