"""The cluster kernel of the fused logits ops (csrc/token_logprobs/fused_logits_cluster.cu).

It runs only on a GPU of compute capability 9+ (thread-block clusters, distributed shared
memory), so its numerical tests are skipped elsewhere; the tests of its switch
(R1K_FUSED_CLUSTER), of when it applies and of its bad-input checks run everywhere they can.

Tolerances: the kernel computes in fp32 on the 16-bit logits, as the Triton kernel does, so the
log-probs and entropies are compared with the float64 reference on the same logits at fp32
accuracy, and the gradient, rounded once to the logits' dtype, at that dtype's relative rounding
(2**-8 for bf16, 2**-11 for fp16, doubled) plus 1e-7 for the fp32 error of values near zero.
"""
import os
import re
import shutil
import subprocess

import pytest
import torch

import r1kernels
from r1kernels import _custom_ops
from r1kernels.ops import token_logprobs as tlp
from r1kernels.reference import token_logprobs_ref
from test_token_logprobs import _fwd_bwd_ref  # float64 values and gradients of the same loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON_GPU = (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
          and _custom_ops.has_kernel("fused_logits_cluster", "CUDA"))
GPU = pytest.mark.skipif(not ON_GPU, reason="needs a GPU of compute capability 9+ and the CUDA "
                                            "build of the extension")
# (CTAs per cluster, threads, variant): rows in registers, one cluster per row, or on persistent
# clusters with the L2 prefetch ("k")
SETTINGS = [(1, 256, 0), (2, 256, 0), (8, 256, 0), (16, 256, 0), (4, 512, 0), (16, 512, 0),
            (1, 256, 1), (8, 256, 1), (16, 256, 1), (4, 512, 1)]
SID = dict(ids=lambda s: "%dx%d%s" % (s[0], s[1], ("", "k")[s[2]]))
GRAD_RTOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _use(monkeypatch, setting):
    monkeypatch.setenv("R1K_FUSED_CLUSTER", "0" if setting is None else ",".join(map(str, setting)))


# ---- everywhere -------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expect", [("8,256", (8, 256, 0)), ("16,512", (16, 512, 0)),
                                          ("1,256", (1, 256, 0)), ("8,256,1", (8, 256, 1)),
                                          ("4,512,0", (4, 512, 0)), ("0", None), ("", None),
                                          ("off", None)])
def test_setting_parsed(monkeypatch, value, expect):
    monkeypatch.setenv("R1K_FUSED_CLUSTER", value)
    assert tlp._cluster_setting() == expect


@pytest.mark.parametrize("value", ["3,256", "8,128", "32,256", "8", "8,256,2", "8,256,1,1", "a,b"])
def test_bad_setting_rejected(monkeypatch, value):
    """A cluster size the kernel does not take, a thread count it was not compiled for, or a
    malformed value: a ValueError naming the variable, before anything is launched."""
    monkeypatch.setenv("R1K_FUSED_CLUSTER", value)
    with pytest.raises(ValueError, match="R1K_FUSED_CLUSTER"):
        tlp._cluster_setting()


def test_not_taken_off_gpu(monkeypatch):
    """On CPU tensors (here: the interpreter) the switch changes nothing: the Triton kernel runs
    and its numbers match the float64 reference."""
    _use(monkeypatch, (8, 256, 0))
    x = torch.randn(1, 5, 64).to(torch.bfloat16)
    assert tlp.cluster_config(x, x) is None
    if torch.cuda.is_available():
        return
    y = torch.randint(0, 64, (5,))
    glp = torch.randn(5)
    lp, _, g = r1kernels.token_logprobs_fwd_bwd(x[0], y, glp)
    xr = x[0].double().requires_grad_(True)
    (token_logprobs_ref(xr, y) * glp.double()).sum().backward()
    torch.testing.assert_close(g.double(), xr.grad, rtol=GRAD_RTOL[torch.bfloat16], atol=1e-7)


