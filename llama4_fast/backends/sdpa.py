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

Chunk-aligned chunked prefill (opt-in, off by default; `set_chunked_prefill(True)`): a chunked
layer's prefill from position 0 over S tokens with chunk C < S is B * ceil(S / C) independent
causal attentions of one chunk each (a query sees only keys of its own chunk, and every chunk
starts at a multiple of C). `chunked_prefill` runs them as one SDPA call over [B * (S // C),
H, C, D] (a view of q/k/v where the strides allow) plus one for a partial last chunk. It is
not measured on a GPU yet, so `supports` admits it only when switched on, for C >= MIN_TOKENS
and where torch picks cuDNN for the chunks; benchmarks/attention.py times it (`sdpa_chunks`)
beside our kernel so a GPU run can decide the default. The switch is a module global that
`supports` reads on every call, so a change takes effect at the next call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama4_fast import registry

PRIORITY = 20  # ahead of the triton backend, inside the narrow region `supports` admits
MIN_TOKENS = 8192
# Chunk-aligned chunked prefill through SDPA (set_chunked_prefill): off until a GPU run measures it.
_chunked_prefill = False


def set_chunked_prefill(enabled: bool) -> bool:
    """Switch the hand-over of chunk-aligned chunked prefill to SDPA on or off (default off);
    returns the previous setting, so a caller can restore it:

        previous = sdpa.set_chunked_prefill(True)
        try:
            ...
        finally:
            sdpa.set_chunked_prefill(previous)
    """
    global _chunked_prefill
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _chunked_prefill = _chunked_prefill, enabled
    return previous


def plain_causal_prefill(q, k, v, *, chunk_size=None, scale=None, kv_start=0, kv_len=None) -> bool:
    """True when the call is ordinary causal attention over the same tokens from position 0, of
    at least MIN_TOKENS tokens: nothing SDPA's is_causal cannot express without a mask."""
    Sq, Skv = q.shape[2], k.shape[2]
    return (kv_len is None and isinstance(kv_start, int) and kv_start == 0 and Sq == Skv >= MIN_TOKENS
            and (chunk_size is None or chunk_size >= Skv))


def chunk_aligned_prefill(q, k, v, *, chunk_size=None, scale=None, kv_start=0, kv_len=None) -> bool:
    """True when the call is a chunked layer's prefill from position 0 over more than one chunk
    (kv_start == 0, no kv_len, Sq == Skv > chunk_size >= MIN_TOKENS): independent causal
    attentions over whole chunks, which `chunked_prefill` computes with is_causal and no mask."""
    Sq, Skv = q.shape[2], k.shape[2]
    return (kv_len is None and isinstance(kv_start, int) and kv_start == 0 and Sq == Skv
            and chunk_size is not None and MIN_TOKENS <= chunk_size < Skv)


def _chunks_are_a_view(x: torch.Tensor, chunk_size: int) -> bool:
    """Whether `_whole_chunks(x)` is a view: sequence b's chunks must follow each other in
    storage the way sequences do (batch stride == S // C chunk strides), as in the [B, S, H, D]
    storage transposed to [B, H, S, D] that the model passes when C divides S; or one sequence
    or one chunk, whatever the strides."""
    B, _, S, _ = x.shape
    n = S // chunk_size
    return B == 1 or n <= 1 or x.stride(0) == n * chunk_size * x.stride(2)


def _whole_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The whole chunks of x [B, H, S, D] as [B * (S // C), H, C, D] (sequence b's chunk j at
    row b * (S // C) + j): a view where `_chunks_are_a_view`, else a contiguous copy."""
    B, H, S, D = x.shape
    n = S // chunk_size
    chunks = x[:, :, :n * chunk_size].unflatten(2, (n, chunk_size)).transpose(1, 2)  # [B, n, H, C, D]
    return chunks.reshape(B * n, H, chunk_size, D)


def chunked_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                    scale: float | None = None) -> torch.Tensor:
    """Chunked causal prefill from position 0 as SDPA calls over independent chunks.

    q [B, Hq, S, D]; k, v [B, Hkv, S, D] (Hq a multiple of Hkv), one floating dtype, any
    strides; 0 < chunk_size. Equals `ops.attention(q, k, v, chunk_size=chunk_size, scale=scale)`
    (kv_start 0, Sq == Skv): a query at position p sees keys s <= p with s // C == p // C.
    The S // C whole chunks of every sequence run as one causal GQA SDPA call over
    [B * (S // C), H, C, D], a view of q/k/v where the strides allow (`_chunks_are_a_view`; else
    one copy of each input that does not). A partial last chunk (S % C tokens, starting at a chunk
    boundary, so causal within itself) is a second SDPA call on the tail slices, whatever its
    length: its result is exact, and MIN_TOKENS is a speed rule `supports` applies to C.

    Returns [B, Hq, S, D] in q's dtype. Whole chunks only: SDPA's output, a view of it where
    its layout allows (chunks of a sequence adjacent in storage, as in [B, S, Hq, D] storage),
    else one copy. With a tail: a new tensor laid out like q (`torch.empty_like`, as the triton
    backend returns), both calls' results copied in.
    """
    B, Hq, S, D = q.shape
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if k.shape[2] != S:
        raise ValueError(f"k must hold the same S={S} positions as q (a prefill from position 0), got {k.shape[2]}")
    n = S // chunk_size
    main = n * chunk_size

    def attend(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale, enable_gqa=True)

    whole = None
    if n:
        chunks = attend(*(_whole_chunks(x, chunk_size) for x in (q, k, v)))  # [B * n, Hq, C, D]
        whole = chunks.unflatten(0, (B, n)).transpose(1, 2)  # [B, Hq, n, C, D], a view
        if main == S:
            return whole.flatten(2, 3)  # a view where SDPA's output layout allows, else a copy
    tail = attend(q[:, :, main:], k[:, :, main:], v[:, :, main:])
    if whole is None:
        return tail
    out = torch.empty_like(q)
    out[:, :, :main].unflatten(2, (n, chunk_size)).copy_(whole)
    out[:, :, main:].copy_(tail)
    return out


def torch_choice(q, k, v, scale=None) -> str:
    """The name of the SDPA backend torch would run for causal GQA attention on these inputs
    (under any `sdpa_kernel` restriction in force), e.g. "CUDNN_ATTENTION"; "unknown" on a
    torch without the private `_fused_sdp_choice` query."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale, enable_gqa=True)).name
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return "unknown"


def chunks_choice(q, k, v, chunk_size: int, scale=None) -> str:
    """torch_choice for the whole-chunk SDPA call of `chunked_prefill`, without its copies:
    the choice reads shapes, strides, dtype and device only, so an input whose chunks are not
    a view stands in as an uninitialised contiguous tensor (what `_whole_chunks` would copy to)."""
    def like_chunks(x):
        if _chunks_are_a_view(x, chunk_size):
            return _whole_chunks(x, chunk_size)
        B, H, S, D = x.shape
        return x.new_empty(B * (S // chunk_size), H, chunk_size, D)

    return torch_choice(like_chunks(q), like_chunks(k), like_chunks(v), scale)


def _fast_inputs(q) -> bool:
    """CUDA tensors in a 16-bit dtype: the only inputs the measurement covers."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def supports(q, k, v, **kwargs) -> bool:
    if not _fast_inputs(q):
        return False
    if plain_causal_prefill(q, k, v, **kwargs):
        return torch_choice(q, k, v, kwargs.get("scale")) == "CUDNN_ATTENTION"
    if _chunked_prefill and chunk_aligned_prefill(q, k, v, **kwargs):
        return chunks_choice(q, k, v, kwargs["chunk_size"], kwargs.get("scale")) == "CUDNN_ATTENTION"
    return False


def attention(q, k, v, *, chunk_size=None, scale=None, kv_start=0, kv_len=None):
    if chunk_size is not None and chunk_size < k.shape[2]:  # supports admitted a chunk-aligned prefill
        return chunked_prefill(q, k, v, chunk_size, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


registry.register("attention", "sdpa", attention, priority=PRIORITY, supports=supports)
