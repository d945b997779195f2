"""pytest-benchmark cases for chunked_attention (`pytest benchmarks --benchmark-only`).

A handful of benchmarks/attention.py's cases, so a change can be compared against a saved
baseline (`--benchmark-save` / `--benchmark-compare`). On a GPU: Llama 4 heads (40 q / 8 kv,
head dim 128, bf16) at 8k prefill and 32k / 8k decode, each call synchronised so the wall
time is the kernel's. On CPU: the same calls at toy sizes under the Triton interpreter.
The script stays the way to get the full tables, rooflines and baselines. Each case also
checks the timed call's answer against the fp32 definition (bench.error_vs_math, on the rows
the script checks: the first and last rows, rows between, and around every chunk start).
The chunked prefill also runs as the opt-in SDPA hand-over (sdpa_chunks: SDPA over the whole
chunks, llama4_fast/backends/sdpa.py), at a length past one chunk; and the script's prefill
rows are checked to carry that entry and ours' TMA variants.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend

import attention as bench  # sets TRITON_INTERPRET on a machine without a GPU, before triton loads
from common import WRONG_REL_ERR

HAS_CUDA = torch.cuda.is_available()

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16
CFG = bench.FULL if HAS_CUDA else bench.QUICK_CPU
HQ, HKV = CFG["heads"]
D, CHUNK = CFG["head_dim"], CFG["chunk"]
PREFILL_S = 8192 if HAS_CUDA else 96
HANDOVER_S = 2 * CHUNK + CHUNK // 2  # two whole chunks and a partial one: the sdpa_chunks case
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


def test_prefill_sdpa_chunks(benchmark, timed):
    q = torch.randn(1, HQ, HANDOVER_S, D, dtype=DTYPE, device=DEVICE)
    k = torch.randn(1, HKV, HANDOVER_S, D, dtype=DTYPE, device=DEVICE)
    v = torch.randn(1, HKV, HANDOVER_S, D, dtype=DTYPE, device=DEVICE)
    tflop = 4 * D * bench.visible_pairs(HANDOVER_S, CHUNK) * HQ / 1e12
    benchmark.extra_info.update(S=HANDOVER_S, chunk=CHUNK, tflop=tflop,
                                sdpa_backend=bench.sdpa_backend.chunks_choice(q, k, v, CHUNK))
    out = timed(lambda: bench.sdpa_backend.chunked_prefill(q, k, v, CHUNK))
    assert bench.error_vs_math(out, q, k, v, CHUNK) <= WRONG_REL_ERR


def test_prefill_rows_carry_the_chunk_handover():
    """bench_prefill at toy sizes: every row times ours' TMA variants (checked against ours, the
    layout lets TMA run); each chunked row longer than a chunk has a timed, checked
    sdpa_chunks entry saying which SDPA kernel ran and what ops.attention takes with the switch
    on (the triton backend: the toy chunk is below sdpa.MIN_TOKENS); the global rows have
    none, a sequence of one chunk is skipped; the switch is off again afterwards."""
    cfg = dict(prefill=[24, 40], heads=(5, 1), head_dim=16, chunk=16)
    ceilings = {"hbm_tbps": 1.0, "matmul_tflops": 1.0, "matmul_dtype": "float32"}
    rows = bench.bench_prefill(cfg, DTYPE, DEVICE, ceilings, bench.common.Budget(120))
    assert [(r["S"], r["layer"]) for r in rows] == [(24, "chunked C=16"), (24, "global"),
                                                    (40, "chunked C=16"), (40, "global")]
    for row in rows:
        for name in bench.FORWARD_VARIANTS:  # ours' unmeasured variants, checked against ours
            variant = row["baselines"][name]
            assert variant["us"] > 0 and variant["rel_err_vs_ours"] <= WRONG_REL_ERR and variant["tma"] is True
        entry = row["baselines"].get("sdpa_chunks")
        if row["layer"] == "global":
            assert entry is None
            continue
        assert entry["us"] > 0 and entry["rel_err_vs_ours"] <= WRONG_REL_ERR and "disagrees" not in entry
        assert entry["backend"] in SDPBackend.__members__  # a name torch gave, not "unknown"
        assert entry["ops_with_switch_on"] == "triton"  # C=16 < sdpa.MIN_TOKENS (and CPU tensors stay off SDPA)
        assert entry["tflops"] > 0 and entry["ours_speedup"] > 0
    probe = (torch.empty(1, 5, 16, 16), torch.empty(1, 1, 16, 16), torch.empty(1, 1, 16, 16))
    one_chunk = bench.chunk_handover(probe, None, 16, None, None, None, "cpu")
    assert one_chunk["error"].startswith("skipped: one chunk")
    assert bench.sdpa_backend._chunked_prefill is False
