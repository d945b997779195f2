"""Sweep fused_moe launch configs on a GPU: the data behind kernels/configs/moe_h100.json.

Each candidate is timed replayed from a CUDA graph (kernel time, no host overhead) and checked
against the default config's output, itself checked against the torch backend. One gate_up/down
GEMM is varied at a time around the current choice. Prints a table per case and writes
benchmarks/results/tune_moe-<gpu>-<time>.json. A candidate that fails to compile is a data
point; one past common.WRONG_REL_ERR is a wrong answer of the kernel: never the best, and the
script exits 1 (common.exit_status) once the table and the JSON are out.

    python benchmarks/tune_moe.py                   # the default cases (~2 minutes on an H100)
    python benchmarks/tune_moe.py --hopper          # only MoeConfig's Hopper options, each case
    python benchmarks/tune_moe.py --hopper --cases scout:8192 maverick:1
    python benchmarks/tune_moe.py --hopper --weights fp8 --cases scout:8192 maverick-tp8:1
    python benchmarks/tune_moe.py --hopper --quick  # toy sizes; runs on CPU (interpreter)

--hopper times each case's default config against the same tiles with MoeConfig's Hopper
options (TMA descriptors, the epilogue in 64-column pieces, programmatic dependent launch), each
and all three, then with all three the prefill tiles the spills had ruled out and, at decode,
other split-K counts: what moe_h100.json's `tma` / `epilogue_block_n` / `pdl` and
gemm.split_k's rule wait on.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # --quick: before triton is first imported
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Budget, exit_status, markdown_table, rel_err, time_us, verdict, write_results, wrong_answer  # noqa: E402

from llama4_fast.backends import torch_ref  # noqa: E402
from llama4_fast.kernels import moe, route  # noqa: E402
from llama4_fast.kernels.gemm import GemmConfig  # noqa: E402
from llama4_fast.quant import expert_kernel_args, quantize_weight  # noqa: E402

INT4_GROUP, QUICK_INT4_GROUP = 128, 32  # the toy shape's H = 64

# (E, H, I); -tp8: one of eight tensor-parallel shards of the experts (I / 8)
SHAPES = {"scout": (16, 5120, 8192), "maverick": (128, 5120, 8192), "scout-tp8": (16, 5120, 1024),
          "maverick-tp8": (128, 5120, 1024)}
# --quick: a toy shape (16-byte aligned rows, so the TMA options really take descriptors)
QUICK_SHAPES = {"toy": (4, 64, 96)}
QUICK_CASES = [("toy", 1), ("toy", 40)]
# (shape, T): prefill where the target is compute, decode sizes where it is bandwidth.
CASES = [("scout", 8192), ("scout", 1), ("maverick", 1), ("scout", 64), ("maverick", 64), ("maverick", 32)]
PREFILL_GEMMS = {
    "gate_up": [GemmConfig(64, 64, 8, 8, 4), GemmConfig(64, 64, 8, 8, 3), GemmConfig(64, 128, 8, 8, 3),
                GemmConfig(128, 64, 8, 8, 3)],
    "down": [GemmConfig(256, 64, 8, 8, 3), GemmConfig(128, 64, 8, 8, 4), GemmConfig(128, 128, 8, 8, 3),
             GemmConfig(256, 64, 8, 8, 4), GemmConfig(128, 64, 8, 4, 4)],
}
DECODE_GEMMS = [GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 6), GemmConfig(64, 256, 1, 4, 3),
                GemmConfig(32, 128, 1, 4, 4), GemmConfig(64, 128, 1, 8, 4), GemmConfig(128, 128, 1, 4, 4)]


def graph_time(fn) -> float:
    """Kernel time replayed from a CUDA graph; on CPU (--quick) the wall clock of eager calls."""
    if not torch.cuda.is_available():
        return time_us(fn, warmup_ms=0, rep_ms=0)
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return time_us(g.replay, warmup_ms=10, rep_ms=60)


def hopper_candidates(base: moe.MoeConfig, T: int) -> list[tuple[str, moe.MoeConfig]]:
    """The default tiles with each Hopper option and all three; then at prefill wider or deeper
    tiles with all three, at decode K split further than gemm.split_k's rule allows (the
    bandwidth question: TP8's down GEMM at T=1 has 80 column tiles for 132 SMs, unsplit)."""
    every = dict(tma=True, epilogue_block_n=64, pdl=True)
    out = [("epilogue 64", replace(base, epilogue_block_n=64)), ("tma", replace(base, tma=True)),
           ("pdl", replace(base, pdl=True)), ("tma + epilogue 64 + pdl", replace(base, **every))]
    if T >= 1024:
        for name, gemms in PREFILL_GEMMS.items():
            out += [(f"tma + epilogue 64 + pdl, {name}={g}",
                     replace(base, **every, **{name: replace(g, split_k=getattr(base, name).split_k)}))
                    for g in gemms]
    else:
        for name in ("gate_up", "down"):
            g = getattr(base, name)
            out += [(f"tma + epilogue 64 + pdl, {name} split_k={s}", replace(base, **every, **{name: replace(g, split_k=s)}))
                    for s in (1, 2, 4, 8) if s != g.split_k]
    return out


