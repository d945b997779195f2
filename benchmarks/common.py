"""Timing, roofline and result-file helpers shared by every benchmark script.

Rules (DESIGN.md, "Benchmarks"): CUDA-event timing (triton.testing.do_bench, median) after
warm-up, on random data, rotating input sets when they fit in L2; the two ceilings (HBM copy
bandwidth, bf16 matmul rate) measured in the same run; every run writes
`benchmarks/results/<bench>-<gpu>-<yyyymmdd-hhmm>.json` and prints a markdown table.
On a machine without a GPU the same code runs at toy sizes with a wall-clock timer.
The kernel benchmarks check answers before timing them and exit 1 when ours is wrong: the rule
is in the "answers" section below (rel_err, wrong_answer, disagreement, verdict, exit_status).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
L2_BYTES = 50 * 2**20  # H100 SXM; inputs smaller than this are rotated so repeats miss the cache
# Relative-norm error past which an answer is wrong, not rounding: bf16 outputs round at 2^-9 and
# FP8/INT4 methods are checked against their own dequantized-weight reference.
WRONG_REL_ERR = 2e-2


# ----------------------------------------------------------------------------------------------
# answers. Ours is checked first, against a reference that depends on no kernel it is compared
# with: past WRONG_REL_ERR its time is not published (the entry gets an error) and the script
# exits 1. A baseline past WRONG_REL_ERR from ours (or the reference) disagrees: it stays timed
# and carries a flag in the table and the JSON, the script still exits 0 (ours passed its
# check, so the baseline is the suspect) and tests/test_benchmarks.py fails on it.
# ----------------------------------------------------------------------------------------------

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in fp32 (NaN when out has a NaN)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def wrong_answer(err: float) -> str | None:
    """The error to record for ours instead of a timing when `err` is past WRONG_REL_ERR (or NaN)."""
    if err <= WRONG_REL_ERR:
        return None
    msg = f"WRONG ANSWER: relative error {err:.2e} > {WRONG_REL_ERR:g}"
    print(f"    {msg}", flush=True)
    return msg


def disagreement(err: float, against: str) -> str | None:
    """The flag a baseline's answer carries when it is `err` from `against` (ours, or the
    reference) by relative norm, past WRONG_REL_ERR (or NaN); None when it agrees."""
    if err <= WRONG_REL_ERR:
        return None
    msg = f"DISAGREES with {against}: relative error {err:.2e} > {WRONG_REL_ERR:g}"
    print(f"    {msg}", flush=True)
    return msg


def verdict(ours: Iterable[tuple[str, str | None]], baselines: Iterable[tuple[str, str | None]]) -> dict:
    """What a run found wrong, for its JSON ("verdict") and exit_status.

    ours: (where, recorded error or None) of every entry of our kernels; a wrong answer or an
        exception is a failure, a skip ("skipped: ...", budget or memory) is not.
    baselines: (where, disagreement flag or None) of every baseline entry.
    """
    return {"failures": [f"{where}: {e}" for where, e in ours if e and not e.startswith("skipped")],
            "disagreements": [f"{where}: {flag}" for where, flag in baselines if flag]}


def exit_status(verdict: dict) -> int:
    """Print the verdict's findings (last, after the tables) and return the script's exit
    status: 1 when any of ours failed, else 0 (a disagreeing baseline alone is reported)."""
    for title, items in (("FAILED, ours", verdict["failures"]), ("baselines that disagree", verdict["disagreements"])):
        if items:
            print(f"\n{title}:\n" + "\n".join(f"  {item}" for item in items), flush=True)
    return 1 if verdict["failures"] else 0


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}"


def slug(name: str) -> str:
    return "".join(c.lower() if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def environment() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        triton_version = None
    # The GPU machines get a copy without .git: run_gpu_suite.sh is then given the commit in
    # LLAMA4_FAST_COMMIT (see its header); None where neither says.
    commit = os.environ.get("LLAMA4_FAST_COMMIT")
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        if git.returncode == 0 and git.stdout.strip() != "HEAD":
            commit = git.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class Budget:
    """Wall-clock budget for a whole run: past it, the remaining cases are skipped."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def exhausted(self) -> bool:
        return self.left() <= 0


