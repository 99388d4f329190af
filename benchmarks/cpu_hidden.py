"""GRPOLoss on hidden states on CPU against what users would run instead, at the shapes of
issue 23: N = 512 and 4096 tokens, H = 512, V = 151936 and 32000, fp32, one thread.

Times are CPU seconds of this process per call (time.process_time, median of CPU_HIDDEN_REPS
calls after a warm-up): with one thread they do not count the time other processes take on a
shared machine, as wall-clock time would. Peak memory: the extra bytes a call allocates
(tests/cpu_memory.py, torch.profiler's allocation events).

    python benchmarks/cpu_hidden.py                      # every shape, every provider
    CPU_HIDDEN_SHAPES="512,151936" CPU_HIDDEN_PROVIDERS="r1k,eager" python benchmarks/cpu_hidden.py

Providers: r1k (GRPOLoss), eager (logits, TRL's loss), compiled (torch.compile of eager), trl
(TRL 1.16's chunked lm_head log-probs, then its loss) and liger (LigerFusedLinearGRPOLoss), the
last two when installed.
"""
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]

import r1kernels  # noqa: E402
from bench_grpo_loss import trl_style_logits_loss, trl_style_loss  # noqa: E402
from cpu_memory import peak_extra_bytes  # noqa: E402

H, T = 512, 128


def providers(hidden, weight, ids, mask, adv, old, ref):
    B = hidden.shape[0]
    grads = (hidden, weight)
    loss_fn = r1kernels.GRPOLoss(loss_type="dapo", beta=0.04, epsilon_high=0.28)

    def ours():
        out = loss_fn(hidden, weight, ids, mask, adv, old_logps=old, ref_logps=ref)
        return torch.autograd.grad(out.loss, grads)

    def eager_loss(h, w):
        return trl_style_logits_loss(h @ w.T, ids, old, ref, adv, mask)

    compiled_loss = torch.compile(eager_loss)
    out = {"r1k": ours,
           "eager": lambda: torch.autograd.grad(eager_loss(hidden, weight), grads),
           "compiled": lambda: torch.autograd.grad(compiled_loss(hidden, weight), grads)}
    try:
        from bench_linear_token_logprobs import _trl_chunked

        chunked = _trl_chunked()

        def trl():
            logps = chunked.apply(hidden.view(-1, H), weight, None, ids.view(-1), 1.0, 32768,
                                  None, 1.0, ("entropy",))[0].view(B, T)
            return torch.autograd.grad(trl_style_loss(logps, old, ref, adv, mask), grads)
        out["trl"] = trl
    except BaseException as exc:  # noqa: BLE001 - pytest.skip inside: TRL not importable here
        print(f"trl: not measured ({exc!r})")
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger_fn = LigerFusedLinearGRPOLoss(beta=0.04, use_ref_model=True, epsilon_low=0.2,
                                            epsilon_high=0.28, loss_type="dapo")

        def liger():
            res = liger_fn(hidden, weight, ids, mask.long(), adv, ref_per_token_logps=ref,
                           old_per_token_logps=old)
            return torch.autograd.grad(res[0] if isinstance(res, tuple) else res, grads)
        out["liger"] = liger
    except ImportError:
        print("liger: not installed (pip install liger-kernel)")
    return out


def cpu_seconds(fn, reps: int) -> float:
    fn()  # warm-up (torch.compile)
    ts = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return statistics.median(ts)


def main() -> int:
    torch.set_num_threads(1)
    reps = int(os.environ.get("CPU_HIDDEN_REPS", "3"))
    shapes = [tuple(int(v) for v in s.split(",")) for s in
              os.environ.get("CPU_HIDDEN_SHAPES", "512,151936;4096,151936;512,32000;4096,32000")
              .split(";")]
    wanted = os.environ.get("CPU_HIDDEN_PROVIDERS", "r1k,eager,compiled,trl,liger").split(",")
    print(f"{'N':>5} {'V':>7} {'provider':>9} {'CPU s':>8} {'vs eager':>8} {'peak MiB':>9}")
    for N, V in shapes:
        g = torch.Generator().manual_seed(0)
        B = N // T
        hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
        weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_(True)
        ids = torch.randint(0, V, (B, T), generator=g)
        mask = torch.rand(B, T, generator=g) > 0.1
        old = -torch.rand(B, T, generator=g)
        ref, adv = old - 0.05, torch.randn(B, generator=g)
        fns = providers(hidden, weight, ids, mask, adv, old, ref)
        eager_s = None
        for name in ["eager"] + [p for p in wanted if p != "eager"]:
            if name not in fns or name not in wanted + ["eager"]:
                continue
            s = cpu_seconds(fns[name], reps)
            eager_s = s if name == "eager" else eager_s
            peak, _ = peak_extra_bytes(fns[name])
            print(f"{N:>5} {V:>7} {name:>9} {s:8.2f} {eager_s / s:7.2f}x {peak / 2**20:9.0f}",
                  flush=True)
        torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
