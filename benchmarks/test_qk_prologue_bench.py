"""pytest-benchmark cases for the qk prologue (`pytest benchmarks --benchmark-only`).

A few of benchmarks/qk_prologue.py's cases, today's torch chain against the fused kernel, so a
change can be compared against a saved baseline. GPU: Llama 4 heads in bf16 at 8k prefill and
batch-16 decode, each call synchronised; CPU: the same calls at toy sizes under the Triton
interpreter. The script stays the way to get the tables with attention side by side. Each case
also checks the timed call's (q, k) against the script's reference, the torch chain in fp32.
"""

import pytest
import torch

import qk_prologue as bench  # sets TRITON_INTERPRET on a machine without a GPU, before triton loads
from common import WRONG_REL_ERR, rel_err

HAS_CUDA = torch.cuda.is_available()

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16
CFG = bench.FULL if HAS_CUDA else bench.QUICK_CPU
HQ, HKV = CFG["heads"]
D = CFG["head_dim"]
# (batch, new tokens): a prefill and a batched decode step.
CASES = [(1, 8192), (16, 1)] if HAS_CUDA else [(1, 40), (2, 1)]


@pytest.mark.parametrize("impl", ["torch_chain", "fused"])
@pytest.mark.parametrize("layer", bench.LAYERS)
@pytest.mark.parametrize("batch,seq", CASES, ids=[f"B{b}-S{s}" for b, s in CASES])
def test_qk_prologue(benchmark, timed, batch, seq, layer, impl):
    qk = torch.randn(batch, seq, (HQ + HKV) * D, dtype=DTYPE, device=DEVICE)
    q, k = qk[..., :HQ * D].unflatten(-1, (HQ, D)), qk[..., HQ * D:].unflatten(-1, (HKV, D))
    positions = torch.arange(CFG["context"] - seq, CFG["context"], device=DEVICE) if seq == 1 else \
        torch.arange(seq, device=DEVICE)
    cos, sin = bench.rope_tables(positions, D)
    fn = getattr(bench, impl)
    benchmark.extra_info.update(batch=batch, seq=seq, layer=layer)
    out = timed(lambda: fn(layer, q, k, cos, sin, positions))
    ref = bench.torch_chain(layer, q.float(), k.float(), cos, sin, positions)
    assert max(rel_err(a, b) for a, b in zip(out, ref)) <= WRONG_REL_ERR
