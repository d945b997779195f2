"""pytest-benchmark cases for chunked_attention (`pytest benchmarks --benchmark-only`).

A handful of benchmarks/attention.py's cases, so a change can be compared against a saved
baseline (`--benchmark-save` / `--benchmark-compare`). On a GPU: Llama 4 heads (40 q / 8 kv,
head dim 128, bf16) at 8k prefill and 32k / 8k decode, each call synchronised so the wall
time is the kernel's. On CPU: the same calls at toy sizes under the Triton interpreter.
The script stays the way to get the full tables, rooflines and baselines. Each case also
checks the timed call's answer against the fp32 definition (bench.error_vs_math, on the rows
the script checks: the first and last rows, rows between, and around every chunk start).
"""

import pytest
import torch

import attention as bench  # sets TRITON_INTERPRET on a machine without a GPU, before triton loads
from common import WRONG_REL_ERR

HAS_CUDA = torch.cuda.is_available()

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16
CFG = bench.FULL if HAS_CUDA else bench.QUICK_CPU
HQ, HKV = CFG["heads"]
D, CHUNK = CFG["head_dim"], CFG["chunk"]
PREFILL_S = 8192 if HAS_CUDA else 96
# (context, batch): one long sequence, and a batch at a shorter context.
DECODE = [(32768, 1), (8192, 16)] if HAS_CUDA else [(1024, 1), (160, 2)]


@pytest.mark.parametrize("chunk", [CHUNK, None], ids=["chunked", "global"])
def test_prefill(benchmark, timed, chunk):
    q = torch.randn(1, HQ, PREFILL_S, D, dtype=DTYPE, device=DEVICE)
    k = torch.randn(1, HKV, PREFILL_S, D, dtype=DTYPE, device=DEVICE)
    v = torch.randn(1, HKV, PREFILL_S, D, dtype=DTYPE, device=DEVICE)
    tflop = 4 * D * bench.visible_pairs(PREFILL_S, chunk) * HQ / 1e12
    benchmark.extra_info.update(S=PREFILL_S, chunk=chunk, tflop=tflop)
    out = timed(lambda: bench.chunked_attention(q, k, v, chunk_size=chunk))
    assert bench.error_vs_math(out, q, k, v, chunk) <= WRONG_REL_ERR


@pytest.mark.parametrize("context,batch", DECODE, ids=[f"ctx{c}-b{b}" for c, b in DECODE])
@pytest.mark.parametrize("chunk", [CHUNK, None], ids=["chunked", "global"])
def test_decode(benchmark, timed, context, batch, chunk):
    q = torch.randn(batch, HQ, 1, D, dtype=DTYPE, device=DEVICE)
    k = torch.randn(batch, HKV, context, D, dtype=DTYPE, device=DEVICE)
    v = torch.randn(batch, HKV, context, D, dtype=DTYPE, device=DEVICE)
    benchmark.extra_info.update(context=context, batch=batch, chunk=chunk)
    out = timed(lambda: bench.chunked_attention(q, k, v, chunk_size=chunk))
    assert bench.error_vs_math(out, q, k, v, chunk) <= WRONG_REL_ERR
