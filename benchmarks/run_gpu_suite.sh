#!/usr/bin/env bash
# The GPU suite, on a GPU machine without network (torch and triton preinstalled): install the
# package, run the benchmarks at sizes chosen for an H100, then the GPU tests. Result JSON/PNG
# land in benchmarks/results/ (commit them) and, with the log, in $OUT when that is set (the
# device tool's return folder), copied there as each step finishes.
#
#   bash benchmarks/run_gpu_suite.sh                 # every benchmark + GPU tests, under 8 minutes
#   bash benchmarks/run_gpu_suite.sh all             # every step at full size (about 25 minutes: three 10-minute calls' worth)
#   bash benchmarks/run_gpu_suite.sh e2e gpu-tests   # only the named steps, at full size
#   bash benchmarks/run_gpu_suite.sh --quick         # CPU dry run of every step: toy sizes, interpreter
#   bash benchmarks/run_gpu_suite.sh --plan [STEPS]  # print what would run (steps, limits, commands)
#
# The kernel benchmarks (quant_matmul, moe_*, attention, qk_prologue, train_step) exit 1 when our
# kernel gives a wrong answer or raises, after writing their JSON (still copied to $OUT): the step
# shows FAILED and the suite's status is 1. A baseline that disagrees is flagged in the JSON, exit status 0.
#
# On a machine that gets a copy of the tree without .git, name the commit being measured, so the
# result files carry it: LLAMA4_FAST_COMMIT=$(git rev-parse HEAD) (expanded where .git is).
#
# The default run is one device call: every benchmark at a reduced size, the ones whose numbers
# no committed result has yet first (e2e, quant_matmul, the FP8/INT4 MoE, attention, qk_prologue),
# then the GPU tests (most kernels have never run on a GPU), the training step (forward + backward
# of one MoE and one attention layer), MoeConfig's Hopper options against the table's configs
# (tune_moe.py --hopper), then the bf16 MoE, hf_patch and scaling, which session 1
# measured (the suite's deadline cuts from the end). Each step has a time limit (the table at the
# bottom; the benchmarks also stop at their --budget-s), and a suite deadline of 470 s shortens or
# skips whatever would run past it, so the call ends within
# 8 minutes whatever a step does. `all` and named steps run at full size with the longer limits and no deadline
# (about 25 minutes for everything).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
QUICK=""; PLAN=""
[ "${1:-}" = "--quick" ] && { QUICK="--quick"; shift; }
[ "${1:-}" = "--plan" ] && { PLAN=1; shift; }
STEPS="e2e quant_matmul moe_fp8 moe_int4 attention qk_prologue gpu-tests train_step moe_hopper moe_dispatch hf_patch scaling"
for name in "$@"; do
  [[ " all $STEPS " == *" $name "* ]] || { echo "unknown step '$name' (steps: all $STEPS)" >&2; exit 2; }
done
LEASE_RUN=""
case " $* " in
  *" all "*) ONLY=" $STEPS " ;;
  "  ") ONLY=" $STEPS "; [ -z "$QUICK" ] && LEASE_RUN=1 ;;
  *) ONLY=" $* " ;;
esac
DEADLINE=$([ -n "$LEASE_RUN" ] && echo $((SECONDS + 470)) || echo "")
PY=${PYTHON:-python3}
RESULTS=${LLAMA4_FAST_RESULTS:-benchmarks/results}  # where the benchmark scripts write
LOG_DIR=${OUT:-$RESULTS}
if [ -n "$PLAN" ]; then
  LOG=/dev/null
  echo "steps, limits and commands${DEADLINE:+ (suite deadline 470 s)}:"
else
  mkdir -p "$LOG_DIR" "$RESULTS"
  LOG="$LOG_DIR/gpu_suite.log"
  : > "$LOG"
fi
status=0

step() {  # step NAME LIMIT_S FULL_LIMIT_S CMD...: run one step if selected, keep going when it fails
  local name=$1 limit=$2
  [ -z "$LEASE_RUN" ] && limit=$3  # full size (named steps, `all`, --quick)
  shift 3
  [[ "$ONLY" != *" $name "* ]] && [ "$name" != install ] && [ "$name" != gpu-info ] && return 0
  [ -n "$QUICK" ] && limit=$((limit * 4))  # the dry run is CPU-bound, on CI's two cores
  if [ -n "$DEADLINE" ]; then
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt 15 ] && { echo "=== $name skipped: the suite's deadline" | tee -a "$LOG"; status=1; return 0; }
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  if [ -n "$PLAN" ]; then
    echo "$name ${limit}s: $*"
    return 0
  fi
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$LOG"
  local stamp
  stamp=$(mktemp)
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "=== $name FAILED (exit $rc)" | tee -a "$LOG"; status=1; }
  if [ -n "${OUT:-}" ]; then  # what the step wrote, back through $OUT now (a later step may be cut)
    find "$RESULTS" -maxdepth 1 -type f \( -name '*.json' -o -name '*.png' \) -newer "$stamp" -exec cp {} "$OUT/" \;
  fi
  rm -f "$stamp"
  return 0
}

