"""The `sdpa` backend of `attention` takes only the plain causal prefill it was measured faster
on, and only where torch would run cuDNN's attention; everything else keeps our kernel."""

import pytest
import torch

from llama4_fast import ops, registry
from llama4_fast.backends import sdpa

from helpers import assert_close
from reference64 import attention64


def _meta(B=1, Hq=8, Hkv=2, Sq=8192, Skv=8192, D=128):
    return (torch.empty(B, Hq, Sq, D, device="meta"), torch.empty(B, Hkv, Skv, D, device="meta"),
            torch.empty(B, Hkv, Skv, D, device="meta"))


@pytest.mark.parametrize("case, kwargs, expected", [
    ("global 8k", dict(), True),
    ("global 32k", dict(shape=dict(Sq=32768, Skv=32768)), True),
    ("chunk holds the sequence", dict(chunk_size=8192), True),
    ("chunk smaller than the sequence", dict(chunk_size=4096), False),
    ("shorter than measured", dict(shape=dict(Sq=4096, Skv=4096)), False),
    ("continued prefill", dict(shape=dict(Sq=8192, Skv=9000)), False),
    ("decode", dict(shape=dict(Sq=1, Skv=8192)), False),
    ("absolute positions", dict(kv_start=100), False),
    ("left padding", dict(kv_start=torch.zeros(1, dtype=torch.int32)), False),
    ("static cache", dict(kv_len=torch.full((1,), 8192)), False),
])
def test_plain_causal_prefill_region(case, kwargs, expected):
    q, k, v = _meta(**kwargs.pop("shape", {}))
    assert sdpa.plain_causal_prefill(q, k, v, **kwargs) is expected, case


def test_cpu_tensors_never_take_sdpa():
    q, k, v = (torch.randn(1, 1, 8192, 16) for _ in range(3))
    assert not sdpa.supports(q, k, v)
    assert registry.select("attention", q, k, v).name != "sdpa"
    with pytest.raises(RuntimeError, match="backend 'sdpa' of op 'attention' was chosen explicitly"):
        with registry.use(attention="sdpa"):
            ops.attention(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [None, 8192])
