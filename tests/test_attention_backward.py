"""Backward of the Triton chunked flash attention (kernels/attention.py) against torch.autograd.

chunked_attention_backward's dq, dk, dv and the forward's ``lse`` output are compared with the
gradients and the log-sum-exp of a dense float64 reference: a masked softmax whose mask comes
from the position rule (torch_ref.key_positions_visible), K/V repeated per query head. On CPU
the kernels run under the Triton interpreter: fp32 on 16 x 16 tiles, fp16 on the 16-bit tile
table (or on 16 x 16 tiles to get many of them), so the shapes stay tiny.
"""

import math

import pytest
import torch

from helpers import TOL, assert_close, poisoned, rel_err
from llama4_fast.backends.torch_ref import key_positions_visible
from llama4_fast.kernels import attention as attn
from llama4_fast.kernels.attention import chunked_attention, chunked_attention_backward

LOG2E = math.log2(math.e)
# Gradient bounds, relative norm against float64 (helpers.TOL's rule: measured maximum x 5-10).
# fp16 rounds P and dS to fp16 before their dots (and q, k, v, dO, O are fp16): measured at most
# 4.4e-4 over this file's cases (three seeds each).
GRAD_TOL = {torch.float32: TOL[torch.float32], torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Every torch.empty_like (the gradients, the forward's out) starts as NaN, so an element
    a kernel fails to write fails the test."""
    full_like = torch.full_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: full_like(t, float("nan"), **kw))


@pytest.fixture
def small_tiles(monkeypatch):
    """16 x 16 tiles for the 16-bit path too: many tiles and chunk boundaries inside them."""
    cfg = attn.LaunchConfig(16, 16, 4, 2)
    monkeypatch.setattr(attn, "_bwd_launch_config", lambda *a: (cfg, cfg))


def visible(B, Sq, Skv, chunk_size, kv_start):
    """bool [B, Sq, Skv]: key j of sequence b at position start_b + j, query i at start_b + Skv - Sq + i."""
    starts = kv_start.cpu().long() if isinstance(kv_start, torch.Tensor) else torch.full((B,), kv_start)
    key_pos = starts[:, None] + torch.arange(Skv)[None, :]
    return key_positions_visible(key_pos[:, Skv - Sq:], key_pos, chunk_size)


def reference(q, k, v, chunk_size, kv_start, scale):
    """float64 (out, natural lse, mask) with autograd; rows that see no key: out 0, lse -inf."""
    B, Hq, Sq, D = q.shape
    Skv, group = k.shape[2], Hq // k.shape[1]
    mask = visible(B, Sq, Skv, chunk_size, kv_start)[:, None]
    scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.where(mask.any(-1, keepdim=True), torch.softmax(scores, -1), 0.0)
    return probs @ v.repeat_interleave(group, 1), torch.logsumexp(scores, -1).detach(), mask[:, 0]


def make(B, Hq, Hkv, Sq, Skv, D, dtype):
    return (torch.randn(B, Hq, Sq, D, dtype=dtype), torch.randn(B, Hkv, Skv, D, dtype=dtype),
            torch.randn(B, Hkv, Skv, D, dtype=dtype))


def check(q, k, v, *, chunk_size=None, kv_start=0, scale=None, do=None):
    """Forward into a NaN-poisoned lse, backward, and compare out, lse, dq, dk, dv with the
    reference; rows that see no key need lse = -inf and dq = 0 exactly, keys no query sees
    dk = dv = 0 exactly. Returns the relative errors."""
    B, Hq, Sq, _ = q.shape
    lse = poisoned((B, Hq, Sq), torch.float32, q.device)
    out = chunked_attention(q, k, v, chunk_size=chunk_size, kv_start=kv_start, scale=scale, lse=lse)
    do = torch.randn_like(q) if do is None else do
    dq, dk, dv = chunked_attention_backward(do, q, k, v, out, lse, chunk_size=chunk_size, kv_start=kv_start,
                                            scale=scale)
    assert dq.dtype == q.dtype and dk.dtype == k.dtype and dv.dtype == v.dtype
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out64, lse64, mask = reference(q64, k64, v64, chunk_size, kv_start, scale)
    out64.backward(do.double())
    assert_close(out, out64, dtype=q.dtype)
    seen = mask.any(-1)[:, None].expand(B, Hq, Sq)  # [B, Hq, Sq] rows that see a key
    assert_close(lse[seen], lse64[seen] * LOG2E, tol=TOL[torch.float32])  # base 2
    assert (lse[~seen] == float("-inf")).all(), "rows that see no key have lse = -inf"
    errs = {}
    for name, got, ref in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        errs[name] = rel_err(got, ref)
        assert errs[name] < GRAD_TOL[q.dtype], f"{name}: relative error {errs[name]:.3g}"
    assert (dq[~seen] == 0).all(), "queries that see no key get dq = 0"
    unseen = ~mask.any(1)[:, None].expand(k.shape[:3])  # [B, Hkv, Skv] keys no query sees
    assert (dk[unseen] == 0).all() and (dv[unseen] == 0).all(), "keys no query sees get dk = dv = 0"
    return errs


# (B, Hq, Hkv, Sq, Skv, D, chunk_size, kv_start)
CASES = [
    pytest.param(1, 2, 2, 48, 48, 16, None, 0, id="causal"),
    pytest.param(1, 2, 1, 64, 64, 16, 24, 0, id="chunk24-inside-blocks-g2"),
    pytest.param(1, 4, 2, 20, 57, 16, 16, 5, id="sq-lt-skv-chunk16-start5"),
    pytest.param(2, 5, 1, 37, 37, 24, 24, 0, id="b2-g5-s37-d24"),
    pytest.param(1, 2, 2, 37, 45, 40, None, 3, id="g1-d40-causal-start3"),
]


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Skv,D,chunk,start", CASES)
def test_grads_fp32(B, Hq, Hkv, Sq, Skv, D, chunk, start):
    check(*make(B, Hq, Hkv, Sq, Skv, D, torch.float32), chunk_size=chunk, kv_start=start)


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Skv,D,chunk,start", CASES[1:4])
def test_grads_fp16_small_tiles(small_tiles, B, Hq, Hkv, Sq, Skv, D, chunk, start):
    check(*make(B, Hq, Hkv, Sq, Skv, D, torch.float16), chunk_size=chunk, kv_start=start)


@pytest.mark.parametrize("chunk", [None, 100])
def test_grads_fp16_default_tiles(chunk):
    """The 16-bit table's 32 x 128 (dK/dV) and 128 x 32 (dQ) tiles, chunks across them."""
    check(*make(1, 4, 2, 170, 300, 64, torch.float16), chunk_size=chunk, kv_start=torch.tensor([-30]))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("chunk", [None, 24])
def test_left_padding(index_dtype, chunk):
    """kv_start tensor with a negative start: padding queries get dq = 0 and lse = -inf,
    padding keys dk = dv = 0, nothing NaN (check asserts all of it)."""
    q, k, v = make(2, 4, 2, 50, 50, 16, torch.float32)
    starts = torch.tensor([-21, 3], dtype=index_dtype)
    check(q, k, v, chunk_size=chunk, kv_start=starts)
    check(q[:, :, -30:], k, v, chunk_size=chunk, kv_start=torch.tensor([-40, 0], dtype=index_dtype))


def test_scale_and_strided_inputs():
    """[B, S, H, D] storage viewed as [B, H, S, D], an expanded (stride-0) dO as out.sum()
    hands it, an explicit scale; the gradients keep the inputs' layout."""
    B, Hq, Hkv, S, D = 1, 4, 2, 40, 16
    q, k, v = (torch.randn(B, S, h, D).transpose(1, 2) for h in (Hq, Hkv, Hkv))
    do = torch.ones(1, 1, 1, 1).expand(B, Hq, S, D)
    check(q, k, v, chunk_size=16, kv_start=2, scale=0.3, do=do)
    lse = torch.empty(B, Hq, S)
    out = chunked_attention(q, k, v, lse=lse)
    dq, dk, dv = chunked_attention_backward(do, q, k, v, out, lse)
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.stride() == v.stride()


def test_lse_decode_layout_and_no_splits(monkeypatch):
    """lse from the decode layout (GQA group packed into the rows) and with a split plan: a
    forward asked for lse runs unsplit (check compares lse with the reference)."""
    monkeypatch.setattr(attn, "_num_splits", lambda *a: 4)
    q, k, v = make(2, 10, 2, 3, 90, 16, torch.float32)
    check(q, k, v, chunk_size=32, kv_start=torch.tensor([-88, 7]))
    check(q, k, v)


def test_empty_queries():
    q, k, v = make(1, 2, 1, 0, 5, 16, torch.float32)
    lse = torch.empty(1, 2, 0)
    out = chunked_attention(q, k, v, lse=lse)
    dq, dk, dv = chunked_attention_backward(out, q, k, v, out, lse)
    assert dq.shape == q.shape and (dk == 0).all() and (dv == 0).all()


def test_lse_argument_errors():
    q, k, v = make(1, 4, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"lse must be \[B, Hq, Sq\]"):
        chunked_attention(q, k, v, lse=torch.empty(1, 4, 7))
    with pytest.raises(TypeError, match="lse must have dtype in \\(float32\\)"):
        chunked_attention(q, k, v, lse=torch.empty(1, 4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="lse must be contiguous"):
        chunked_attention(q, k, v, lse=torch.empty(1, 8, 4).transpose(1, 2))
    with pytest.raises(TypeError, match="lse must be a torch.Tensor"):
        chunked_attention(q, k, v, lse=[0.0])
    with pytest.raises(ValueError, match="lse overlaps q"):
        chunked_attention(q, k, v, lse=q.view(-1)[:32].view(1, 4, 8))
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="out overlaps lse"):
        chunked_attention(q, k, v, out=out, lse=out.view(-1)[:32].view(1, 4, 8))


def test_backward_argument_errors():
    q, k, v = make(1, 4, 2, 8, 8, 16, torch.float32)
    lse = torch.empty(1, 4, 8)
    out = chunked_attention(q, k, v, lse=lse)
    bwd = chunked_attention_backward
    with pytest.raises(ValueError, match=r"lse must be \[B, Hq, Sq\]"):
        bwd(out, q, k, v, out, lse[:, :2])
    with pytest.raises(TypeError, match="lse must have dtype"):
        bwd(out, q, k, v, out, lse.double())
    with pytest.raises(ValueError, match="do must have q's shape"):
        bwd(out[:, :, :4], q, k, v, out, lse)
    with pytest.raises(TypeError, match="out must have q's dtype"):
        bwd(out, q, k, v, out.half(), lse)
    with pytest.raises(TypeError, match="do must be a torch.Tensor"):
        bwd(None, q, k, v, out, lse)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        bwd(out[:, :3], q[:, :3], k, v, out[:, :3], lse[:, :3])
    with pytest.raises(TypeError, match="kv_len"):
        bwd(out, q, k, v, out, lse, kv_len=torch.tensor([8]))
