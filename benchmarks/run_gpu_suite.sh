#!/usr/bin/env bash
# The GPU suite in one command, on a GPU machine without network (torch and triton preinstalled):
# install the package, run the GPU tests, then every benchmark at a size that fits ~8 minutes
# on an H100. Result JSON/PNG land in benchmarks/results/ (commit them) and, with logs, in $OUT
# when that is set (the device tool's return folder).
#
#   bash benchmarks/run_gpu_suite.sh            # full suite
#   bash benchmarks/run_gpu_suite.sh --quick    # CPU dry run: toy sizes under the Triton interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
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
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "=== $name FAILED (exit $rc)" | tee -a "$LOG"; status=1; }
  return 0
}

# Step limits add up to under 9 minutes; the benchmarks come first (they also check their
# answers against the baselines), then the GPU tests.
if [ -z "$QUICK" ]; then
  step install 60 $PY -m pip install -q -e . --no-deps --no-build-isolation
  step gpu-info 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
fi
step moe_dispatch 220 $PY benchmarks/moe_dispatch.py $QUICK
step attention 130 $PY benchmarks/attention.py $QUICK --budget-s 95
step hf_patch 40 $PY benchmarks/hf_patch.py $QUICK
step quant_matmul 90 $PY benchmarks/quant_matmul.py $QUICK --budget-s 60
if [ -z "$QUICK" ]; then
  step gpu-tests 120 $PY -m pytest -q -m gpu -p no:cacheprovider tests
fi

if [ -n "${OUT:-}" ]; then  # newest result of each benchmark back through $OUT
  for bench in moe_dispatch attention hf_patch quant_matmul; do
    for f in $(ls -t "$RESULTS"/${bench}-*.json 2>/dev/null | head -1) $(ls -t "$RESULTS"/${bench}-*.png 2>/dev/null | head -1); do
      cp "$f" "$OUT/"
    done
  done
fi
echo "=== done, status $status" | tee -a "$LOG"
exit $status