def test_capacity_matches_kernel():
    """The launcher's vocabulary limit (cluster * threads * 8 * CLUSTER_MAX_VECS) uses the same
    vectors-per-thread bound as the kernel's header and its largest compiled instance."""
    with open(os.path.join(ROOT, "csrc/token_logprobs/fused_logits_cluster.h")) as f:
        header = f.read()
    with open(os.path.join(ROOT, "csrc/token_logprobs/fused_logits_cluster.cu")) as f:
        kernel = f.read()
    assert int(re.search(r"kMaxVecsPerThread = (\d+);", header).group(1)) == tlp.CLUSTER_MAX_VECS
    compiled = [int(v) for v in re.search(r"kCompiled\[\] = \{([\d, ]+)\}", kernel).group(1).split(",")]
    assert max(compiled) == tlp.CLUSTER_MAX_VECS
    cases = re.findall(r"case (\d+): return fused_logits_cluster_kernel", kernel)
    assert sorted(int(c) for c in cases) == sorted(compiled)


NVCC = shutil.which("nvcc")


@pytest.mark.nvcc
@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed here")
def test_kernel_resources_sm90(tmp_path):
    """Compiled for sm_90 (no GPU needed), no instance of the cluster kernel spills or uses a
    stack frame (a row's vectors in local memory would be a third pass over the logits), and the
    instances the default setting runs at V=151936 (256 threads x 10 vectors: bf16 logits, and
    fp32 chunks with the doubled cluster; their persistent twins; the soft-capped head's
    instances) fit 80 registers, so 3 CTAs share an SM."""
    src = os.path.join(ROOT, "csrc", "token_logprobs", "fused_logits_cluster.cu")
    r = subprocess.run([NVCC, "-c", "-std=c++17", "-O3", "--use_fast_math", "-arch=sm_90",
                        "-I" + os.path.join(ROOT, "csrc"), src, "-o", str(tmp_path / "k.o"),
                        "-Xptxas", "-v"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    kernels, name = {}, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_90'", line)
        if m:
            name = m.group(1)
            kernels[name] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m and name:
            kernels[name].update(stack=int(m.group(1)), spills=int(m.group(2)) + int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            kernels[name]["regs"] = int(m.group(1))
    inst = {n: k for n, k in kernels.items() if "fused_logits_cluster_kernel" in n}
    # plain: dtype pairs x threads x vectors x modes x persistent; soft-capped: 256 threads,
    # not persistent
    assert len(inst) == 4 * 2 * 7 * 2 * 2 + 4 * 7 * 2
    assert all(k["stack"] == 0 and k["spills"] == 0 for k in inst.values()), \
        {n: k for n, k in inst.items() if k["stack"] or k["spills"]}
    default = {n: k for n, k in inst.items() if re.search(r"Li256ELi10ELi[01]ELb[01]E", n)}
    # soft-capped: the default setting's 256-thread, non-persistent instances only
    assert len(default) == 16 + 8 and all(k["regs"] <= 80 for k in default.values()), default


@pytest.mark.nvcc
@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed here")
def test_thread_math_on_host(tmp_path):
    """The kernel's per-thread arithmetic (csrc/token_logprobs/fused_logits_math.cuh: unpacking,
    the logits' range, the statistics' sums with and without the -inf clamp, the gradient, the
    merge by rescaling), the same functions compiled for the CPU, against float64 and against
    each other (tests/csrc/fused_logits_math_test.cu): what can be checked of the kernel without
    an sm_90 GPU."""
    src = os.path.join(ROOT, "tests", "csrc", "fused_logits_math_test.cu")
    exe = str(tmp_path / "fused_logits_math_test")
    r = subprocess.run([NVCC, "-std=c++17", "-O2", "-I" + os.path.join(ROOT, "csrc"), src, "-o",
                        exe], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    m = re.search(r"(\d+) checks, 0 failed", r.stdout)
    assert m and int(m.group(1)) > 50000, r.stdout[-3000:]


@pytest.mark.skipif(_custom_ops.EXT_ERROR is not None, reason="extension not built")
def test_schema_registered():
    assert _custom_ops.has_op("fused_logits_cluster")


# ---- on a GPU (compute capability 9+) -------------------------------------------------------


def _rows(N, V, gen, scale=3.0):
    x = torch.randn(N, V, generator=gen) * scale
    y = torch.randint(0, V, (N,), generator=gen)
    return x, y


@GPU
@pytest.mark.parametrize("setting", SETTINGS, **SID)
@pytest.mark.parametrize("V", [8, 1000, 2056, 40000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_fwd_bwd_matches_reference(monkeypatch, setting, V, dtype, inplace):
    """token_logprobs_fwd_bwd on the cluster kernel: log-probs, entropies and dL/dlogits against
    float64, with the labels on the first and last columns and around every CTA's segment
    boundary, an ignored row (NaN there: not read), a row whose upstream gradients are zero, logits of +-100 and a
    temperature; the gradient written over the logits or into a new buffer."""
    _use(monkeypatch, setting)
    gen = torch.Generator().manual_seed(V + setting[0])
    cl = setting[0]
    seg = ((V + cl - 1) // cl + 7) // 8 * 8
    edges = sorted({c for r in range(1, cl) for c in (r * seg - 1, r * seg) if 0 <= c < V})
    labels = [0, V - 1] + edges[:24]
    N = max(len(labels) + 4, 13)
    x, y = _rows(N, V, gen)
    y[:len(labels)] = torch.tensor(labels)
    y[len(labels)] = -100                       # ignored
    x[len(labels) + 1, ::5] = 100.0             # large logits
    x[len(labels) + 2, 1::3] = -100.0
    x = x.to(dtype)
    glp, gent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    glp[len(labels) + 3] = gent[len(labels) + 3] = 0.0  # dead row: exact zeros
    xd = x.cuda()
    xd[len(labels)] = float("nan")  # the ignored row is not read (the reference has it clean)
    # a row longer than the cluster holds (1 x 256 threads: 32768 columns) takes the Triton kernel
    fits = V <= setting[0] * setting[1] * 8 * tlp.CLUSTER_MAX_VECS
    assert tlp.cluster_config(xd.view(1, N, V), xd.view(1, N, V)) == (setting if fits else None)
    lp, ent, g = r1kernels.token_logprobs_fwd_bwd(xd, y.cuda(), glp.cuda(), grad_entropy=gent.cuda(),
                                                  with_entropy=True, temperature=0.7,
                                                  inplace=inplace)
    assert (g.data_ptr() == xd.data_ptr()) == inplace
    lr, er, gr = _fwd_bwd_ref(x, y, glp, gent, 0.7)
    torch.testing.assert_close(lp.cpu().double(), lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), er, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.cpu().double(), gr, rtol=GRAD_RTOL[dtype], atol=1e-7)
    assert (g[len(labels) + 3] == 0).all() and (g[len(labels)] == 0).all()


@GPU
@pytest.mark.parametrize("setting", [(8, 256, 0), (1, 256, 0), (8, 256, 1)], **SID)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_vocabulary_and_nan(monkeypatch, setting, dtype):
    """-inf logits (a masked vocabulary: probability 0, no entropy, zero gradient) on part of a
    CTA's columns and on a whole CTA segment, and very negative finite logits (bf16 -3e38, whose
    scaled value overflows fp32 to -inf at temperature 0.5; fp16 -6e4): the threads that hold
    them take the clamped sums, the others not, and every row matches float64 (where those logits
    are replaced by -300: probabilities below 1e-260, the same to float64). A NaN logit makes
    its row's log-prob NaN, never silently dropped."""
    _use(monkeypatch, setting)
    gen = torch.Generator().manual_seed(21)
    N, V, temp = 24, 2056, 0.5
    x, _ = _rows(N, V, gen)
    y = torch.randint(0, 50, (N,), generator=gen)  # labels among the first 50 columns
    cl = setting[0]
    seg = tlp._cluster_seg(V, cl)
    zero_p = torch.zeros(N, V, dtype=torch.bool)
    for r in range(0, 8):
        zero_p[r, 50 + 37 * r:50 + 37 * r + 100 * (r + 1)] = True
    if cl > 1:
        zero_p[8, seg:2 * seg] = True  # a whole CTA's segment
    zero_p[9, 60::3] = True
    x[zero_p] = float("-inf")
    x[10, 70::5] = -6e4 if dtype == torch.float16 else -3e38
    zero_p[10, 70::5] = True
    x = x.to(dtype)
    glp, gent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    xd = x.cuda()
    xd[N - 1, 500] = float("nan")
    lp, ent, g = r1kernels.token_logprobs_fwd_bwd(xd, y.cuda(), glp.cuda(), grad_entropy=gent.cuda(),
                                                  with_entropy=True, temperature=temp)
    xr = x.double()
    xr[zero_p] = -300.0
    lr, er, gr = _fwd_bwd_ref(xr, y, glp, gent, temp)
    ok = slice(0, N - 1)
    torch.testing.assert_close(lp[ok].cpu().double(), lr[ok], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[ok].cpu().double(), er[ok], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[ok].cpu().double(), gr[ok], rtol=GRAD_RTOL[dtype], atol=1e-7)
    assert torch.isfinite(g[ok]).all() and (g.cpu()[zero_p] == 0).all()
    assert torch.isnan(lp[N - 1]).item()


@GPU
@pytest.mark.parametrize("setting", [(8, 256, 0), (4, 512, 0), (16, 256, 0), (8, 256, 1),
                                     (4, 512, 1)], **SID)
def test_qwen_vocab(monkeypatch, setting):
    """V = 151936 (Qwen2.5), the target shape's rows, without the entropy's upstream gradient."""
    _use(monkeypatch, setting)
    gen = torch.Generator().manual_seed(5)
    N, V = 6, 151936
    x, y = _rows(N, V, gen)
    x = x.to(torch.bfloat16)
    glp = torch.randn(N, generator=gen)
    lp, ent, g = r1kernels.token_logprobs_fwd_bwd(x.cuda(), y.cuda(), glp.cuda(), with_entropy=True)
    lr, er, gr = _fwd_bwd_ref(x, y, glp, None, 1.0)
    torch.testing.assert_close(lp.cpu().double(), lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), er, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.cpu().double(), gr, rtol=GRAD_RTOL[torch.bfloat16], atol=1e-7)


@GPU
def test_matches_triton_kernel(monkeypatch):
    """Same logits, the cluster kernel and the Triton kernel: fp32 statistics agree to fp32
    rounding, gradients to one bf16 rounding."""
    gen = torch.Generator().manual_seed(9)
    N, V = 64, 32000
    x, y = _rows(N, V, gen)
    x = x.to(torch.bfloat16).cuda()
    y = y.cuda()
    glp, gent = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    res = {}
    for setting in (None, (8, 256, 0), (8, 256, 1)):
        _use(monkeypatch, setting)
        res[setting] = r1kernels.token_logprobs_fwd_bwd(x, y, glp, grad_entropy=gent,
                                                        with_entropy=True)
    a_lp, a_e, a_g = res[None]
    for setting in ((8, 256, 0), (8, 256, 1)):
        b_lp, b_e, b_g = res[setting]
        torch.testing.assert_close(b_lp, a_lp, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(b_e, a_e, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(b_g.float(), a_g.float(), rtol=2 ** -7, atol=1e-7)


@GPU
@pytest.mark.parametrize("setting", [(1, 256, 1), (8, 256, 1), (2, 512, 1)], **SID)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_persistent_clusters_walk_many_rows(monkeypatch, setting, inplace):
    """More rows than clusters fit at once, so that each persistent cluster walks many rows
    (and prefetches each next one): ignored rows (poisoned with NaN: not read, nor prefetched
    into a result) and rows with zero upstream gradients among them, every row against float64."""
    _use(monkeypatch, setting)
    gen = torch.Generator().manual_seed(11)
    N, V = 4000, 2056
    x, y = _rows(N, V, gen)
    x = x.to(torch.bfloat16)
    y[::7] = -100
    glp, gent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    glp[3::11] = gent[3::11] = 0.0
    xd = x.cuda()
    xd[::7] = float("nan")
    assert tlp.cluster_config(xd.view(1, N, V), xd.view(1, N, V)) == setting
    lp, ent, g = r1kernels.token_logprobs_fwd_bwd(xd, y.cuda(), glp.cuda(), grad_entropy=gent.cuda(),
                                                  with_entropy=True, temperature=1.3,
                                                  inplace=inplace)
    lr, er, gr = _fwd_bwd_ref(x, y, glp, gent, 1.3)
    torch.testing.assert_close(lp.cpu().double(), lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), er, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.cpu().double(), gr, rtol=GRAD_RTOL[torch.bfloat16], atol=1e-7)
    assert (g[::7] == 0).all() and (g[3::11] == 0).all()


@GPU
def test_persistent_grpo_from_logits_many_rows(monkeypatch):
    """GRPOLoss.from_logits on persistent clusters over more rows than fit at once (masked
    tokens skipped by whole clusters mid-walk): as with the Triton kernel."""
    gen = torch.Generator().manual_seed(12)
    B, T, V = 8, 700, 4104
    full = (torch.randn(B, T + 1, V, generator=gen) * 2).to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.7
    full[:, :-1][~mask] = float("nan")
    lp0 = -torch.rand(B, T, generator=gen) * 3
    kw = dict(old_logps=(lp0 + 0.1).cuda(), ref_logps=(lp0 - 0.1).cuda())
    adv = torch.randn(B, generator=gen).cuda()
    loss_fn = r1kernels.GRPOLoss(loss_type="dapo", beta=0.04, epsilon_high=0.28)
    res = {}
    for setting in (None, (8, 256, 1)):
        _use(monkeypatch, setting)
        x = full.cuda()[:, :-1].requires_grad_(True)
        out = loss_fn.from_logits(x, ids.cuda(), mask.cuda(), adv, inplace=True, **kw)
        out.loss.backward()
        res[setting] = (out.loss.item(), x.grad.float())
    assert res[(8, 256, 1)][0] == pytest.approx(res[None][0], rel=1e-5, abs=1e-7)
    assert (res[(8, 256, 1)][1][~mask.cuda()] == 0).all()
    torch.testing.assert_close(res[(8, 256, 1)][1], res[None][1], rtol=2 ** -7, atol=1e-7)


@GPU
def test_not_taken_where_it_does_not_apply(monkeypatch):
    """fp32 logits, a vocabulary that is not a multiple of 8 or over what the setting holds, and
    rows off 16-byte boundaries fall back to the Triton kernel (and still give the right
    numbers)."""
    _use(monkeypatch, (1, 256, 0))  # holds V <= 32768
    for x in (torch.randn(1, 4, 64, device="cuda"),
              torch.randn(1, 4, 100, device="cuda").to(torch.bfloat16),
              torch.randn(1, 4, 32776, device="cuda").to(torch.bfloat16),
              torch.randn(1, 4, 72, device="cuda").to(torch.bfloat16)[:, :, 4:68]):
        assert tlp.cluster_config(x, x) is None, x.shape
    x = torch.randn(3, 100, device="cuda").to(torch.bfloat16)
    y = torch.randint(0, 100, (3,), device="cuda")
    glp = torch.randn(3, device="cuda")
    _, _, g = r1kernels.token_logprobs_fwd_bwd(x, y, glp)
    xr = x.cpu().double().requires_grad_(True)
    (token_logprobs_ref(xr, y.cpu()) * glp.cpu().double()).sum().backward()
    torch.testing.assert_close(g.cpu().double(), xr.grad, rtol=GRAD_RTOL[torch.bfloat16], atol=1e-7)


@GPU
def test_bad_direct_call_is_value_error():
    """The op checks its arguments before launching: a ValueError, never a bad access."""
    x = torch.randn(1, 4, 64, device="cuda").to(torch.bfloat16)
    y = torch.zeros(4, dtype=torch.int64, device="cuda")
    out = torch.zeros(3, 4, device="cuda")
    glp = torch.zeros(4, device="cuda")
    op = torch.ops.r1kernels.fused_logits_cluster
    args = dict(inv_temp=1.0, ignore_index=-100, entropy=True, loss=0, eps_lo=0.2, eps_hi=0.2,
                delta=None, beta=0.0, bias_kl=False, tau_pos=1.0, tau_neg=1.05)
    with pytest.raises(ValueError, match="g must match x"):
        op(x, x[:, :2], y, out, glp, None, None, None, None, None, None, None, **args,
           cluster=8, threads=256, variant=0)
    with pytest.raises(ValueError, match="variant"):
        op(x, x, y, out, glp, None, None, None, None, None, None, None, **args, cluster=8,
           threads=256, variant=2)
    with pytest.raises(ValueError, match="cluster"):
        op(x, x, y, out, glp, None, None, None, None, None, None, None, **args, cluster=3,
           threads=256, variant=0)
    with pytest.raises(ValueError, match="glp"):
        op(x, x, y, out, glp[:3], None, None, None, None, None, None, None, **args, cluster=8,
           threads=256, variant=0)
    with pytest.raises(ValueError, match="adv is required"):
        op(x, x, y, out, None, None, None, None, None, None, None, None, **args, cluster=8,
           threads=256, variant=0)


@GPU
@pytest.mark.parametrize("setting", [(8, 256, 0), (4, 512, 0), (16, 256, 0),
                                     (8, 256, 1)], **SID)
@pytest.mark.parametrize("V", [1000, 151936])
@pytest.mark.parametrize("group", ["0", "192"], ids=["G-over-chunk", "G-groups"])
def test_hidden_state_chunks(monkeypatch, setting, V, group):
    """linear_token_logprobs_fwd_bwd (bf16) with the cluster kernel on its fp32 logits chunks
    (bf16 G written over the chunk's own storage, or into the G group buffer: 64-row chunks in
    192-row groups) equals the tile kernels' path, and the chunk kernel was taken."""
    from r1kernels.ops import linear_token_logprobs as lin

    monkeypatch.setattr(lin, "TILE_ELEMS_CUDA", 64 * V)
    monkeypatch.setenv("R1K_SWEEP_GROUP_ROWS", group)
    gen = torch.Generator().manual_seed(4)
    N, H = 300, 64
    h = torch.randn(N, H, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randn(V, H, generator=gen) / H ** 0.5 * 2).to(torch.bfloat16).cuda()
    y = torch.randint(0, V, (N,), generator=gen).cuda()
    y[7] = -100
    glp, gent = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    z = torch.empty(4, V, device="cuda")
    g = z.view(torch.bfloat16)[:, :V]
    _use(monkeypatch, setting)
    assert tlp.cluster_config(z.unsqueeze(1), g.unsqueeze(1)) is not None
    res = []
    for s in (setting, None):
        _use(monkeypatch, s)
        res.append(r1kernels.linear_token_logprobs_fwd_bwd(h, w, y, glp, grad_entropy=gent,
                                                           with_entropy=True, temperature=0.9))
    for name, a, b in zip(("logp", "entropy", "grad_hidden", "grad_weight"), res[0], res[1]):
        tol = dict(rtol=1e-5, atol=1e-5) if name in ("logp", "entropy") else \
            dict(rtol=2 ** -6, atol=1e-3)
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)


@GPU
def test_grpo_hidden_state_chunks(monkeypatch):
    """GRPOLoss on hidden states (token-level, bf16, masked and ignored tokens) with the cluster
    kernel on its chunks equals the path without it."""
    gen = torch.Generator().manual_seed(6)
    B, T, H, V = 4, 300, 64, 32000
    h = torch.randn(B, T, H, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randn(V, H, generator=gen) / H ** 0.5 * 2).to(torch.bfloat16).cuda()
    y = torch.randint(0, V, (B, T), generator=gen).cuda()
    y[0, 2] = -100
    mask = (torch.rand(B, T, generator=gen) < 0.8).cuda()
    adv = torch.randn(B, generator=gen).cuda()
    lp0 = -torch.rand(B, T, generator=gen).cuda() * 3
    kw = dict(old_logps=lp0 + 0.1, ref_logps=lp0 - 0.1)
    loss_fn = r1kernels.GRPOLoss(loss_type="dapo", beta=0.04, epsilon_high=0.28)
    res = {}
    for s in (None, (8, 256, 0), (8, 256, 1)):
        _use(monkeypatch, s)
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = loss_fn(hh, ww, y, mask, adv, **kw)
        out.loss.backward()
        res[s] = (out.loss.item(), hh.grad.double().cpu(), ww.grad.double().cpu())
    # float64 on CPU: both paths round G to bf16 before the gradient GEMMs, so they differ from
    # each other by a few bf16 roundings in sums of 1200 tokens (6 of 2e6 grad_weight elements
    # beyond 2^-6 relative between the two on the H100); each is held to the Triton path's own
    # distance from float64
    hr, wr = h.double().cpu().requires_grad_(True), w.double().cpu().requires_grad_(True)
    out = loss_fn(hr, wr, y.cpu(), mask.cpu(), adv.double().cpu(),
                  **{k: v.double().cpu() for k, v in kw.items()})
    out.loss.backward()
    ref = (out.loss.item(), hr.grad, wr.grad)
    base = res[None]
    for s in ((8, 256, 0), (8, 256, 1)):
        assert res[s][0] == pytest.approx(base[0], rel=1e-5, abs=1e-6)
        for k in (1, 2):
            err, err0 = (res[s][k] - ref[k]).abs(), (base[k] - ref[k]).abs()
            assert err.max() <= 1.25 * err0.max() and err.mean() <= 1.1 * err0.mean(), (s, k)


GRPO_CASES = [
    dict(loss_type="dapo", beta=0.04, epsilon_high=0.28),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True),
    dict(loss_type="bnpo", delta=1.5),
    dict(loss_type="dr_grpo", max_completion_length=40),
    dict(loss_type="cispo", epsilon_high=2.0),
    dict(loss_type="sapo"),
    dict(loss_type="luspo"),
]


@GPU
@pytest.mark.parametrize("case", GRPO_CASES, ids=lambda c: c["loss_type"])
@pytest.mark.parametrize("with_old", [False, True], ids=["on-policy", "old"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_grpo_from_logits_matches_triton(monkeypatch, case, with_old, inplace):
    """GRPOLoss.from_logits (token-level ratio) on the cluster kernel: loss, metrics and the
    logits gradient as with the Triton kernel (itself checked against float64 elsewhere), on
    logits[:, :-1] of [B, T + 1, V] (strided rows), with masked tokens poisoned with NaN (not
    read: zero gradient), ignored labels and rollout importance weights."""
    gen = torch.Generator().manual_seed(3)
    B, T, V = 3, 37, 4104
    full = (torch.randn(B, T + 1, V, generator=gen) * 2).to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T), generator=gen)
    ids[1, 4] = -100
    mask = torch.rand(B, T, generator=gen) < 0.8
    mask[2] = False  # a fully masked sequence
    full[:, :-1][~mask] = float("nan")
    lp0 = -torch.rand(B, T, generator=gen) * 3
    old = (lp0 + torch.randn(B, T, generator=gen) * 0.2) if with_old else None
    ref = lp0 + torch.randn(B, T, generator=gen) * 0.2
    adv = torch.randn(B, generator=gen)
    rw = torch.rand(B, T, generator=gen) + 0.5
    loss_fn = r1kernels.GRPOLoss(**case)
    kw = dict(old_logps=None if old is None else old.cuda(),
              ref_logps=ref.cuda() if case.get("beta", 0.0) else None,
              rollout_is_weights=rw.cuda())
    res = {}
    for setting in (None, (8, 256, 0), (8, 256, 1)):
        _use(monkeypatch, setting)
        x = full.cuda()[:, :-1].requires_grad_(True)
        if setting is not None:
            assert tlp.cluster_config(x, x) == setting
        out = loss_fn.from_logits(x, ids.cuda(), mask.cuda(), adv.cuda(), inplace=inplace, **kw)
        out.loss.backward()
        res[setting] = (out.loss.item(), {k: v.item() for k, v in out.metrics.items()},
                        x.grad.float())
    la, ma, ga = res[None]
    for setting in ((8, 256, 0), (8, 256, 1)):
        lb, mb, gb = res[setting]
        assert lb == pytest.approx(la, rel=1e-5, abs=1e-7)
        for k, v in ma.items():
            assert mb[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        assert torch.isfinite(gb).all()
        assert (gb[~mask.cuda()] == 0).all()
        torch.testing.assert_close(gb, ga, rtol=2 ** -7, atol=1e-7)


# ---- the hidden-state sweep's chunk hook, with the Triton kernel standing in (CPU) -----------


@pytest.fixture
def emulated(monkeypatch):
    """Stand the Triton fused kernel (fused_triton: the same contract) in for the cluster kernel,
    so that everything around it runs here: when it applies, the per-row inputs cut to each
    chunk of the hidden-state single sweep (the GRPO scale per token), the fp32 logits read and
    the 16-bit G written over their storage. Returns the list of (x shape, x dtype, g dtype) of
    the calls. Small chunks (16 rows at V=1000) so that a sweep has several."""
    if torch.cuda.is_available():
        pytest.skip("emulation for machines without a GPU (the GPU tests run the kernel itself)")
    from r1kernels.ops import linear_token_logprobs as ltp

    calls = []

    def config(x3, g3):
        return (8, 256, 0) if tlp._cluster_dtypes_ok(x3, g3) else None

    def emulate(x3, labels, g3, inv_temp, ignore_index, with_entropy, setting, **kw):
        calls.append((tuple(x3.shape), x3.dtype, g3.dtype))
        return tlp.fused_triton(x3, labels, g3, inv_temp, ignore_index, with_entropy, **kw)

    monkeypatch.setattr(tlp, "cluster_config", config)
    monkeypatch.setattr(tlp, "fused_cluster", emulate)
    monkeypatch.setattr(ltp, "TILE_ELEMS_CPU", 16 * 1000)
    # G in the 16-bit dtype of the inputs, as on CUDA (both paths compared below)
    monkeypatch.setattr(ltp, "_gemm_dtype", lambda x: x.dtype if x.dtype in (
        torch.bfloat16, torch.float16) else torch.float32)
    return calls


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("head", [{}, dict(softcap=2.0, logit_scale=0.5)], ids=["plain", "softcap"])
def test_hidden_fwd_bwd_chunks(emulated, monkeypatch, with_entropy, head):
    """linear_token_logprobs_fwd_bwd (bf16) through the chunk hook equals the path without it
    (tile kernels, grad_fn), chunk by chunk: ignored rows left out before the sweep, upstream
    gradients cut at each chunk's first row; a soft-capped head's constants handed on."""
    from r1kernels import dispatch

    gen = torch.Generator().manual_seed(1)
    N, H, V = 50, 24, 1000
    h = (torch.randn(N, H, generator=gen)).to(torch.bfloat16)
    w = (torch.randn(V, H, generator=gen) / H ** 0.5 * 2).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), generator=gen)
    y[[3, 17]] = -100
    glp, gent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    kw = dict(grad_entropy=gent if with_entropy else None, with_entropy=with_entropy,
              temperature=0.8, **head)
    with dispatch.use_backend("triton"):
        got = r1kernels.linear_token_logprobs_fwd_bwd(h, w, y, glp, **kw)
        n_calls = len(emulated)
        monkeypatch.setattr(tlp, "cluster_config", lambda x3, g3: None)
        want = r1kernels.linear_token_logprobs_fwd_bwd(h, w, y, glp, **kw)
    assert n_calls == 3 and emulated[0] == ((16, 1, V), torch.float32, torch.bfloat16)
    names = ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        tol = dict(rtol=1e-5, atol=1e-5) if name in ("logp", "entropy") else \
            dict(rtol=2 ** -6, atol=1e-3)
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)


@pytest.mark.parametrize("loss_type,opts,old,beta", [
    ("dapo", dict(epsilon_high=0.28, beta=0.04), True, True),
    ("cispo", dict(epsilon_high=1.1), True, False),
    ("sapo", dict(), False, False),
    ("dr_grpo", dict(max_completion_length=16, delta=1.5), True, False),
])
def test_grpo_hidden_chunks(emulated, monkeypatch, loss_type, opts, old, beta):
    """GRPOLoss on hidden states (token-level ratio, bf16) through the chunk hook equals the path
    without it: the live rows (masked and ignored tokens left out) in chunks that cross sequence
    boundaries, each row's GRPO inputs and loss scale handed to the kernel."""
    from r1kernels import dispatch

    gen = torch.Generator().manual_seed(2)
    B, T, H, V = 4, 19, 24, 1000
    h = torch.randn(B, T, H, generator=gen).to(torch.bfloat16)
    w = (torch.randn(V, H, generator=gen) / H ** 0.5 * 2).to(torch.bfloat16)
    y = torch.randint(0, V, (B, T), generator=gen)
    y[0, 2] = -100
    mask = torch.rand(B, T, generator=gen) < 0.8
    adv = torch.randn(B, generator=gen)
    lp0 = -torch.rand(B, T, generator=gen) * 3
    kw = dict(old_logps=lp0 + torch.randn(B, T, generator=gen) * 0.2 if old else None,
              ref_logps=lp0 + torch.randn(B, T, generator=gen) * 0.2 if beta else None,
              rollout_is_weights=torch.rand(B, T, generator=gen) + 0.5)
    loss_fn = r1kernels.GRPOLoss(loss_type=loss_type, **opts)
    res = []
    for emulate in (True, False):
        if not emulate:
            monkeypatch.setattr(tlp, "cluster_config", lambda x3, g3: None)
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with dispatch.use_backend("triton"):
            out = loss_fn(hh, ww, y, mask, adv, **kw)
        out.loss.backward()
        res.append((out.loss.item(), {k: v.item() for k, v in out.metrics.items()},
                    hh.grad.float(), ww.grad.float(), len(emulated)))
    (la, ma, gha, gwa, calls), (lb, mb, ghb, gwb, _) = res
    assert calls >= 3  # live rows in 16-row chunks
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    for k, v in mb.items():
        assert ma[k] == pytest.approx(v, rel=1e-5, abs=1e-5), k
    torch.testing.assert_close(gha, ghb, rtol=2 ** -6, atol=1e-3)
    torch.testing.assert_close(gwa, gwb, rtol=2 ** -6, atol=1e-3)