if [ -z "$QUICK" ]; then
  step install 60 60 $PY -m pip install -q --no-index --disable-pip-version-check -e . --no-deps --no-build-isolation
  step gpu-info 20 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
fi
# Per-step arguments: toy sizes for --quick, reduced sizes for the default run, else full size.
if [ -n "$QUICK" ]; then
  MOE="--quick"; MOE_QUANT="--quick --no-shared --tokens 1"; ATTENTION="--quick --budget-s 80"
  E2E="--quick --depth short full --weights bf16 fp8 int4"; QM="--quick --budget-s 60"; QK="--quick --budget-s 25"
  HF_PATCH="--quick"; SCALING=""; TRAIN="--quick"; HOPPER="--hopper --quick --budget-s 15"
elif [ -n "$LEASE_RUN" ]; then
  MOE="--shapes scout maverick --tokens 1 64 4096 --no-shared"
  MOE_QUANT="--shapes scout maverick --tokens 1 8 64 4096 --no-shared"
  # the decode target's cases (128k, batch 1) and the prefill lengths where ops.attention may
  # hand over to SDPA; flex at 32k was measured in session 1
  ATTENTION="--prefill 8192 32768 --contexts 8192 131072 --batches 1 16 --no-flex --budget-s 45"
  E2E="--budget-s 110 --repeats 1 --prompts 512 --batches 1 16 --weights bf16 fp8 int4"
  QM="--budget-s 35"; QK="--budget-s 15"; HF_PATCH="--quick"; SCALING="--tokens 1 64"
  # one token count per MoE shape and the shortest attention layer, without flex's compile
  TRAIN="--shapes scout maverick --tokens 4096 --seqs 8192 --no-flex --budget-s 35"
  # MoeConfig's Hopper options at Scout prefill and TP8 decode, each against the table's config
  HOPPER="--hopper --cases scout:8192 maverick-tp8:1 --budget-s 45"
else
  MOE=""; MOE_QUANT="--no-shared"; ATTENTION="--budget-s 80"
  # + Scout at 48 layers with INT4 then FP8 experts (--depth full: about 2 minutes each, a guess)
  E2E="--depth short full --budget-s 400 --repeats 1 --prompts 512 --batches 1 16 --weights bf16 int4 fp8"
  QM="--budget-s 60"; QK="--budget-s 25"; HF_PATCH=""; SCALING=""; TRAIN="--budget-s 240"
  HOPPER="--hopper --cases scout:8192 scout:1 maverick:1 scout-tp8:1 maverick-tp8:1 maverick:64 --budget-s 240"
fi
#    name        limit (s): default run, full size
step e2e          150 480 $PY benchmarks/e2e.py $E2E
step quant_matmul  50  90 $PY benchmarks/quant_matmul.py $QM
step moe_fp8       40 220 $PY benchmarks/moe_dispatch.py --weights fp8 $MOE_QUANT
step moe_int4      40 220 $PY benchmarks/moe_dispatch.py --weights int4 $MOE_QUANT
step attention     65 115 $PY benchmarks/attention.py $ATTENTION
step qk_prologue   30  45 $PY benchmarks/qk_prologue.py $QK
[ -z "$QUICK" ] && step gpu-tests 90 120 $PY -m pytest -q -m gpu -p no:cacheprovider tests
step train_step    60 300 $PY benchmarks/train_step.py $TRAIN
step moe_hopper    55 270 $PY benchmarks/tune_moe.py $HOPPER
step moe_dispatch  40 220 $PY benchmarks/moe_dispatch.py $MOE
step hf_patch      25  40 $PY benchmarks/hf_patch.py $HF_PATCH
[ -z "$QUICK" ] && step scaling 30 60 $PY benchmarks/scaling.py $SCALING  # its CPU dry run is its own test

[ -z "$PLAN" ] && echo "=== done, status $status" | tee -a "$LOG"
exit $status
