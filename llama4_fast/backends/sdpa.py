"""The `sdpa` backend of `attention`: cuDNN's attention, through torch's SDPA, for the one case
where a fused library kernel was measured faster than ours: a plain causal prefill.

Measured on an H100 with torch 2.11 (benchmarks/results/attention-nvidia-h100-80gb-hbm3-
20261126-1734.json; 40 query / 8 KV heads, head dim 128, bf16, batch 1), global causal prefill:

    tokens               8k        32k       128k
    torch SDPA           1223 us   17762 us  315193 us   (562, 619, 558 TFLOP/s)
    our Triton kernel    1508 us   23961 us  363396 us   (456, 459, 484 TFLOP/s)

The benchmark allowed SDPA its flash, cuDNN and efficient backends and did not record which one
ran; a rate of 619 TFLOP/s, 88% of the measured bf16 matmul peak, points to cuDNN's. So this
backend only takes a call where torch itself would pick cuDNN (`torch._fused_sdp_choice`), and
everywhere else, or with another torch, our kernel runs. benchmarks/attention.py records the
backend torch picks, so the next GPU run checks this.

The case: queries and keys the same tokens from position 0 (kv_start == 0, no kv_len, Sq ==
Skv), a global layer or a chunked one whose chunk holds the whole sequence, at least
MIN_TOKENS tokens (the shortest length measured). Chunked prefill past the first chunk,
continued prefill, left padding, static caches and decode stay on our kernel: SDPA would need a
dense mask for them, and the chunk-skipping kernel beats that (13.7x at 32k in the same run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama4_fast import registry

PRIORITY = 20  # ahead of the triton backend, inside the narrow region `supports` admits
MIN_TOKENS = 8192


def plain_causal_prefill(q, k, v, *, chunk_size=None, scale=None, kv_start=0, kv_len=None) -> bool:
    """True when the call is ordinary causal attention over the same tokens from position 0, of
    at least MIN_TOKENS tokens: nothing SDPA's is_causal cannot express without a mask."""
    Sq, Skv = q.shape[2], k.shape[2]
    return (kv_len is None and isinstance(kv_start, int) and kv_start == 0 and Sq == Skv >= MIN_TOKENS
            and (chunk_size is None or chunk_size >= Skv))


def torch_choice(q, k, v, scale=None) -> str:
    """The name of the SDPA backend torch would run for causal GQA attention on these inputs
    (under any `sdpa_kernel` restriction in force), e.g. "CUDNN_ATTENTION"; "unknown" on a
    torch without the private `_fused_sdp_choice` query."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale, enable_gqa=True)).name
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return "unknown"


def supports(q, k, v, **kwargs) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and plain_causal_prefill(q, k, v, **kwargs)
            and torch_choice(q, k, v, kwargs.get("scale")) == "CUDNN_ATTENTION")


def attention(q, k, v, *, chunk_size=None, scale=None, kv_start=0, kv_len=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


registry.register("attention", "sdpa", attention, priority=PRIORITY, supports=supports)
