"""Mutation check: does the CPU test suite catch deliberate bugs in the kernels and the model code?

Each entry of MUTANTS is one deliberate bug: a file, an exact snippet of it, its replacement,
the tests to run against it and why the bug matters. For every mutant this script copies the
repository (without .venv, .git and caches) to a temporary directory, applies the one
replacement there, and runs pytest on the copy with the copy's code imported (the working tree
is never touched). A mutant is caught when pytest fails; it survives when every test passes.
It prints a markdown table: mutant, tests run, caught (with the first failing test) and time.

    python tests/mutants.py                  # every mutant, as many at once as there are cores
    python tests/mutants.py --list           # the mutants and why they matter, nothing run
    python tests/mutants.py --only attention-gqa-head moe-direct-skip-rule --jobs 1
    python tests/mutants.py --baseline       # first run each test file on the unmutated copy

Not part of CI (pytest does not collect this file: no test_ prefix, no test functions); it
checks the tests themselves, so run it after changing tests or kernels. Every mutant must be
caught; a snippet that no longer matches the source (the code moved on) is reported as
"stale" and must be updated. Measured on 2 cores: 3.5 minutes alone (41 mutants), 7.5 with other test runs
sharing the machine; tests stop at the first failure (-x), so a caught mutant costs a fraction
of its files' time (--baseline adds one full run of the files, about 5 minutes).

How the copy's code gets imported: the package is installed editable, whose finder maps
`llama4_fast` to this checkout's llama4_fast/ and `llama4_fast.kernels` to its kernels/. The
copy is put first on PYTHONPATH (and is pytest's working directory), so the standard path
finder sees the copy's llama4_fast/ before the editable finder is asked; a symlink
llama4_fast/kernels -> ../kernels inside the copy makes `llama4_fast.kernels` resolve there
too. A preflight import in the copy checks both before any mutant runs.

Known gap, not in the list because no CPU test can catch it: removing the int64 casts of the
MoE row offsets (`pairs = pairs.to(tl.int64)` in kernels/moe.py) only overflows past 2**31
elements (a 1M-token x 5120 prefill), which the interpreter cannot allocate in CI time; the
GPU tests' long-prefill cases are where it shows.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str       # relative to the repository root
    old: str        # exact snippet, must occur once
    new: str
    tests: tuple    # pytest arguments: test files or node ids
    why: str


ROUTING = ("tests/test_routing_kernel.py",)
MOE = ("tests/test_moe_kernel.py",)
QUANT = ("tests/test_quant_matmul.py", "tests/test_quant_moe.py")
ATTENTION = ("tests/test_attention_kernel.py",)
PROLOGUE = ("tests/test_qk_prologue.py",)
MOE_BACKWARD = ("tests/test_moe_backward.py",)
EXPERTS = ("tests/test_moe_kernel.py", "tests/test_moe_backward.py")
ATTENTION_BACKWARD = ("tests/test_attention_backward.py",)
HOPPER = ("tests/test_moe_kernel.py::test_tma_matches_float64", "tests/test_moe_kernel.py::test_epilogue_in_column_pieces",
          "tests/test_moe_kernel.py::test_expert_variants_with_tma", "tests/test_quant_moe.py::test_tma_with_quantized_experts",
          "tests/test_quant_matmul.py::test_tma_matches_float64")

MUTANTS = [
    # -- the five of issue 17 ------------------------------------------------------------------
    Mutant("attention-chunk-start", "kernels/attention.py",
           "pos = tl.maximum(kv_start + own_key, 0)", "pos = tl.maximum(kv_start + own_key - 1, 0)", ATTENTION,
           "chunk start computed from pos - 1: the first query of each chunk sees the previous chunk"),
    Mutant("moe-router-weight-gate-up", "kernels/moe.py",
           "    if SCALE_C:  # the router weight", "    if SCALE_C and not GATED:  # the router weight", MOE,
           "router weight dropped from the gate_up epilogue: Llama 4 scales the expert input"),
    Mutant("dequant-int4-group-index", "kernels/dequant.py",
           "group = k0 // GROUP_K", "group = k0 // BLOCK_K", QUANT,
           "INT4 scale group indexed by K step: right only when BLOCK_K == group (CPU's 32), "
           "NaN/garbage at group 128 on the GPU"),
    Mutant("moe-fp8-block-act-scale", "kernels/moe.py",
           "a_rows * stride_asm + (k0 // FP8_BLOCK_SIZE) * stride_ask",
           "a_rows * stride_asm + (k_lo // FP8_BLOCK_SIZE) * stride_ask",
           ("tests/test_quant_moe.py", "tests/test_quant_model.py"),
           "fp8_block MoE reuses the first K group's activation scale: wrong once K > 128"),
    Mutant("routing-nan", "kernels/routing.py",
           "hit = avail & tl.where(nan_left[:, None], is_nan, x == best[:, None])",
           "hit = avail & (x == best[:, None])", ROUTING,
           "NaN logits no longer rank first: kernel and torch backend pick different experts"),
    # -- routing ---------------------------------------------------------------------------------
    Mutant("routing-tie-high-index", "kernels/routing.py",
           "idx = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)",
           "idx = tl.max(tl.where(hit, cols[None, :], -1), axis=1)", ROUTING,
           "ties go to the higher expert index: bf16 router logits tie often, backends disagree"),
    Mutant("routing-softmax-no-max", "kernels/routing.py",
           "tl.exp(x - row_max[:, None])", "tl.exp(x)", ROUTING,
           "softmax without subtracting the row max: exp overflows for logits above ~88"),
    Mutant("routing-renormalize-dropped", "kernels/routing.py",
           "top_w = top_w / tl.sum(top_w, axis=1)[:, None]", "top_w = top_w", ROUTING,
           "renormalize=True ignored: the k weights no longer sum to 1"),
    # -- MoE ---------------------------------------------------------------------------------------
    Mutant("moe-combine-one-slot", "kernels/gemm.py",
           "for j in tl.static_range(ROWS):", "for j in tl.static_range(1):", MOE,
           "top_k > 1 combine sums only the first slot of each token"),
    Mutant("moe-direct-skip-rule", "kernels/moe.py",
           "(ids == expert) & (offs_r < pid_m)", "(ids == expert) & (offs_r != pid_m)", MOE,
           "direct (decode) path skips an expert when any other pair chose it, not only an earlier "
           "one: experts chosen twice are never computed"),
    Mutant("moe-split-k-combine", "kernels/gemm.py",
           "ptrs += split_stride", "ptrs += 0", MOE + ("tests/test_quant_matmul.py",),
           "split-K combine adds the first split num_splits times instead of every split once"),
    # -- MoE backward -------------------------------------------------------------------------------
    Mutant("moe-bwd-silu-derivative", "kernels/moe.py",
           "d_g = d_out_h * u * sig * (1.0 + g * (1.0 - sig))", "d_g = d_out_h * u * sig", MOE_BACKWARD,
           "SwiGLU backward takes sigmoid(g) for silu'(g): gate gradients wrong wherever g is not ~0"),
    Mutant("moe-bwd-router-weight-output", "kernels/moe.py",
           "d_w = tl.sum(d_h * h, axis=1)", "d_w = tl.sum(d_out_h * h, axis=1)", MOE_BACKWARD,
           "router weight on the output: its gradient picks up an extra factor w"),
    Mutant("moe-bwd-wgrad-row-of-pair", "kernels/moe.py",
           "a = tl.load(a_ptr + (pairs // A_ROW_DIV)[:, None] * stride_am",
           "a = tl.load(a_ptr + pairs[:, None] * stride_am", MOE_BACKWARD,
           "gate_up weight gradient reads x by pair instead of by token: wrong rows for top_k > 1"),
    # -- transformers' other experts (experts_implementation="llama4_fast") ------------------------------
    Mutant("moe-bias-every-split", "kernels/moe.py",
           "use_bias = valid_expert & (pid_s == 0)", "use_bias = valid_expert", EXPERTS,
           "split-K adds the bias once per split instead of once"),
    Mutant("moe-interleaved-up-column", "kernels/moe.py",
           "        up_shift = 1\n", "        up_shift = N\n", EXPERTS,
           "interleaved gate/up (gpt-oss) read as concatenated: up taken from the wrong columns"),
    Mutant("moe-bwd-down-bias-router-grad", "kernels/moe.py",
           "            d_w += d_w_bias", "            d_w += 0.0 * d_w_bias", MOE_BACKWARD,
           "router-weight gradient without dOut . b2 when the down projection has a bias"),
    # -- MoeConfig's Hopper options (TMA descriptors, h in expert order, epilogue pieces) -----------------
    Mutant("moe-tma-h-by-pair", "kernels/moe.py",
           "    if C_BY_SLOT:\n        c_rows = slots.to(tl.int64)", "    if False:\n        c_rows = slots.to(tl.int64)",
           HOPPER, "gate_up writes h by pair while the down GEMM reads it in expert order"),
    Mutant("moe-tma-up-columns", "kernels/moe.py",
           "weight_tile(b_desc, expert, k0, N + pid_n * BLOCK_N,", "weight_tile(b_desc, expert, k0, pid_n * BLOCK_N,",
           HOPPER,
           "the up block read from the gate columns"),
    Mutant("moe-tma-a-block-row", "kernels/moe.py",
           "a = a_desc.load([first_row, k0])", "a = a_desc.load([first_row - first_row % BLOCK_M, k0])", HOPPER,
           "the down GEMM's A block read from a block-aligned row instead of the block's first slot"),
    Mutant("moe-tma-interleaved-halves", "kernels/moe.py",
           "b_gate, b_up = b_pair.reshape(", "b_up, b_gate = b_pair.reshape(", HOPPER,
           "interleaved gate/up through TMA: the gate and up halves of the block swapped"),
    Mutant("tma-transposed-weight-tile", "kernels/gemm.py",
           "return desc.load([index, n0, k0]).reshape(COLS, ROWS).trans()",
           "return desc.load([index, n0, k0]).reshape(ROWS, COLS)", HOPPER,
           "a K-contiguous weight's tile read without its transpose"),
    Mutant("moe-tma-int4-packed-rows", "kernels/moe.py",
           "                    w_rows = k0 // 2\n", "                    w_rows = k0\n", HOPPER,
           "packed INT4 expert rows addressed as if unpacked (two K rows per byte)"),
    Mutant("moe-epilogue-piece-columns", "kernels/moe.py",
           "            _store_piece(rows_ptr, n1, a1, row_mask, N, stride_cn)",
           "            _store_piece(rows_ptr, n0, a1, row_mask, N, stride_cn)", HOPPER,
           "the second epilogue piece stored over the first"),
    Mutant("attention-tma-values-past-key-end", "kernels/attention.py",
           "v = tl.where((keys < key_end)[:, None], v, 0.0)", "v = v + 0.0", ("tests/test_attention_tma.py",),
           "TMA loads whole tiles: without zeroing, values past kv_len (NaN in a static cache) reach the rows"),
    Mutant("sdpa-chunks-tail-causal", "llama4_fast/backends/sdpa.py",
           "    tail = attend(q[:, :, main:], k[:, :, main:], v[:, :, main:])",
           "    tail = attend(q[:, :, main:], k[:, :, main - 1:-1], v[:, :, main - 1:-1])", ("tests/test_sdpa_backend.py",),
           "the partial last chunk attends to keys shifted by one position"),
    # -- attention backward ----------------------------------------------------------------------------
    Mutant("attention-bwd-delta", "kernels/attention.py",
           "ds_t = tl.where(visible, p_t * (dp_t - delta[None, :]), 0.0)",
           "ds_t = tl.where(visible, p_t * dp_t, 0.0)", ATTENTION_BACKWARD,
           "dK without the softmax's row term delta = rowsum(dO * O)"),
    Mutant("attention-bwd-gqa-heads", "kernels/attention.py",
           "for t in range(0, GROUP * m_tiles):", "for t in range(0, m_tiles):", ATTENTION_BACKWARD,
           "dK/dV sum only the first query head of each GQA group"),
    # -- attention ---------------------------------------------------------------------------------
    Mutant("attention-split-merge", "kernels/attention.py",
           'w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))',
           'w = tl.exp(lse - tl.where(m == float("-inf"), 0.0, m))', ATTENTION,
           "split-KV merge weighs base-2 log-sum-exps with e^x: wrong split weights"),
    Mutant("attention-kv-len-off-by-one", "kernels/attention.py",
           "seq_kv = tl.load(KVLen + b).to(tl.int32)", "seq_kv = tl.load(KVLen + b).to(tl.int32) - 1", ATTENTION,
           "static-cache length off by one: the newest key is dropped and positions shift"),
    Mutant("attention-kv-start-tensor-ignored", "kernels/attention.py",
           "kv_start = tl.load(KVStart + b).to(tl.int32)", "kv_start = kv_start_int", ATTENTION,
           "per-sequence kv_start ignored: left padding attended, chunk boundaries misplaced"),
    Mutant("attention-gqa-head", "kernels/attention.py",
           "kv_head = (hp * PACK) // GROUP", "kv_head = hp // GROUP", ATTENTION,
           "GQA head mapping ignores the packed decode layout: query heads read another KV head"),
    # -- q/k prologue -------------------------------------------------------------------------------
    Mutant("prologue-rope-sign", "kernels/prologue.py",
           "tl.join(even * c - odd * sn, even * sn + odd * c)", "tl.join(even * c + odd * sn, odd * c - even * sn)",
           PROLOGUE, "RoPE rotates pairs the wrong way (conjugate angle)"),
    Mutant("prologue-qk-norm-eps", "kernels/prologue.py",
           "x = x * tl.rsqrt(mean_sq + eps)[:, None]", "x = x / (tl.sqrt(mean_sq) + eps)[:, None]", PROLOGUE,
           "qk-norm adds eps to the norm instead of the mean square: wrong for small heads"),
    Mutant("prologue-temperature-floor", "kernels/prologue.py",
           "tl.floor(tl.math.div_rn(pos + 1.0, floor_scale))", "tl.floor(tl.math.div_rn(pos, floor_scale))",
           PROLOGUE, "NoPE temperature floors pos / floor_scale instead of (pos + 1) / floor_scale"),
    # -- dequant --------------------------------------------------------------------------------------
    Mutant("dequant-int4-asym-zero", "kernels/dequant.py",
           "        if WEIGHT_FORMAT == INT4_ASYM:\n            zero = tl.load(",
           "        if WEIGHT_FORMAT == -1:\n            zero = tl.load(", QUANT,
           "asymmetric INT4 zero points ignored (8 used): GPTQ checkpoints dequantize wrong"),
    Mutant("dequant-int4-nibbles-swapped", "kernels/dequant.py",
           "a_even, a_odd = tl.split(", "a_odd, a_even = tl.split(", QUANT,
           "low and high nibbles swapped: even K rows multiply odd activations"),
    Mutant("dequant-fp8-rowwise-weight-scale", "kernels/dequant.py",
           "acc = acc * a_scale[:, None] * s[None, :]", "acc = acc * a_scale[:, None]", QUANT,
           "fp8 per-channel / per-tensor weight scale dropped from the epilogue"),
    Mutant("quant-matmul-fp8-block-act-scale", "kernels/quant_matmul.py",
           "offs_m * stride_asm + (k0 // FP8_BLOCK_SIZE) * stride_ask",
           "offs_m * stride_asm + (k_lo // FP8_BLOCK_SIZE) * stride_ask", ("tests/test_quant_matmul.py",),
           "dense fp8_block matmul reuses the first K group's activation scale"),
    # -- model: KV cache, transformers mask layout -------------------------------------------------
    Mutant("kv-cache-chunked-slot", "llama4_fast/model.py",
           "slot = pos % chunk_size", "slot = (self.col + 0 * self.pad) % chunk_size",
           ("tests/test_model.py",),
           "chunked-layer decode slot from the cache column instead of each sequence's position: "
           "left-padded sequences write and read the wrong slot of their chunk"),
    Mutant("hf-mask-left-padding", "llama4_fast/hf_patch.py",
           "kv_start = kv_offset - left.to(torch.int32)", "kv_start = kv_offset + left.to(torch.int32)",
           ("tests/test_hf_patch.py",),
           "transformers mask layout puts left padding at positive positions: padded prompts attend it"),
]


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------

def make_copy() -> Path:
    """A scratch copy of the repository whose llama4_fast.kernels is its own kernels/."""
    where = Path(tempfile.mkdtemp(prefix="llama4-mutant-"))
    copy = where / "repo"
    shutil.copytree(ROOT, copy, ignore=IGNORE)
    (copy / "llama4_fast" / "kernels").symlink_to(Path("..") / "kernels", target_is_directory=True)
    return copy


def copy_env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # one thread per pytest: the jobs share the cores
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def preflight():
    """Check that a copy imports its own llama4_fast and llama4_fast.kernels, not the checkout's."""
    copy = make_copy()
    try:
        probe = "import llama4_fast, llama4_fast.kernels.moe as m; print(llama4_fast.__file__); print(m.__file__)"
        out = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=copy_env(copy), capture_output=True,
                             text=True, timeout=300)
        files = out.stdout.split()
        if out.returncode or len(files) != 2 or not all(Path(f).resolve().is_relative_to(copy.resolve())
                                                        for f in files):
            sys.exit(f"preflight: the copy does not import its own code:\n{out.stdout}{out.stderr}")
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


