#!/usr/bin/env bash
# The GPU suite, on a GPU machine without network (torch and triton preinstalled): install the
# package, run the benchmarks at sizes chosen for an H100, then the GPU tests. Result JSON/PNG
# land in benchmarks/results/ (commit them) and, with the log, in $OUT when that is set (the
# device tool's return folder).
#
#   bash benchmarks/run_gpu_suite.sh                 # the lease plan: one call, under 8 minutes
#   bash benchmarks/run_gpu_suite.sh all             # every step (two 10-minute calls' worth)
#   bash benchmarks/run_gpu_suite.sh e2e gpu-tests   # only the named steps
#   bash benchmarks/run_gpu_suite.sh --quick         # CPU dry run of every step: toy sizes, interpreter
#
# The lease plan runs, in this order, what the committed results do not cover yet, most wanted
# first, so a run cut short still leaves the important files (limits in s): install 60, gpu-info
# 20, e2e 170, quant_matmul 50, moe_fp8 45, moe_int4 45, attention 55, qk_prologue 30,
# gpu-tests 100 (sum 575; the limits are upper bounds and the benchmarks stop at their
# --budget-s, so a run takes about 7.5 minutes). `all` adds the full bf16 MoE sweep
# (moe_dispatch 220), hf_patch 40 and scaling 60, and the attention step at full size.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
QUICK=""
[ "${1:-}" = "--quick" ] && { QUICK="--quick"; shift; }
STEPS="e2e quant_matmul moe_fp8 moe_int4 attention qk_prologue gpu-tests moe_dispatch hf_patch scaling"
LEASE="e2e quant_matmul moe_fp8 moe_int4 attention qk_prologue gpu-tests"
for name in "$@"; do
  [[ " all $STEPS " == *" $name "* ]] || { echo "unknown step '$name' (steps: all $STEPS)" >&2; exit 2; }
done
LEASE_RUN=""
case " $* " in
  *" all "*) ONLY=" $STEPS " ;;
  "  ") if [ -n "$QUICK" ]; then ONLY=" $STEPS "; else ONLY=" $LEASE "; LEASE_RUN=1; fi ;;
  *) ONLY=" $* " ;;
esac
PY=${PYTHON:-python3}
RESULTS=${LLAMA4_FAST_RESULTS:-benchmarks/results}  # where the benchmark scripts write
LOG_DIR=${OUT:-$RESULTS}
mkdir -p "$LOG_DIR" "$RESULTS"
LOG="$LOG_DIR/gpu_suite.log"
: > "$LOG"
status=0

step() {  # step NAME TIMEOUT_S CMD...: run one step if it is selected, keep going when it fails
  local name=$1 limit=$2
  shift 2
  [[ "$ONLY" != *" $name "* ]] && [ "$name" != install ] && [ "$name" != gpu-info ] && return 0
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
if [ -n "$QUICK" ]; then  # toy sizes of the same steps
  MOE_QUANT="--quick --no-shared --tokens 1"
  ATTENTION="--quick --budget-s 80"
else
  MOE_QUANT="--shapes scout maverick --tokens 1 8 64 4096 --no-shared"
  ATTENTION="--budget-s 80"
  # The lease plan's attention: the decode target's cases (128k, batch 1) and the prefill
  # lengths where ops.attention may hand over to SDPA; flex at 32k was measured in session 1.
  [ -n "$LEASE_RUN" ] && ATTENTION="--prefill 8192 32768 --contexts 8192 131072 --batches 1 16 --no-flex --budget-s 35"
fi
step e2e 170 $PY benchmarks/e2e.py $QUICK --budget-s 130 --repeats 1 --prompts 512 --batches 1 16 --weights bf16 fp8 int4
step quant_matmul 50 $PY benchmarks/quant_matmul.py $QUICK --budget-s 35
step moe_fp8 45 $PY benchmarks/moe_dispatch.py --weights fp8 $MOE_QUANT
step moe_int4 45 $PY benchmarks/moe_dispatch.py --weights int4 $MOE_QUANT
step attention 55 $PY benchmarks/attention.py $ATTENTION
step qk_prologue 30 $PY benchmarks/qk_prologue.py $QUICK --budget-s 15
if [ -z "$QUICK" ]; then
  step gpu-tests 100 $PY -m pytest -q -m gpu -p no:cacheprovider tests
fi
step moe_dispatch 220 $PY benchmarks/moe_dispatch.py $QUICK
step hf_patch 40 $PY benchmarks/hf_patch.py $QUICK
if [ -z "$QUICK" ]; then  # the CPU dry run of scaling (2 gloo ranks) is its own test
  step scaling 60 $PY benchmarks/scaling.py
fi

if [ -n "${OUT:-}" ]; then  # newest result of each benchmark back through $OUT
  for bench in moe_dispatch moe_dispatch_fp8 moe_dispatch_int4 attention qk_prologue quant_matmul hf_patch e2e scaling; do
    for f in $(ls -t "$RESULTS"/${bench}-*.json 2>/dev/null | head -1) $(ls -t "$RESULTS"/${bench}-*.png 2>/dev/null | head -1); do
      cp "$f" "$OUT/"
    done
  done
fi
echo "=== done, status $status" | tee -a "$LOG"
exit $status
