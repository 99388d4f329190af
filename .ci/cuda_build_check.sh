#!/usr/bin/env bash
# Build the whole CUDA extension (kernels + torch bindings) on a machine without a GPU, against
# the CUDA build of torch, and load it. Catches binding and link errors that `nvcc -c` alone
# cannot. Needs nvcc and a CUDA torch wheel (torch==2.14.1 here); skips with a message if that
# wheel cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.ci-venv-cuda
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  if ! "$venv/bin/pip" install -q torch==2.14.1 ninja setuptools wheel pybind11 "numpy<2.4" 2>/dev/null; then
    echo "== CUDA build check skipped: the CUDA build of torch (torch==2.14.1) could not be installed"
    exit 0
  fi
fi
nvhdr=$("$venv/bin/python" -c "import nvidia, os; print(os.path.join(os.path.dirname(nvidia.__path__[0]), 'nvidia', 'cu13', 'include'))")
# the toolkit folder that holds bin/nvcc, lib64/libcudart.so and the headers
if [ -n "${CUDA_HOME:-}" ]; then cuda_home=$CUDA_HOME
elif [ -x /usr/local/cuda/bin/nvcc ]; then cuda_home=/usr/local/cuda
else cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
build=$(mktemp -d)
git ls-files -z | xargs -0 -I{} cp --parents {} "$build"
echo "== CUDA extension build (torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'), CUDA_HOME=$cuda_home)"
(cd "$build" && CUDA_HOME="$cuda_home" CPATH="$nvhdr" R1K_FORCE_CUDA_BUILD=1 R1K_CUDA_ARCHS="80;90" MAX_JOBS=2 \
  "$OLDPWD/$venv/bin/python" setup.py build_ext --inplace > build.log 2>&1) || { tail -50 "$build/build.log"; exit 1; }
(cd "$build" && CPATH="$nvhdr" "$OLDPWD/$venv/bin/python" - <<'PY'
import torch
from r1kernels import _custom_ops
assert _custom_ops.EXT_ERROR is None, _custom_ops.EXT_ERROR
ops = sorted({n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
              if n.startswith("r1kernels::")})
assert ops, "no r1kernels ops registered"
missing = [op for op in ops if not _custom_ops.has_kernel(op, "CUDA")]
print("CUDA kernels registered for:", ", ".join(op for op in ops if _custom_ops.has_kernel(op, "CUDA")))
print("ops without a CUDA kernel:", ", ".join(missing) or "none")
PY
)
rm -rf "$build"
echo "== CUDA extension builds, links and loads"
