#!/usr/bin/env bash
# GPU verification in one command (one H200 or H100): builds the extension in place, then runs, in order of value
# and each under its own time cap, the GPU tests and benchmarks, writing every log and JSON into OUT_DIR and a
# summary table last. Items that no longer fit the budget are skipped with the reason recorded.
#
#   tools/gpu_check.sh OUT_DIR [--dry-run] [--only ITEM[,ITEM...]] [--budget SECONDS]
#
# --dry-run (any machine): checks that every path, module, test selection and benchmark the items call exists and
#   parses, without running them (tests/test_gpu_check.py runs it on the CPU box).
# --only: run just these items (e.g. the second call of a lease: --only augment,stage2,ddp,loaders).
# --budget: seconds for the whole script (default 450: well inside one 8-minute command).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:?usage: tools/gpu_check.sh OUT_DIR [--dry-run] [--only ITEMS] [--budget SECONDS]}"
shift
DRY=0
ONLY=""
BUDGET=450
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
SUMMARY="$OUT/summary.md"
printf '| item | status | seconds | cap s | log |\n|---|---|---:|---:|---|\n' >"$SUMMARY"

# item NAME CAP_S CHECK -- COMMAND...: runs COMMAND under `timeout CAP_S` (or CHECK in --dry-run), logging to
# OUT/NAME.log; skipped when --only excludes it or when fewer than CAP_S seconds of the budget remain.
item() {
  local name="$1" cap="$2" check="$3"
  shift 4
  if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then
    return 0
  fi
  local log="$OUT/$name.log" t0 status
  local left=$((BUDGET - ($(date +%s) - START)))
  if [[ $DRY -eq 0 && $left -lt $cap ]]; then
    printf '| %s | skipped: %ss of the %ss budget left, the item needs %ss | 0 | %s | — |\n' \
      "$name" "$left" "$BUDGET" "$cap" "$cap" >>"$SUMMARY"
    return 0
  fi
  t0=$(date +%s)
  if [[ $DRY -eq 1 ]]; then
    bash -c "$check" >"$log" 2>&1 && status="dry-run ok" || status="DRY-RUN FAILED"
  else
    timeout --kill-after=10 "$cap" "$@" >"$log" 2>&1
    local rc=$?
    case $rc in
      0) status="ok" ;;
      124|137) status="TIMED OUT" ;;
      *) status="FAILED (exit $rc)" ;;
    esac
  fi
  printf '| %s | %s | %s | %s | %s |\n' "$name" "$status" "$(($(date +%s) - t0))" "$cap" "$(basename "$log")" \
    >>"$SUMMARY"
}

# The pytest selection of the GPU tests (CUDA-only tests carry the `gpu` marker and skip elsewhere).
STEP_TESTS="tests/test_step.py tests/test_meta.py tests/test_losses.py tests/test_metrics.py"
OTHER_TESTS="tests/test_augment.py tests/test_data_loaders.py tests/test_data_metaset.py tests/test_official_baseline.py"
bench() { "$PY" -m benchmarks --gpu --warmup 1 --repeats 3 --rounds 1 "$@"; }

# 0. What machine this is (the form factor sets the bf16 ceiling, PERFORMANCE.md §1).
item env 30 "command -v nvidia-smi >/dev/null || echo 'no nvidia-smi here (fine for a dry run)'; $PY -c 'import torch'" -- \
  bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv; \
    $PY -c 'import torch, numpy; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), numpy.__version__)'"

# 1. Build the extension in place (no network there: CMake + ninja + pybind11 from the image, no pip).
BUILD_CMD="cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) \
  -DPython_EXECUTABLE=\$(command -v $PY) >/dev/null && cmake --build build/gpu && cp build/gpu/_C*.so dnet_fast/ && \
  $PY -c 'from dnet_fast import sampling; print(sampling._C.__file__)'"
item build 90 "test -f CMakeLists.txt && command -v cmake && $PY -m pybind11 --cmakedir" -- bash -c "$BUILD_CMD"

# 2. Graph == eager for every mode, ResNet-32/50, fp32/bf16, across an lr change; every loss capturable; no host
#    sync in the eager step; reset after a checkpoint reload (tests/test_step.py), and the meta/loss/counter GPU tests.
item tests_step 170 "$PY -m pytest --collect-only -q -m 'gpu and not slow' $STEP_TESTS" -- \
  "$PY" -m pytest -q -rA -m "gpu and not slow" --timeout 120 $STEP_TESTS

# 3. The step benchmark's CUDA points: R32 @32 fp32/bf16 (graph vs eager vs official-style, exact/driver vs CE) and
#    R50 @224 bf16 b128 (graph vs eager, peak memory, fraction of the bf16 ceiling, counted FLOP).
item bench_step 170 "$PY -m benchmarks --list | grep -q '^step '" -- \
  bench --only step --set flops=true --budget-s 150 --out "$OUT/bench_step"

# 4. End to end at R50 @224 bf16 with the resident loader: img/s per mode, data-wait share, GPU utilisation.
item bench_e2e 120 "$PY -m benchmarks --list | grep -q '^e2e '" -- \
  bench --only e2e --set points=r50_224 --budget-s 100 --out "$OUT/bench_e2e"

# 5. The other GPU tests: batched augmentation on CUDA == CPU and sync-free, loaders and meta set on the device,
#    the official loops' synchronizing calls per iteration.
item tests_other 90 "$PY -m pytest --collect-only -q -m gpu $OTHER_TESTS" -- \
  "$PY" -m pytest -q -rA -m gpu --timeout 60 $OTHER_TESTS

# 6. The resident loader's own img/s (ffcv and dali are not installed there: those variants record a skip).
item loaders 60 "$PY -m benchmarks --list | grep -q '^loaders '" -- \
  bench --only loaders --budget-s 50 --out "$OUT/bench_loaders"

# 7. Batched AutoAugment / RandAugment recipes on the GPU vs the per-image PIL path.
item augment 60 "$PY -m benchmarks --list | grep -q '^augment '" -- \
  bench --only augment --budget-s 50 --out "$OUT/bench_augment"

# 8. A stage-2 epoch vs the official-style stage-2 loop.
item stage2 60 "$PY -m benchmarks --list | grep -q '^stage2 '" -- \
  bench --only stage2 --budget-s 50 --out "$OUT/bench_stage2"

# 9. DDP over NCCL at world size 1: DDP == one process for every mode, SyncBN, counts reduced on the device, and
#    whether the captured step under DDP equals the eager DDP step (if it does in every case, set
#    dnet_fast.distributed.GRAPH_UNDER_DDP = True; until then DDP runs the eager step with a logged reason);
#    then the per-rank overhead of DDP (one GPU cannot show scaling).
item ddp 90 "$PY -m pytest --collect-only -q -m gpu tests/test_distributed_gpu.py && $PY -m benchmarks --list | grep -q '^distributed '" -- \
  bash -c "$PY -m pytest -q -rA -m gpu --timeout 60 tests/test_distributed_gpu.py; rc=\$?; \
    $PY -m benchmarks --gpu --warmup 1 --repeats 3 --rounds 1 --only distributed --budget-s 40 --out '$OUT/bench_distributed' && exit \$rc"

printf '\nwall time %ss of a %ss budget\n' "$(($(date +%s) - START))" "$BUDGET" >>"$SUMMARY"
cat "$SUMMARY"
grep -q "FAILED\|TIMED OUT" "$SUMMARY" && exit 1
exit 0