class Flex:
    """flex_attention compiled once on a GPU (dynamic shapes), eager on CPU (compiling with the
    C++ inductor would dominate a quick run), and the causal / chunked-causal block masks
    transformers builds for it. `why` says why it is unavailable, if it is."""

    def __init__(self, device: str):
        self.why = None
        self.compiled = device == "cuda"
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            self.why = f"unavailable: flex_attention does not import ({e})"
            return
        self.create_block_mask = create_block_mask
        self.attn = torch.compile(flex_attention, dynamic=True) if self.compiled else flex_attention

    def block_mask(self, S: int, chunk: int | None, device: str):
        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx

        def chunked_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (kv_idx // chunk == q_idx // chunk)

        return self.create_block_mask(causal if chunk is None else chunked_causal, None, None, S, S,
                                      device=device, _compile=self.compiled)


def rotating(make_inputs: Callable[[], tuple], bytes_per_set: int) -> Callable[[], tuple]:
    """Return a function yielding input sets in turn: enough sets that together they exceed L2
    (at most 16), so a repeated call does not time the cache."""
    n = 1 if bytes_per_set >= L2_BYTES else min(16, -(-2 * L2_BYTES // max(bytes_per_set, 1)))
    sets = [make_inputs() for _ in range(n)]
    cycle = itertools.cycle(sets)
    return lambda: next(cycle)


def time_us(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of `fn()` in microseconds: CUDA events on a GPU, wall clock on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3
    fn()  # warm-up (compiles, allocator)
    samples = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 50):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def measure_ceilings(quick: bool = False) -> dict:
    """Measure the two roofline ceilings on this device, in this run.

    hbm_tbps: a large device-to-device copy, counting bytes read plus bytes written.
    matmul_tflops: a large bf16 matmul (fp32 on CPU, where bf16 matmul is not representative).
    """
    dev = device()
    n_bytes = (2**20 if quick else 2**31) if dev == "cuda" else 2**24
    src = torch.randn(n_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    t_copy = time_us(lambda: dst.copy_(src)) * 1e-6
    hbm = 2 * n_bytes / t_copy / 1e12
    m = (1024 if quick else 8192) if dev == "cuda" else 256
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    a = torch.randn(m, m, device=dev, dtype=dtype)
    b = torch.randn(m, m, device=dev, dtype=dtype)
    t_mm = time_us(lambda: a @ b) * 1e-6
    del src, dst, a, b
    return {"hbm_tbps": hbm, "matmul_tflops": 2 * m**3 / t_mm / 1e12, "matmul_dtype": str(dtype)}


def scaled_mm_available(dev: str) -> str | None:
    """None if torch._scaled_mm with rowwise scales runs here, else why not."""
    if dev != "cuda":
        return "torch._scaled_mm needs a CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 9):
        return "torch._scaled_mm needs sm89+"
    try:
        a = torch.randn(16, 64, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(32, 64, device=dev).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, b.t(), scale_a=torch.ones(16, 1, device=dev), scale_b=torch.ones(1, 32, device=dev),
                         out_dtype=torch.bfloat16)
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        return f"torch._scaled_mm failed: {type(e).__name__}: {e}"
    return None


def fp8_peak_tflops(dev: str, quick: bool) -> float | None:
    """The FP8 matmul ceiling, measured like the bf16 one (a large _scaled_mm)."""
    if scaled_mm_available(dev):
        return None
    m = 1024 if quick else 8192
    a = torch.randn(m, m, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(m, m, device=dev).to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    t = time_us(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                         use_fast_accum=True))
    return 2 * m**3 / (t * 1e-6) / 1e12


def fp8_ceilings(ceilings: dict) -> dict:
    """The ceilings an FP8 GEMM is held to: the measured FP8 matmul peak as its compute ceiling
    (ceilings["fp8_matmul_tflops"]), or the bf16 one where no FP8 peak was measured."""
    peak = ceilings.get("fp8_matmul_tflops")
    return dict(ceilings, matmul_tflops=peak) if peak else ceilings


def roofline(us: float, bytes_moved: float, flops: float, ceilings: dict) -> dict:
    """Achieved rates and the fraction of the roofline: floor = max(bytes/BW, flops/peak)."""
    t = us * 1e-6
    floor_s = max(bytes_moved / (ceilings["hbm_tbps"] * 1e12), flops / (ceilings["matmul_tflops"] * 1e12))
    return {
        "tbps": bytes_moved / t / 1e12,
        "tflops": flops / t / 1e12,
        "roofline_us": floor_s * 1e6,
        "pct_roofline": 100.0 * floor_s / t,
        "bound": "memory" if bytes_moved / ceilings["hbm_tbps"] >= flops / ceilings["matmul_tflops"] else "compute",
    }


def write_results(bench: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write `<bench>-<gpu>-<yyyymmdd-hhmm>.json` under benchmarks/results (or out_dir)."""
    out_dir = Path(out_dir or os.environ.get("LLAMA4_FAST_RESULTS", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    path = out_dir / f"{bench}-{slug(gpu_name())}-{stamp}.json"
    path.write_text(json.dumps({"bench": bench, "environment": environment(), **payload}, indent=2) + "\n")
    return path


def rewrite_results(bench: str, payload: dict, previous: Path | None) -> Path:
    """write_results for a run that saves after every finished part, so a run cut short by a
    time limit still leaves them: the new file replaces `previous` (and its PNG)."""
    path = write_results(bench, payload)
    if previous is not None and previous != path:
        previous.unlink(missing_ok=True)
        previous.with_suffix(".png").unlink(missing_ok=True)
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """rows: dicts; columns: (key, header, format spec). Missing values print as '-', a dict as
    its keys (the names a row flags)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---:" if f else "---" for _, _, f in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            if isinstance(v, dict):
                v = ", ".join(v) or None
            cells.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
