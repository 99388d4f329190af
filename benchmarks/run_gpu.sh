#!/usr/bin/env bash
# One GPU session: build the extension, check every op on the GPU, time every target.
#
#   bash benchmarks/run_gpu.sh quick       the 15-minute slot (docs/gpu.md): build; the GPU tests
#                                          of the kernels changed since the last GPU run
#                                          (benchmarks/LAST_GPU_RUN); the opt-in variants not yet
#                                          measured (the persistent cluster kernel) beside the
#                                          default; every target with its baselines; one table
#                                          (benchmarks/targets.py). Timeouts sum to 8 minutes after the build.
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
if [ "$STEPS" = quick ]; then
  STEPS="build changed-tests variants targets"
fi
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
if has changed-tests; then
  # the test files of every op whose kernels (csrc/<op>/, r1kernels/ops/<op>.py) changed since
  # the commit of the last GPU run, plus GRPOLoss's when nn.py changed
  since=$(cat benchmarks/LAST_GPU_RUN)
  files=""
  for f in $(git diff --name-only "$since" HEAD -- csrc r1kernels/ops r1kernels/nn.py); do
    case "$f" in
      csrc/common/*|csrc/torch_bindings.cpp) op="" ; files="$files $(ls tests/test_*.py | grep -v trainer)" ;;
      csrc/*) op=$(echo "$f" | cut -d/ -f2) ;;
      r1kernels/ops/*) op=$(basename "$f" .py) ;;
      r1kernels/nn.py) op=grpo_loss ;;
      *) op="" ;;
    esac
    case "$op" in
      moe) files="$files $(ls tests/test_moe_*.py)" ;;
      token_logprobs) files="$files tests/test_token_logprobs.py tests/test_fused_logits_cluster.py" ;;
      grpo_loss|linear_token_logprobs) files="$files $(ls tests/test_"$op"*.py) tests/test_grpo_loss_module.py" ;;
      "") ;;
      *) files="$files $(ls tests/test_"$op"*.py 2>/dev/null)" ;;
    esac
  done
  files=$(echo $files | tr ' ' '\n' | sort -u | tr '\n' ' ')
  echo "changed since $since: ${files:-no kernel}"
  if [ -n "$files" ]; then
    timeout "${TEST_TIMEOUT:-120}" $PY -m pytest $files -q -p no:cacheprovider -m "not nvcc" \
      -n "${TEST_WORKERS:-8}" >"$OUT/tests.log" 2>&1
    echo "tests: exit $?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -20
  fi
fi
if has variants; then
  # opt-in variants not yet measured on a GPU, first, beside the default on the same rows:
  # the persistent cluster kernel (R1K_FUSED_CLUSTER=8,256,1) on logits and in the hidden sweep
  TUNE_N=2 timeout "${TUNE_TIMEOUT:-60}" \
    $PY benchmarks/tune_fused_logits.py 2>&1 | tee "$OUT/variants.log" | tail -8
  PROFILE_CLUSTER="8,256;8,256,1" PROFILE_ROWS=1024 timeout "${PROFILE_TIMEOUT:-60}" \
    $PY benchmarks/profile_hidden.py 2>&1 | tee -a "$OUT/variants.log" | tail -5
fi
if has targets; then
  # every target's row and its baselines; the slowest baseline (Liger's fused linear GRPO, ~1.2 s
  # a call) and the non-default providers are skipped
  R1K_BENCH_SKIP=${R1K_BENCH_SKIP:-liger-grpo-hidden,r1k-two,r1k-no-cluster,r1k-torch,r1k-cuda-no-graph} \
    timeout "${BENCH_TIMEOUT:-240}" $PY -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    -k "${BENCH_K:-not fwd-}" >"$OUT/bench.log" 2>&1
  echo "benchmarks: exit $?"
  cp .benchmarks/r1k-cuda-*.json "$OUT/" 2>/dev/null
  $PY benchmarks/targets.py | tee "$OUT/targets.txt"
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
