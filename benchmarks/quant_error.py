"""Quantization error of each weight scheme on random Gaussian weights (a property of the scheme,
not of the GPU: runs on CPU, in float64 where it measures).

For W [K, N] ~ N(0, 1/K) and activations x [M, K] ~ N(0, 1), prints the relative norm errors
  weight   ||dequant(quant(W)) - W|| / ||W||
  output   ||x @ dequant(quant(W)) - x @ W|| / ||x @ W||            (weight error alone)
  served   ||act(x) @ dequant(quant(W)) - x @ W|| / ||x @ W||       (FP8: x quantized per token
           or per 1x128 group as the kernels do; INT4 is weight-only, so served = output)
as a markdown table; also a run with heavy-tailed (Student-t, 3 dof) weights, where per-tensor
scales suffer.

    python benchmarks/quant_error.py                 # K = N = 4096, M = 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402

from llama4_fast.quant import effective_activations  # noqa: E402
from llama4_fast.quant import quantize_weight  # noqa: E402

SCHEMES = [("fp8", 128), ("fp8_tensor", 128), ("fp8_block", 128), ("int4", 128), ("int4", 64), ("int4", 32),
           ("int4_asym", 128)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def errors(w: torch.Tensor, x: torch.Tensor) -> list[dict]:
    ref = x.double() @ w.double()
    rows = []
    for scheme, group in SCHEMES:
        q = quantize_weight(w, scheme, group)
        wd = q.dequantize(torch.float64)
        label = scheme if scheme.startswith("fp8") else f"{scheme} g{group}"
        bits = 8 if scheme.startswith("fp8") else 4 + (16 + (8 if scheme == "int4_asym" else 0)) / group
        rows.append({"scheme": label, "bits": bits, "weight": rel(wd, w.double()), "output": rel(x.double() @ wd, ref),
                     "served": rel(effective_activations(x, q).double() @ wd, ref)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--m", type=int, default=256)
    args = p.parse_args(argv)
    torch.manual_seed(0)  # the Student-t sampler draws from the global generator
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.m, args.k, generator=gen)
    cols = [("scheme", "scheme", ""), ("bits", "bits/weight", ".3f"), ("weight", "weight err", ".4f"),
            ("output", "output err (weight only)", ".4f"), ("served", "output err (as served)", ".4f")]
    for name, w in (("Gaussian", torch.randn(args.k, args.n, generator=gen) * args.k ** -0.5),
                    ("Student-t (3 dof)", torch.distributions.StudentT(3.0).sample((args.k, args.n)) * args.k ** -0.5)):
        print(f"\n{name} weights W [{args.k}, {args.n}], x [{args.m}, {args.k}] ~ N(0, 1); relative norm errors:\n")
        print(markdown_table(errors(w, x), cols))


if __name__ == "__main__":
    main()