def run_case(shape: str, T: int, budget: Budget, hopper: bool = False, scheme: str = "bf16") -> list[dict]:
    E, H, I = {**SHAPES, **QUICK_SHAPES}[shape]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter has no bf16 dot
    gen = torch.Generator(device=dev).manual_seed(T)
    w13 = torch.randn(E, H, 2 * I, device=dev, dtype=dtype, generator=gen).mul_(0.02)
    w2 = torch.randn(E, I, H, device=dev, dtype=dtype, generator=gen).mul_(0.02)
    x = torch.randn(T, H, device=dev, dtype=dtype, generator=gen)
    weights, ids = route(torch.randn(T, E, device=dev, dtype=dtype, generator=gen), 1)
    experts = (w13, w2)  # what the torch reference takes: the tensors, or the quantized format objects
    quant = None
    if scheme != "bf16":  # the experts in their stored quantized layout, as a model holds them
        group = QUICK_INT4_GROUP if shape in QUICK_SHAPES else INT4_GROUP
        experts = tuple(quantize_weight(w, scheme, group) for w in (w13, w2))
        w13, w2 = (q.tensors()[0] for q in experts)
        quant = moe.quant_experts_args(x, w13, w2, **expert_kernel_args(*experts))
    torch_out = torch_ref.fused_moe(x, *experts, weights, ids)  # the default config's own check
    base = moe.launch_config(x, w13, w2, 1, quant)
    ref = moe._launch(x, w13, w2, weights, ids, True, torch.empty_like(x), base, quant).float()
    candidates = [("default", base)]
    if hopper:
        candidates += hopper_candidates(base, T)
    elif T >= 1024:
        for name in ("gate_up", "down"):
            candidates += [(f"{name}={g}", replace(base, **{name: replace(g, split_k=getattr(base, name).split_k)}))
                           for g in PREFILL_GEMMS[name]]
    else:
        for name in ("gate_up", "down"):
            candidates += [(f"{name}={g}", replace(base, **{name: replace(g, split_k=getattr(base, name).split_k)}))
                           for g in DECODE_GEMMS]
        candidates += [(f"direct BM={bm}", replace(base, block_m=bm)) for bm in (32, 64) if 16 < T <= bm]
        candidates += [("no split", replace(base, gate_up=replace(base.gate_up, split_k=1),
                                            down=replace(base.down, split_k=1)))]
    rows = []
    seen = []
    for label, cfg in candidates:
        if cfg in seen:  # a sweep point that is the default's (or an earlier point's) config
            continue
        seen.append(cfg)
        out = torch.empty_like(x)
        row = {"shape": shape, "T": T, "weights": scheme, "config": label}
        if budget.exhausted():
            row["error"] = "skipped: time budget"
            rows.append(row)
            continue
        try:
            row["us"] = graph_time(lambda: moe._launch(x, w13, w2, weights, ids, True, out, cfg, quant))
            row["err"] = rel_err(out, torch_out if label == "default" else ref)
            row["wrong"] = wrong_answer(row["err"])
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is a data point
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(f"  {shape} {scheme} T={T} {label}: {row.get('us', float('nan')):.1f} us "
              f"err {row.get('err', float('nan')):.1e} {row.get('error', '')}", flush=True)
    default_us = rows[0].get("us")
    for r in rows:  # the same case's default over this candidate, from the same run
        if default_us and "us" in r:
            r["vs_default"] = default_us / r["us"]
    best = min((r for r in rows if "us" in r and not r.get("wrong")), key=lambda r: r["us"], default=None)
    if best:
        best["best"] = True
    return rows


def main(argv=None):
    """Returns the exit status: 1 when a candidate (or the default) gave a wrong answer."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hopper", action="store_true",
                        help="time MoeConfig's Hopper options (tma, epilogue_block_n, pdl) instead of the tile sweep")
    parser.add_argument("--cases", nargs="+", metavar="SHAPE:T", default=[f"{s}:{t}" for s, t in CASES],
                        help=f"cases to run (default: all, {' '.join(f'{s}:{t}' for s, t in CASES)}); "
                             f"shapes: {', '.join(SHAPES)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget; candidates past it are skipped (default: none)")
    parser.add_argument("--weights", choices=("bf16", "fp8", "int4"), default="bf16",
                        help=f"the experts' format (fp8: per-channel e4m3; int4: group {INT4_GROUP}); the tile sweep "
                             "is bf16's, --hopper compares the options in any format")
    parser.add_argument("--quick", action="store_true",
                        help="a toy shape instead of --cases (CPU-runnable through the Triton interpreter)")
    args = parser.parse_args(argv)
    if args.weights != "bf16" and not args.hopper:
        parser.error("--weights fp8/int4 takes --hopper (the tile sweep's K steps are bf16's, not inside scale groups)")
    cases = list(QUICK_CASES) if args.quick else []
    for case in [] if args.quick else args.cases:
        shape, _, tokens = case.partition(":")
        if shape not in SHAPES or not tokens.isdigit() or int(tokens) < 1:
            parser.error(f"--cases: {case!r} is not SHAPE:T with SHAPE in {sorted(SHAPES)} and T >= 1")
        cases.append((shape, int(tokens)))
    if not torch.cuda.is_available() and not args.quick:
        print("tune_moe.py needs a CUDA GPU (or --quick)")
        return 0
    rows = []
    budget = Budget(float("inf") if args.budget_s is None else args.budget_s)
    for shape, T in cases:
        rows += run_case(shape, T, budget, args.hopper, args.weights)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    cols = [("shape", "shape", ""), ("weights", "weights", ""), ("T", "T", ""), ("config", "config", ""),
            ("us", "graph us", ".1f"), ("vs_default", "default / this", ".2f"), ("err", "err", ".1e"),
            ("best", "best", "")]
    print(markdown_table(rows, cols))
    found = verdict([(f"{r['shape']} T={r['T']} {r['config']}", r.get("wrong")) for r in rows], [])
    print(write_results("tune_moe", {"cases": rows, "verdict": found}))
    return exit_status(found)


if __name__ == "__main__":
    sys.exit(main())
