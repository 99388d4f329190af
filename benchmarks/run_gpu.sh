#!/usr/bin/env bash
# One GPU session: build the extension, check every op on the GPU, time every target.
#
#   bash benchmarks/run_gpu.sh [steps]     steps: any of build tests bench step tune profile
#                                          (default: build tests bench step)
#   tune: benchmarks/tune_fused_logits.py, the launch configurations of the fused logits kernels
#   profile: benchmarks/profile_hidden.py, kernel times of the hidden-state single sweep
#
# Logs go to $OUT (default .gpu-out/). Optional wheels for the baselines (trl, liger-kernel,
# cut-cross-entropy and what they need) are installed from .whl/ when that folder exists.
set -uo pipefail
OUT=${OUT:-$PWD/.gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${*:-build tests bench step}
PY=${PYTHON:-python3}
has() { [[ " $STEPS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv | tee "$OUT/env.txt"
git rev-parse --short HEAD | tee -a "$OUT/env.txt"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if has build; then
  t0=$SECONDS
  MAX_JOBS=${MAX_JOBS:-16} R1K_CUDA_ARCHS=${R1K_CUDA_ARCHS:-9.0} \
    $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $((SECONDS - t0)) s"
fi
$PY -m r1kernels 2>&1 | tee -a "$OUT/env.txt"
if has bench; then
  timeout "${BENCH_TIMEOUT:-420}" $PY -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    ${BENCH_K:+-k "$BENCH_K"} 2>&1 | tee "$OUT/bench.log" | grep -E "^(r1kernels|measured|op |[a-z_]+ ).*|passed|failed|error" | tail -120
  cp .benchmarks/r1k-cuda-*.json "$OUT/" 2>/dev/null
fi
if has tests; then
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest tests -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" \
    ${TEST_K:+-k "$TEST_K"} >"$OUT/tests.log" 2>&1
  echo "tests: exit $?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -40
fi
if has tune; then
  timeout "${TUNE_TIMEOUT:-300}" $PY benchmarks/tune_fused_logits.py 2>&1 | tee "$OUT/tune.log" | tail -30
fi
if has profile; then
  timeout "${PROFILE_TIMEOUT:-240}" $PY benchmarks/profile_hidden.py 2>&1 | tee "$OUT/profile.log" | tail -40
fi
if has step; then
  timeout "${STEP_TIMEOUT:-180}" $PY -m r1train.bench_step --out "$OUT/bench_step.json" 2>&1 | tail -5
fi
