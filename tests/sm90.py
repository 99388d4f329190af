"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter accepts code that the compiler rejects, so every Triton kernel is also compiled
here to PTX and cubin, and its resource usage is read with the cuobjdump that ships in Triton's
package. Used by tests/test_compile_sm90.py; each op adds its kernels to SPECS there.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass
class Compiled:
    name: str
    ptx: str
    regs: int
    stack: int
    local: int
    shared: int  # static shared memory in the cubin plus Triton's dynamic shared memory

    def __str__(self):
        return (f"{self.name}: {self.regs} registers, {self.stack} B stack, {self.local} B local, "
                f"{self.shared} B shared")


def cuobjdump_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> Compiled:
    """triton.compile for sm_90 (no GPU needed); returns PTX and register/stack/shared usage.

    `fn` is "package.module:kernel_name". The compile runs in a fresh process: the test session
    sets TRITON_INTERPRET=1, under which kernels are interpreter objects that cannot be compiled.
    """
    import json
    import sys

    module, name = fn.split(":")
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); import importlib, sm90; "
        f"k = getattr(importlib.import_module({module!r}), {name!r}); "
        f"c = sm90._compile_here(k, {signature!r}, {constexprs!r}, {num_warps}, {num_stages}); "
        "print(json.dumps(c.__dict__))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    if res.returncode != 0:
        raise RuntimeError(f"compiling {fn} for sm_90 failed:\n{res.stderr[-4000:]}")
    return Compiled(**json.loads(res.stdout.strip().splitlines()[-1]))


def _compile_here(fn, signature, constexprs, num_warps, num_stages) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # As at a real launch, pointers are 16-byte aligned (torch allocations are): that is what
    # lets loads and stores become 16-byte vectors, and it changes the register count.
    sig = dict(signature)
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
             for k, ty in signature.items() if ty.startswith("*")}
    for k in constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(path)
    line = next(l for l in out.splitlines() if "REG:" in l)
    field = lambda k: int(re.search(rf"{k}:(\d+)", line).group(1))  # noqa: E731
    return Compiled(name=fn.__name__, ptx=kernel.asm["ptx"], regs=field("REG"), stack=field("STACK"),
                    local=field("LOCAL"), shared=field("SHARED") + int(kernel.metadata.shared))


_WORKER = r"""
import ast, importlib, json, sys, traceback
sys.path.insert(0, "tests")
import sm90
specs = ast.literal_eval(open(sys.argv[1]).read())
for sid, fn, signature, constexprs, num_warps in specs:
    module, name = fn.split(":")
    try:
        k = getattr(importlib.import_module(module), name)
        c = sm90._compile_here(k, signature, constexprs, num_warps, 3)
        print(json.dumps({"id": sid, "ok": c.__dict__}), flush=True)
    except Exception:
        print(json.dumps({"id": sid, "error": traceback.format_exc()[-3000:]}), flush=True)
"""


def compile_many(specs, workers: int = 2) -> dict:
    """Compile [(id, "module:kernel", signature, constexprs, num_warps), ...] for sm_90 in
    `workers` fresh processes (one torch/triton import each, not one per kernel).
    Returns {id: Compiled or an error string}."""
    import ast
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    slices = [specs[i::workers] for i in range(workers)]
    procs = []
    for part in slices:
        if not part:
            continue
        f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        f.write(repr(list(part)))
        f.close()
        ast.literal_eval(open(f.name).read())  # the specs must be plain literals
        p = subprocess.Popen([sys.executable, "-c", _WORKER, f.name], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=root)
        procs.append((p, f.name))
    results = {}
    for p, path in procs:
        out, err = p.communicate()
        os.unlink(path)
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                results[r["id"]] = Compiled(**r["ok"]) if "ok" in r else r["error"]
        if p.returncode != 0:
            results.setdefault("__worker__", err[-3000:])
    return results