def test_gpu_sdpa_matches_reference_where_selected(chunk):
    q, k, v = (torch.randn(1, h, 8192, 128, dtype=torch.bfloat16, device="cuda") for h in (8, 2, 2))
    if not sdpa.supports(q, k, v, chunk_size=chunk):
        pytest.skip("torch would not run cuDNN attention here; the triton backend keeps this case")
    with registry.record() as calls:
        out = ops.attention(q, k, v, chunk_size=chunk)
    assert calls == {("attention", "sdpa"): 1}
    rows = slice(8192 - 300, 8192)  # the last rows see the most keys
    assert_close(out[:, :, rows], attention64(q[:, :, rows], k, v, chunk_size=chunk), dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Chunk-aligned chunked prefill (opt-in: sdpa.set_chunked_prefill)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _switch_is_restored():
    """No test leaves the chunked-prefill switch on (the default is off)."""
    assert sdpa._chunked_prefill is False
    yield
    assert sdpa._chunked_prefill is False, "a test leaked sdpa.set_chunked_prefill(True)"


@pytest.fixture
def chunked_on():
    previous = sdpa.set_chunked_prefill(True)
    try:
        yield
    finally:
        sdpa.set_chunked_prefill(previous)


def _qkv(B, Hq, Hkv, S, D, dtype, layout, device="cpu"):
    """Random q [B, Hq, S, D], k, v [B, Hkv, S, D]: contiguous ("bhsd") or the model's
    [B, S, H, D] storage transposed to [B, H, S, D] ("bshd")."""
    def one(h):
        if layout == "bshd":
            return torch.randn(B, S, h, D, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(B, h, S, D, dtype=dtype, device=device)
    return one(Hq), one(Hkv), one(Hkv)


def test_switch_is_off_by_default_and_returns_the_previous_setting():
    assert sdpa.set_chunked_prefill(True) is False
    assert sdpa.set_chunked_prefill(False) is True
    with pytest.raises(TypeError, match="enabled must be a bool"):
        sdpa.set_chunked_prefill(1)
    assert sdpa._chunked_prefill is False


@pytest.mark.parametrize("case, kwargs, expected", [
    ("two whole chunks", dict(chunk_size=8192, shape=dict(Sq=16384, Skv=16384)), True),
    ("a partial last chunk", dict(chunk_size=8192, shape=dict(Sq=20000, Skv=20000)), True),
    ("batch of four", dict(chunk_size=8192, shape=dict(B=4, Sq=16384, Skv=16384)), True),
    ("chunk shorter than measured", dict(chunk_size=4096), False),
    ("chunk holds the sequence (the plain case)", dict(chunk_size=8192), False),
    ("global layer", dict(shape=dict(Sq=16384, Skv=16384)), False),
    ("continued prefill", dict(chunk_size=8192, shape=dict(Sq=16384, Skv=20000)), False),
    ("decode", dict(chunk_size=8192, shape=dict(Sq=1, Skv=20000)), False),
    ("absolute positions", dict(chunk_size=8192, kv_start=8192, shape=dict(Sq=16384, Skv=16384)), False),
    ("left padding", dict(chunk_size=8192, kv_start=torch.zeros(1, dtype=torch.int32),
                          shape=dict(Sq=16384, Skv=16384)), False),
    ("static cache", dict(chunk_size=8192, kv_len=torch.full((1,), 16384), shape=dict(Sq=16384, Skv=16384)), False),
])
def test_chunk_aligned_prefill_region(case, kwargs, expected):
    q, k, v = _meta(**kwargs.pop("shape", {}))
    assert sdpa.chunk_aligned_prefill(q, k, v, **kwargs) is expected, case


@pytest.fixture
def cuda_cudnn(monkeypatch):
    """supports() on meta/CPU tensors as if they were 16-bit CUDA tensors on which torch picks
    cuDNN; yields the list of (q, k, v) shapes torch's choice was asked about."""
    asked = []

    def choice(q, k, v, scale=None):
        asked.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return "CUDNN_ATTENTION"

    monkeypatch.setattr(sdpa, "_fast_inputs", lambda q: True)
    monkeypatch.setattr(sdpa, "torch_choice", choice)
    return asked


NOT_CHUNK_ALIGNED = [
    dict(chunk_size=8192, kv_start=8192),
    dict(chunk_size=8192, kv_start=torch.zeros(2, dtype=torch.int32)),
    dict(chunk_size=8192, kv_len=torch.full((2,), 20000)),
    dict(chunk_size=4096),  # shorter chunks than MIN_TOKENS
]


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_supports_takes_chunked_prefill_only_when_switched_on(cuda_cudnn, layout):
    q, k, v = _qkv(2, 10, 2, 20000, 128, torch.float16, layout, device="meta")
    assert sdpa.supports(q[:, :, :8192], k[:, :, :8192], v[:, :, :8192])  # the plain case: the fixture works
    asked = len(cuda_cudnn)
    assert not sdpa.supports(q, k, v, chunk_size=8192), "chunked prefill taken while switched off"
    assert len(cuda_cudnn) == asked
    for kwargs in NOT_CHUNK_ALIGNED:
        assert not sdpa.supports(q, k, v, **kwargs), kwargs
    assert not sdpa.supports(q[:, :, :16384], k, v, chunk_size=8192)  # Sq != Skv
    with registry.use(attention="sdpa"), pytest.raises(RuntimeError, match="does not support"):
        registry.select("attention", q, k, v, chunk_size=8192)

    previous = sdpa.set_chunked_prefill(True)
    try:
        assert sdpa.supports(q, k, v, chunk_size=8192)
        # torch's choice is asked about the whole-chunk call: 2 sequences x 2 whole chunks
        assert cuda_cudnn[-1] == ((4, 10, 8192, 128), (4, 2, 8192, 128), (4, 2, 8192, 128))
        for kwargs in NOT_CHUNK_ALIGNED:
            assert not sdpa.supports(q, k, v, **kwargs), kwargs
        assert not sdpa.supports(q[:, :, :16384], k, v, chunk_size=8192)  # Sq != Skv
    finally:
        sdpa.set_chunked_prefill(previous)


def test_supports_declines_chunked_prefill_torch_would_not_run_on_cudnn(monkeypatch, chunked_on):
    monkeypatch.setattr(sdpa, "_fast_inputs", lambda q: True)
    monkeypatch.setattr(sdpa, "torch_choice", lambda q, k, v, scale=None: "FLASH_ATTENTION")
    q, k, v = _meta(Sq=16384, Skv=16384)
    assert not sdpa.supports(q, k, v, chunk_size=8192)


def test_cpu_tensors_never_take_chunked_prefill(chunked_on, monkeypatch):
    monkeypatch.setattr(sdpa, "MIN_TOKENS", 16)
    q, k, v = _qkv(1, 5, 1, 64, 16, torch.float16, "bhsd")
    assert not sdpa.supports(q, k, v, chunk_size=16)
    assert registry.select("attention", q, k, v, chunk_size=16).name != "sdpa"


@pytest.mark.parametrize("B, Hq, Hkv, S, C, layout, dtype", [
    (1, 4, 4, 96, 32, "bhsd", torch.float64),     # whole chunks, MHA
    (2, 10, 2, 80, 32, "bshd", torch.float64),    # a 16-token tail, GQA 5:1, the model's layout
    (2, 10, 2, 80, 32, "bhsd", torch.float32),    # the same, contiguous (copied into chunks)
    (3, 5, 1, 64, 16, "bshd", torch.float32),     # whole chunks, B > 1, views all the way
    (2, 5, 1, 49, 16, "bhsd", torch.float64),     # a one-token tail
])
def test_chunked_prefill_matches_the_float64_reference(monkeypatch, B, Hq, Hkv, S, C, layout, dtype):
    q, k, v = _qkv(B, Hq, Hkv, S, 16, dtype, layout)
    # The tail case fills a new tensor: poison it, so a position neither SDPA call writes fails.
    monkeypatch.setattr(torch, "empty_like", lambda x: torch.full_like(x, float("nan")))
    out = sdpa.chunked_prefill(q, k, v, C, scale=0.3)
    assert out.shape == (B, Hq, S, 16) and out.dtype == dtype
    ref = attention64(q, k, v, chunk_size=C, scale=0.3)
    assert_close(out, ref, tol=1e-12 if dtype == torch.float64 else None)
    # The chunk boundary is what the reshape gets right or wrong: plain causal differs there.
    assert not torch.allclose(out.double(), attention64(q, k, v, scale=0.3), atol=1e-3)


def test_whole_chunks_are_views_where_the_strides_allow():
    C = 16
    def check(x, expect_view):
        B, H, S, D = x.shape
        chunks = sdpa._whole_chunks(x, C)
        assert chunks.shape == (B * (S // C), H, C, D)
        for b in range(B):
            for j in range(S // C):
                assert torch.equal(chunks[b * (S // C) + j], x[b, :, j * C:(j + 1) * C])
        shares = chunks.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        assert shares is expect_view
        assert sdpa._chunks_are_a_view(x, C) is expect_view

    check(_qkv(3, 4, 1, 64, 8, torch.float32, "bshd")[0], True)   # the model's layout
    check(_qkv(1, 4, 1, 72, 8, torch.float32, "bhsd")[0], True)   # one sequence: any layout, even a tail
    check(_qkv(2, 4, 1, 24, 8, torch.float32, "bhsd")[0], True)   # one whole chunk per sequence
    check(_qkv(2, 4, 1, 64, 8, torch.float32, "bhsd")[0], False)  # a sequence's chunks are H rows apart
    check(_qkv(2, 4, 1, 72, 8, torch.float32, "bshd")[0], False)  # the tail sits between two sequences


def test_chunked_prefill_hands_sdpa_views_of_the_model_layout(monkeypatch):
    """In the model's [B, S, H, D] layout no input is copied: SDPA reads q/k/v's own storage."""
    import torch.nn.functional as F

    q, k, v = _qkv(2, 10, 2, 64, 16, torch.float32, "bshd")
    storages = {x.untyped_storage().data_ptr() for x in (q, k, v)}
    real, seen = F.scaled_dot_product_attention, []

    def spy(q_, k_, v_, **kwargs):
        seen.append({x.untyped_storage().data_ptr() for x in (q_, k_, v_)})
        return real(q_, k_, v_, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    out = sdpa.chunked_prefill(q, k, v, 16)
    assert seen == [storages]
    assert_close(out, attention64(q, k, v, chunk_size=16))


def test_chunked_prefill_rejects_what_it_cannot_compute():
    q, k, v = _qkv(1, 2, 1, 32, 8, torch.float32, "bhsd")
    for bad in (0, -16, 16.0, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            sdpa.chunked_prefill(q, k, v, bad)
    with pytest.raises(ValueError, match="k must hold the same S=16"):
        sdpa.chunked_prefill(q[:, :, 16:], k, v, 8)


def test_ops_attention_dispatches_chunked_prefill_to_sdpa_when_on(monkeypatch, chunked_on):
    """The whole path on CPU tensors: registry -> supports -> attention -> chunked_prefill,
    with the CUDA/cuDNN gate faked and MIN_TOKENS lowered to the toy chunk."""
    monkeypatch.setattr(sdpa, "MIN_TOKENS", 16)
    monkeypatch.setattr(sdpa, "_fast_inputs", lambda q: True)
    monkeypatch.setattr(sdpa, "torch_choice", lambda q, k, v, scale=None: "CUDNN_ATTENTION")
    q, k, v = _qkv(2, 10, 2, 40, 16, torch.float32, "bshd")
    with registry.record() as calls:
        out = ops.attention(q, k, v, chunk_size=16)
        continued = ops.attention(q[:, :, 8:], k, v, chunk_size=16)  # Sq != Skv: not chunk-aligned
    assert calls[("attention", "sdpa")] == 1 and sum(calls.values()) == 2
    assert_close(out, attention64(q, k, v, chunk_size=16))
    assert_close(continued, attention64(q[:, :, 8:], k, v, chunk_size=16))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gpu_chunked_prefill_matches_reference_where_selected(chunked_on, layout):
    C, S = 8192, 2 * 8192 + 1000  # two whole chunks and a tail
    q, k, v = _qkv(2, 10, 2, S, 128, torch.bfloat16, layout, device="cuda")
    if not sdpa.supports(q, k, v, chunk_size=C):
        pytest.skip("torch would not run cuDNN attention on the chunks; the triton backend keeps this case")
    with registry.record() as calls:
        out = ops.attention(q, k, v, chunk_size=C)
    assert calls == {("attention", "sdpa"): 1}
    for end in (C + 16, 2 * C + 16, S):  # rows around each chunk start, and the last rows
        rows = slice(end - 32, end)
        ref = attention64(q[:, :, rows], k[:, :, :end], v[:, :, :end], chunk_size=C)
        assert_close(out[:, :, rows], ref, dtype=torch.bfloat16)
