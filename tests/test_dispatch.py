"""Backend selection, the environment report, and the package without its extension."""
import os
import subprocess
import sys

import pytest
import torch

import r1kernels
from r1kernels import _custom_ops, dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code: str, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=full)


def test_extension_is_built():
    """The README's install builds the C++ extension; a silent fallback would hide a broken build."""
    if os.environ.get("R1K_SKIP_EXT") == "1":
        pytest.skip("R1K_SKIP_EXT=1: package installed without its extension")
    assert _custom_ops.EXT_ERROR is None, _custom_ops.EXT_ERROR
    assert dispatch.select("group_advantages", "cpu") == "cpp"


def test_env_report():
    res = subprocess.run([sys.executable, "-m", "r1kernels"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "torch " in res.stdout and "group_advantages" in res.stdout
    assert "C++ extension:" in res.stdout
    if _custom_ops.EXT_ERROR is None:  # which SIMD copy of the CPU kernels runs here
        from r1kernels import _C

        level = _C.cpu_simd_level()
        assert level.startswith(("x86-64-v4", "x86-64-v3", "baseline")), level
        assert f"C++ CPU kernels: {level}" in res.stdout


def test_env_backend_forced():
    res = run_py("import torch, r1kernels; from r1kernels import dispatch; "
                 "print(dispatch.select('group_advantages', 'cpu'))", R1K_BACKEND="torch")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "torch"


def test_env_backend_invalid():
    res = run_py("import r1kernels", R1K_BACKEND="tpu")
    assert res.returncode != 0 and "R1K_BACKEND" in res.stderr


def test_env_backend_unavailable_raises():
    res = run_py("import torch, r1kernels; r1kernels.group_advantages(torch.randn(4), 2)", R1K_BACKEND="cuda")
    assert res.returncode != 0 and "cuda" in res.stderr and "CUDA tensors" in res.stderr


def test_works_without_extension():
    code = ("import sys; sys.modules['r1kernels._C'] = None\n"  # make `import r1kernels._C` fail
            "import torch, r1kernels\n"
            "from r1kernels import dispatch, _custom_ops\n"
            "assert _custom_ops.EXT_ERROR is not None\n"
            "print(dispatch.select('group_advantages', 'cpu'))\n"
            "print(r1kernels.group_advantages(torch.tensor([0., 1., 2., 2.]), 2).tolist())")
    res = run_py(code)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "torch"
    assert lines[1].startswith("[-0.70")


def test_use_backend_restores():
    default = dispatch.select("group_advantages", "cpu")
    assert default != "torch"
    with dispatch.use_backend("torch"):
        assert dispatch.select("group_advantages", "cpu") == "torch"
        with dispatch.use_backend(None):  # nested: the automatic choice again
            assert dispatch.select("group_advantages", "cpu") == default
        assert dispatch.select("group_advantages", "cpu") == "torch"
    assert dispatch.select("group_advantages", "cpu") == default
    with pytest.raises(ValueError):
        dispatch.set_backend("fpga")
    with pytest.raises(ValueError), dispatch.use_backend("fpga"):
        pass


def test_use_backend_is_per_thread():
    """Two threads entering and leaving use_backend interleaved: each sees only its own setting,
    and none is left forced afterwards (a process-wide global left "torch" forced)."""
    import threading

    default = dispatch.select("group_advantages", "cpu")
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with dispatch.use_backend("torch"):
            a_in.set()
            b_in.wait(10)
            seen["a"] = dispatch.select("group_advantages", "cpu")
        a_out.set()

    def b():
        a_in.wait(10)
        seen["b_before"] = dispatch.select("group_advantages", "cpu")
        with dispatch.use_backend(None):
            b_in.set()
            a_out.wait(10)
        seen["b_after"] = dispatch.select("group_advantages", "cpu")

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"a": "torch", "b_before": default, "b_after": default}
    assert dispatch.select("group_advantages", "cpu") == default


def test_use_backend_under_compile():
    """torch.compile re-selects the backend when a use_backend block changes it."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def which(x):
        return x + (1.0 if dispatch.select("group_advantages", x.device) == "torch" else 0.0)

    x = torch.zeros(1)
    plain = which(x).item()
    with dispatch.use_backend("torch"):
        assert which(x).item() == 1.0
    assert which(x).item() == plain


def test_available_backends_cpu():
    av = dispatch.available_backends("group_advantages", "cpu")
    assert "torch" in av
    if dispatch.TRITON_INTERPRET and dispatch.HAS_TRITON:
        assert "triton" in av
    assert "cuda" not in av


@pytest.mark.skipif(_custom_ops.EXT_ERROR is not None, reason="extension not built")
def test_cpp_check_messages_format_numbers():
    """The C++ checks format their numbers, sizes, dtypes and devices through r1k::msg
    (csrc/common/check_msg.h), not the message stream, in the text the stream would have
    written: integers, int lists "[a, b]", dtype and device names."""
    op = torch.ops.r1kernels
    with pytest.raises(ValueError, match=r"rewards must be 1-D \[P \* G\], got 2-D"):
        op.group_advantages(torch.zeros(2, 3), 3, "group", 1e-6)
    with pytest.raises(ValueError, match=r"rewards.numel\(\) \(7\) is not a multiple of group_size \(3\)"):
        op.group_advantages(torch.zeros(7), 3, "group", 1e-6)
    with pytest.raises(ValueError, match=r"rewards must be float32, got Double"):
        op.group_advantages(torch.zeros(6, dtype=torch.float64), 3, "group", 1e-6)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, E=8\], got 9"):
        op.moe_route(torch.zeros(4, 8), 9, "softmax", 1, 1, None, False, 1.0, None)
    with pytest.raises(ValueError, match=r"correction_bias must be float32 \[E=8\], got Float \[7\]"):
        op.moe_route(torch.zeros(4, 8), 2, "softmax", 1, 1, torch.zeros(7), False, 1.0, None)
