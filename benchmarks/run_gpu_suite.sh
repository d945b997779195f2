#!/usr/bin/env bash
# The GPU suite, on a GPU machine without network (torch and triton preinstalled): install the
# package, run every benchmark at a size sized for an H100, then the GPU tests. Result JSON/PNG
# land in benchmarks/results/ (commit them) and, with the log, in $OUT when that is set (the
# device tool's return folder).
#
#   bash benchmarks/run_gpu_suite.sh                        # every step
#   bash benchmarks/run_gpu_suite.sh e2e scaling gpu-tests  # only the named steps
#   bash benchmarks/run_gpu_suite.sh --quick                # CPU dry run: toy sizes, Triton interpreter
#
# Steps and their limits (s): moe_dispatch 220, attention 115, qk_prologue 45, quant_matmul 90
# (kernels: 470 with install and gpu-info), hf_patch 40, e2e 230, scaling 60, gpu-tests 120 (whole
# model and tests: 530). Together they exceed one 10-minute device call, so a lease runs the two
# halves as two calls on the same warm machine:
#   bash benchmarks/run_gpu_suite.sh moe_dispatch attention qk_prologue quant_matmul
#   bash benchmarks/run_gpu_suite.sh hf_patch e2e scaling gpu-tests
# Limits are upper bounds: the attention, qk_prologue, quant_matmul and e2e steps stop at their
# --budget-s. The benchmarks come first (they check their answers against the baselines).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
QUICK=""
[ "${1:-}" = "--quick" ] && { QUICK="--quick"; shift; }
ONLY=" $* "
for name in "$@"; do
  case $name in moe_dispatch|attention|qk_prologue|quant_matmul|hf_patch|e2e|scaling|gpu-tests) ;;
    *) echo "unknown step '$name' (steps: moe_dispatch attention qk_prologue quant_matmul hf_patch e2e scaling gpu-tests)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
RESULTS=${LLAMA4_FAST_RESULTS:-benchmarks/results}  # where the benchmark scripts write
LOG_DIR=${OUT:-$RESULTS}
mkdir -p "$LOG_DIR" "$RESULTS"
LOG="$LOG_DIR/gpu_suite.log"
: > "$LOG"
status=0

step() {  # step NAME TIMEOUT_S CMD...: run one step, keep going when it fails
  local name=$1 limit=$2
  shift 2
  [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]] && [ "$name" != install ] && [ "$name" != gpu-info ] && return 0
  [ -n "$QUICK" ] && limit=$((limit * 4))  # the dry run is CPU-bound, on CI's two cores
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "=== $name FAILED (exit $rc)" | tee -a "$LOG"; status=1; }
  return 0
}

if [ -z "$QUICK" ]; then
  step install 60 $PY -m pip install -q -e . --no-deps --no-build-isolation
  step gpu-info 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
fi
step moe_dispatch 220 $PY benchmarks/moe_dispatch.py $QUICK
step attention 115 $PY benchmarks/attention.py $QUICK --budget-s 80
step qk_prologue 45 $PY benchmarks/qk_prologue.py $QUICK --budget-s 25
step quant_matmul 90 $PY benchmarks/quant_matmul.py $QUICK --budget-s 60
step hf_patch 40 $PY benchmarks/hf_patch.py $QUICK
step e2e 230 $PY benchmarks/e2e.py $QUICK --budget-s 170 --repeats 1 --prompts 512 --batches 1 16 --weights bf16 fp8 int4
if [ -z "$QUICK" ]; then  # the CPU dry run of scaling (2 gloo ranks) is its own test
  step scaling 60 $PY benchmarks/scaling.py
  step gpu-tests 120 $PY -m pytest -q -m gpu -p no:cacheprovider tests
fi

if [ -n "${OUT:-}" ]; then  # newest result of each benchmark back through $OUT
  for bench in moe_dispatch attention qk_prologue quant_matmul hf_patch e2e scaling; do
    for f in $(ls -t "$RESULTS"/${bench}-*.json 2>/dev/null | head -1) $(ls -t "$RESULTS"/${bench}-*.png 2>/dev/null | head -1); do
      cp "$f" "$OUT/"
    done
  done
fi
echo "=== done, status $status" | tee -a "$LOG"
exit $status
