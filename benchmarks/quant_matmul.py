"""Dense dequant-matmul: FP8 and INT4 weights (ours) against bf16 cuBLAS and torch._scaled_mm.

y [M, N] = x [M, K] @ W [K, N] for Llama 4's projection shapes (K x N: 5120x8192 and 8192x5120,
the expert/shared MLP in and out; 5120x1024 and 1024x5120 their TP8 shards), over M tokens,
side by side in one run:
  bf16        F.linear (cuBLAS) with the bf16 weight
  scaled_mm   torch._scaled_mm FP8 rowwise (e4m3 weight with per-channel scales), including
              the per-token activation quantization in torch (what a caller runs); sm89+
  ours_fp8    llama4_fast.kernels.quant_matmul, fp8_rowwise (activation quantization kernel
              included)
  ours_int4   the same kernel, INT4 symmetric, group 128 (weight-only)
  ours_fp8_tma, ours_int4_tma  the same two with MatmulConfig.tma (activations and weights
              through TMA descriptors; not the default until a run like this one decides)
  fp8 act-quant  the activation quantization alone (quantize_fp8_activations, per token): the
              share of ours_fp8 that a per-token amax inside the GEMM would save at small M
The roofline counts the bytes that must move (weight in its format with its scales, x, y) and
2MKN FLOPs against the measured copy bandwidth and bf16 matmul peak (FP8 rows against the
measured FP8 peak when _scaled_mm runs here). Writes
benchmarks/results/quant_matmul-<gpu>-<time>.json and a markdown table per shape.

Answers: every method is checked, before it is timed, against `reference` (x @ W in fp32 for
bf16, the torch dequantized-weight reference of its own format for the others). Ours past
common.WRONG_REL_ERR is recorded as a wrong answer instead of a time, and the script exits 1
once every table and the JSON are out (as when ours raises). A baseline past it is flagged
(`disagrees` column, JSON) and still timed, and the exit status stays 0 (ours matched the
reference, so the baseline is the suspect); tests/test_benchmarks.py fails on it.

    python benchmarks/quant_matmul.py                   # the full run (~1 min on an H100)
    python benchmarks/quant_matmul.py --shapes 5120x1024 --tokens 1 16
    python benchmarks/quant_matmul.py --quick           # toy sizes; runs on CPU (interpreter)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (L2_BYTES, Budget, device, disagreement, exit_status, fp8_ceilings, fp8_peak_tflops,  # noqa: E402
                    markdown_table, measure_ceilings, rel_err, rewrite_results, roofline, rotating,
                    scaled_mm_available, time_us, verdict, wrong_answer)

from llama4_fast.kernels import quant_matmul, quantize_fp8_activations  # noqa: E402
from llama4_fast.kernels.dequant import FORMATS  # noqa: E402
from llama4_fast.kernels.gemm import num_sms  # noqa: E402

qm = sys.modules["llama4_fast.kernels.quant_matmul"]  # the package exports a same-named function
from llama4_fast.quant import Fp8Weight, Int4Weight, quant_linear_ref, quantize_fp8_activations_ref  # noqa: E402

SHAPES = {"5120x8192": (5120, 8192), "8192x5120": (8192, 5120), "5120x1024": (5120, 1024), "1024x5120": (1024, 5120)}
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 4096]
QUICK_SHAPES = {"256x96": (256, 96)}
QUICK_TOKENS = [1, 24]
GROUP = 128
WARMUP_MS, REP_MS = 10, 40
METHODS = ("bf16", "scaled_mm", "ours_fp8", "ours_int4", "ours_fp8_tma", "ours_int4_tma")
# the names in a row's "errors" that are our kernels
OURS = ("ours_fp8", "ours_int4", "ours_fp8_tma", "ours_int4_tma", "fp8_act_quant")
SEED = 0
MAX_WEIGHT_SETS = 48  # TP8 shards are 2.6 MB in INT4: enough copies that repeats miss L2


def weight_bytes(weight, K: int, N: int, elem: int) -> int:
    """Bytes a method must read for its weight: the bf16 matrix (weight None), or every tensor
    of the format object (FP8 values and fp32 scales; INT4 nibbles and scales in x's dtype)."""
    if weight is None:
        return K * N * elem
    return sum(t.numel() * t.element_size() for t in weight.tensors())


def make_methods(w: torch.Tensor, dtype, scaled_mm_reason):
    """{method: fn(x) -> y} with their weights prepared once (not timed)."""
    fp8 = Fp8Weight.quantize(w)  # per-channel e4m3, stored K-contiguous
    int4 = Int4Weight.quantize(w, GROUP, scale_dtype=dtype)  # a model's scales: its dtype (w is fp32 here)
    w_lin = w.t().contiguous().to(dtype)  # nn.Linear layout [N, K]
    K, N = w.shape

    def tma(x, code):  # the call's default launch config with TMA on
        return qm.launch_config(x.shape[0], N, K, code, GROUP, num_sms(x.device))._replace(tma=True)

    methods = {
        "bf16": (lambda x: F.linear(x, w_lin)),
        "ours_fp8": (lambda x: quant_matmul(x, fp8.qweight, fp8.scale, weight_format="fp8_rowwise")),
        "ours_int4": (lambda x: quant_matmul(x, int4.packed, int4.scale, weight_format="int4", group_size=GROUP)),
        "ours_fp8_tma": (lambda x: quant_matmul(x, fp8.qweight, fp8.scale, weight_format="fp8_rowwise",
                                                config=tma(x, FORMATS["fp8_rowwise"]))),
        "ours_int4_tma": (lambda x: quant_matmul(x, int4.packed, int4.scale, weight_format="int4", group_size=GROUP,
                                                 config=tma(x, FORMATS["int4_sym"]))),
    }
    refs = {"bf16": None, "ours_fp8": fp8, "ours_int4": int4, "scaled_mm": fp8, "ours_fp8_tma": fp8,
            "ours_int4_tma": int4}
    if not scaled_mm_reason:
        w_scale = fp8.scale[None, :]
        qw = fp8.qweight  # [K, N] with K contiguous: the column-major B _scaled_mm wants

        def scaled_mm(x):
            xq, xs = quantize_fp8_activations_ref(x)
            return torch._scaled_mm(xq, qw, scale_a=xs[:, None], scale_b=w_scale, out_dtype=x.dtype,
                                    use_fast_accum=True)
        methods["scaled_mm"] = scaled_mm
    return methods, refs


def reference(x: torch.Tensor, w: torch.Tensor, weight) -> torch.Tensor:
    """What a method must compute, fp32 [M, N]: x @ w for bf16 (weight None), else the torch
    reference of its quantized weight (make_methods' refs)."""
    return x.float() @ w if weight is None else quant_linear_ref(x, weight).float()


def bench_shape(name, K, N, tokens, dtype, dev, ceilings, args, budget, scaled_mm_reason):
    gen = torch.Generator(device=dev).manual_seed(SEED)
    # Independent weight sets, rotated so that even the smallest format (INT4) streams from
    # HBM: together they span twice the L2. Set 0 is the one whose answers are checked.
    n_sets = max(1, min(MAX_WEIGHT_SETS, -(-2 * L2_BYTES // (K * N // 2))))
    weights = [torch.randn(K, N, device=dev, generator=gen) * K ** -0.5 for _ in range(n_sets)]
    sets = [make_methods(w, dtype, scaled_mm_reason) for w in weights]
    w, (methods, refs) = weights[0], sets[0]
    rows = []
    for M in tokens:
        row = {"M": M, "flops": 2 * M * K * N, "errors": {}, "disagrees": {}}
        if scaled_mm_reason:
            row["errors"]["scaled_mm"] = scaled_mm_reason
        nxt = rotating(lambda: (torch.randn(M, K, device=dev, dtype=dtype, generator=gen),), M * K * dtype.itemsize
                       + K * N // 2)
        x0 = nxt()[0]
        for method, fn in methods.items():
            if budget.exhausted():
                row["errors"][method] = "skipped: time budget"
                continue
            bytes_moved = weight_bytes(refs[method], K, N, dtype.itemsize) + M * (K + N) * dtype.itemsize
            try:
                err = row[f"{method}_rel_err"] = rel_err(fn(x0), reference(x0, w, refs[method]))
                if method in OURS:
                    if wrong := wrong_answer(err):  # not timed
                        row["errors"][method] = wrong
                        continue
                elif flag := disagreement(err, "the reference"):  # still timed
                    row["disagrees"][method] = flag
                fns = itertools.cycle([s[0][method] for s in sets])
                t = time_us(lambda: next(fns)(nxt()[0]), warmup_ms=WARMUP_MS, rep_ms=REP_MS)
            except Exception as e:  # noqa: BLE001 - one failing method must not stop the run
                row["errors"][method] = f"{type(e).__name__}: {e}"
                print(f"    {method} failed at M={M}: {row['errors'][method]}", flush=True)
                if args.verbose:
                    traceback.print_exc()
                continue
            row[f"{method}_us"] = t
            # FP8 methods multiply in FP8: their compute floor is the measured FP8 peak
            rl = roofline(t, bytes_moved, row["flops"],
                          fp8_ceilings(ceilings) if method in ("scaled_mm", "ours_fp8", "ours_fp8_tma") else ceilings)
            row.update({f"{method}_{k}": v for k, v in rl.items()})
        if "ours_fp8_us" in row and not budget.exhausted():  # same inputs, timed the same way
            try:
                row["fp8_act_quant_us"] = time_us(lambda: quantize_fp8_activations(nxt()[0]), warmup_ms=WARMUP_MS,
                                                  rep_ms=REP_MS)
                row["fp8_act_quant_share"] = row["fp8_act_quant_us"] / row["ours_fp8_us"]
            except Exception as e:  # noqa: BLE001
                row["errors"]["fp8_act_quant"] = f"{type(e).__name__}: {e}"
        for method in METHODS[1:]:
            if f"{method}_us" in row and "bf16_us" in row:
                row[f"{method}_speedup_vs_bf16"] = row["bf16_us"] / row[f"{method}_us"]
        if "ours_fp8_us" in row and "scaled_mm_us" in row:
            row["ours_fp8_vs_scaled_mm"] = row["scaled_mm_us"] / row["ours_fp8_us"]
        for fmt in ("fp8", "int4"):  # the TMA option against the default, same run
            if f"ours_{fmt}_us" in row and f"ours_{fmt}_tma_us" in row:
                row[f"ours_{fmt}_tma_vs_default"] = row[f"ours_{fmt}_us"] / row[f"ours_{fmt}_tma_us"]
        rows.append(row)
        print(f"  M={M}: " + ", ".join(f"{m} {row[f'{m}_us']:.1f} us" for m in METHODS if f"{m}_us" in row), flush=True)
    return rows


COLUMNS = [
    ("M", "M", ""), ("bf16_us", "bf16 us", ".1f"), ("scaled_mm_us", "scaled_mm us", ".1f"),
    ("ours_fp8_us", "ours fp8 us", ".1f"), ("ours_int4_us", "ours int4 us", ".1f"),
    ("bf16_pct_roofline", "bf16 % roof", ".0f"), ("ours_fp8_pct_roofline", "fp8 % roof", ".0f"),
    ("ours_int4_pct_roofline", "int4 % roof", ".0f"), ("ours_fp8_tbps", "fp8 TB/s", ".2f"),
    ("ours_int4_tbps", "int4 TB/s", ".2f"), ("ours_fp8_speedup_vs_bf16", "fp8 x bf16", ".2f"),
    ("ours_int4_speedup_vs_bf16", "int4 x bf16", ".2f"), ("scaled_mm_speedup_vs_bf16", "scaled_mm x bf16", ".2f"),
    ("ours_fp8_vs_scaled_mm", "fp8 x scaled_mm", ".2f"), ("fp8_act_quant_us", "fp8 act-quant us", ".1f"),
    ("fp8_act_quant_share", "act-quant share", ".0%"), ("ours_fp8_tma_us", "fp8 tma us", ".1f"),
    ("ours_int4_tma_us", "int4 tma us", ".1f"), ("ours_fp8_tma_vs_default", "fp8 default / tma", ".2f"),
    ("ours_int4_tma_vs_default", "int4 default / tma", ".2f"), ("ours_fp8_rel_err", "fp8 err", ".1e"),
    ("ours_int4_rel_err", "int4 err", ".1e"), ("disagrees", "disagrees", ""),
]


def run_verdict(results: dict) -> dict:
    """common.verdict of the run: a method of ours failed, or a baseline disagrees."""
    ours, baselines = [], []
    for shape in results["shapes"]:
        for row in shape["rows"]:
            case = f"{shape['name']} M={row['M']}"
            ours += [(f"{case} {name}", e) for name, e in row["errors"].items() if name in OURS]
            baselines += [(f"{case} {name}", flag) for name, flag in row["disagrees"].items()]
    return verdict(ours, baselines)


def main(argv=None):
    """Returns the exit status (common.exit_status): 1 when ours failed or gave a wrong answer."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (CPU-runnable through the Triton interpreter)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES) + sorted(QUICK_SHAPES), help="K x N shapes to run")
    p.add_argument("--tokens", nargs="+", type=int, help="batch sizes M")
    p.add_argument("--budget-s", type=float, default=120.0, help="past this wall time, remaining cases print '-'")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing cases")
    args = p.parse_args(argv)
    budget = Budget(args.budget_s)

    dev = device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16  # the interpreter has no bf16 dot
    table = {**SHAPES, **QUICK_SHAPES}
    names = args.shapes or (list(QUICK_SHAPES) if args.quick else list(SHAPES))
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    ceilings = measure_ceilings(quick=args.quick)
    scaled_mm_reason = scaled_mm_available(dev)
    ceilings["fp8_matmul_tflops"] = fp8_peak_tflops(dev, args.quick)
    print(f"device {dev}, {dtype}; ceilings: copy {ceilings['hbm_tbps']:.2f} TB/s, matmul "
          f"{ceilings['matmul_tflops']:.1f} TFLOP/s ({ceilings['matmul_dtype']}), fp8 {ceilings['fp8_matmul_tflops']}",
          flush=True)
    if scaled_mm_reason:
        print(f"scaled_mm baseline off: {scaled_mm_reason}")
    results = {"ceilings": ceilings, "dtype": str(dtype), "group_size": GROUP, "quick": args.quick,
               "budget_s": args.budget_s, "shapes": []}
    path = None
    for name in names:
        K, N = table[name]
        print(f"\n## K x N = {name}, {str(dtype).replace('torch.', '')}", flush=True)
        rows = bench_shape(name, K, N, tokens, dtype, dev, ceilings, args, budget, scaled_mm_reason)
        results["shapes"].append({"name": name, "K": K, "N": N, "rows": rows})
        results["verdict"] = run_verdict(results)
        print()
        print(markdown_table(rows, COLUMNS))
        path = rewrite_results("quant_matmul", results, path)  # after every shape: a cut-short run keeps its shapes
        if dev == "cuda":
            torch.cuda.empty_cache()
    print(f"\nresults: {path}")
    return exit_status(run_verdict(results))


if __name__ == "__main__":
    sys.exit(main())
