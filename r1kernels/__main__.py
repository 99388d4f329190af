"""`python -m r1kernels`: an environment report.

Versions, devices, whether the C++/CUDA extension and Triton are available, and which backend
each op will use on CPU and on CUDA tensors (honouring R1K_BACKEND).
"""
from __future__ import annotations

import importlib
import platform
import sys


def _version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - a report, not a check
        return f"not available ({type(exc).__name__})"


def report() -> str:
    import torch

    import r1kernels
    from r1kernels import _custom_ops, dispatch

    lines = [f"r1kernels {r1kernels.__version__}",
             f"python {platform.python_version()} on {platform.platform()}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    for name in ("triton", "numpy", "transformers", "trl", "liger_kernel", "flash_attn"):
        lines.append(f"{name} {_version(name)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                         f"{p.multi_processor_count} SMs")
    else:
        lines.append("CUDA devices: none")
    lines.append("C++ extension: " + ("loaded" if _custom_ops.EXT_ERROR is None
                                      else f"not loaded - {_custom_ops.EXT_ERROR}"))
    if _custom_ops.EXT_ERROR is None:
        from r1kernels import _C

        lines.append(f"C++ CPU kernels: {_C.cpu_simd_level()} SIMD loops, "
                     f"{torch.get_num_threads()} threads (torch.set_num_threads)")
    lines.append(f"TRITON_INTERPRET: {'on' if dispatch.TRITON_INTERPRET else 'off'}; "
                 f"R1K_BACKEND: {dispatch._FORCED or 'auto'}")
    try:
        from r1kernels.ops import token_logprobs as tlp

        def kind(cfg):
            return "two launches" if cfg[0] == 0 else "persistent"
        cfg, cfg_grpo = tlp._fused_config(), tlp._fused_config(grpo=True)
        lines.append(f"fused logits kernel: {kind(cfg)} {cfg}, GRPO variant {kind(cfg_grpo)} "
                     f"{cfg_grpo} (R1K_FUSED_LOGITS); statistics launch: "
                     f"{tlp._block_v(1 << 20, stats=True)[::-1]} (warps, block; R1K_STATS_LAUNCH)")
        from r1kernels.ops import linear_token_logprobs as ltl

        setting = tlp._cluster_setting()
        kind = lambda s: "%d CTAs x %d threads%s" % (  # noqa: E731
            s[0], s[1], ("", ", persistent (L2 prefetch)")[s[2]])
        lines.append(f"cluster kernel: {kind(setting) if setting else 'off'} "
                     f"(R1K_FUSED_CLUSTER; runs on sm_90+ with the CUDA build); hidden-state "
                     f"sweep G groups: {ltl._group_rows(1, 1 << 62) or 'off'} "
                     f"(R1K_SWEEP_GROUP_ROWS)")
    except Exception as exc:  # noqa: BLE001 - a report, not a check
        lines.append(f"fused logits kernel: {exc}")
    lines.append("")
    lines.append(f"{'op':26} {'on CPU tensors':16} {'on CUDA tensors':16} available (cpu | cuda)")
    for op in sorted(dispatch.registered_ops()):
        row = []
        for dev in ("cpu", "cuda"):
            try:
                row.append(dispatch.select(op, dev))
            except RuntimeError as exc:
                row.append(f"error: {exc}")
        cpu_av = ",".join(dispatch.available_backends(op, "cpu"))
        cuda_av = ",".join(dispatch.available_backends(op, "cuda"))
        lines.append(f"{op:26} {row[0]:16} {row[1]:16} {cpu_av} | {cuda_av}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