def run_pytest(copy: Path, tests, timeout: int):
    """(return code, first failing test or error line, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=copy_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout} s", time.monotonic() - start
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    detail = failed.group(1) if failed else (proc.stdout.strip().splitlines() or [""])[-1]
    return proc.returncode, detail, time.monotonic() - start


def run_mutant(m: Mutant, timeout: int, keep: bool):
    copy = make_copy()
    try:
        path = copy / m.file
        src = path.read_text()
        if src.count(m.old) != 1:
            return m, "stale", f"snippet found {src.count(m.old)} times in {m.file}", 0.0
        path.write_text(src.replace(m.old, m.new))
        rc, detail, secs = run_pytest(copy, m.tests, timeout)
        # pytest: 0 all passed, 1 some failed; a crash (e.g. a segfault) also counts as caught.
        if rc == 0:
            verdict = "SURVIVED"
        elif rc is None:
            verdict = "timeout"
        elif rc in (2, 3, 4, 5):  # interrupted, internal error, usage error, nothing collected
            verdict = f"error (pytest exit {rc})"
        else:
            verdict = "caught"
        return m, verdict, detail, secs
    finally:
        if keep:
            print(f"kept {copy}", file=sys.stderr)
        else:
            shutil.rmtree(copy.parent, ignore_errors=True)


def baseline(timeout: int, jobs: int):
    """The unmutated copy must pass every test file the mutants use."""
    files = sorted({t for m in MUTANTS for t in m.tests})
    copy = make_copy()
    try:
        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda f: (f, *run_pytest(copy, (f,), timeout)), files))
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)
    for f, rc, detail, secs in results:
        print(f"baseline {f}: {'ok' if rc == 0 else 'FAILS: ' + detail} ({secs:.0f} s)")
    if any(rc != 0 for _, rc, _, _ in results):
        sys.exit("the unmutated suite fails: mutant results would mean nothing")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="run only these mutants (names from --list)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants run at once")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--baseline", action="store_true", help="first check the unmutated copy passes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args(argv)

    chosen = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutants: {sorted(unknown)}")
        chosen = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in chosen:
            stale = "" if (ROOT / m.file).read_text().count(m.old) == 1 else "  STALE: snippet not found once"
            print(f"{m.name:36s} {m.file:28s} {', '.join(m.tests)}{stale}\n    {m.why}")
        return 0

    preflight()
    if args.baseline:
        baseline(args.timeout, args.jobs)
    start = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda m: run_mutant(m, args.timeout, args.keep), chosen))
    print("| mutant | file | tests run | result | first failure / detail | time |")
    print("|---|---|---|---|---|---|")
    for m, verdict, detail, secs in results:
        tests = ", ".join(Path(t.split("::")[0]).name for t in m.tests)
        print(f"| {m.name} | {m.file} | {tests} | {verdict} | {detail} | {secs:.0f} s |")
    bad = [m.name for m, verdict, _, _ in results if verdict != "caught"]
    print(f"\n{len(results) - len(bad)}/{len(results)} caught in {time.monotonic() - start:.0f} s"
          + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
