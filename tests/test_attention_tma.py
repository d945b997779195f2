"""The forward kernel's TMA variant (kernels.attention.forward_variant): K/V tiles loaded through
tensor descriptors, optionally 128 keys wide, against the pointer loads and a float64 reference.

On CPU the descriptors run under the Triton interpreter (fp16, small shapes); on a GPU the same
tests run the copy engine. tests/test_sm90_compile.py compiles the variant for sm_90.
"""

import pytest
import torch

from helpers import TOL, assert_close, poisoned, rel_err
from llama4_fast.kernels import attention as attn
from llama4_fast.kernels import device as kernel_device
from llama4_fast.kernels.attention import chunked_attention
from reference64 import attention64

DTYPE = torch.float16  # the variant covers 16-bit prefill; the interpreter has no bf16 dot


@pytest.fixture
def descriptors(monkeypatch):
    """Counts the K/V descriptors the launcher builds: proof that the TMA path ran."""
    built = []
    real = attn._kv_descriptor

    def spy(t, block_n, block_d):
        built.append((tuple(t.shape), block_n, block_d))
        return real(t, block_n, block_d)

    monkeypatch.setattr(attn, "_kv_descriptor", spy)
    return built


def _qkv(B, Hq, Hkv, Sq, Skv, D, layout, device):
    """q [B, Hq, Sq, D], k, v [B, Hkv, Skv, D] in fp16: contiguous ("bhsd") or [B, S, H, D]
    storage transposed ("bshd", as the model passes them)."""
    def one(h, s):
        if layout == "bshd":
            return torch.randn(B, s, h, D, dtype=DTYPE, device=device).transpose(1, 2)
        return torch.randn(B, h, s, D, dtype=DTYPE, device=device)
    return one(Hq, Sq), one(Hkv, Skv), one(Hkv, Skv)


def _run(q, k, v, **kwargs):
    out = poisoned(q.shape, q.dtype, q.device)
    assert chunked_attention(q, k, v, out=out, **kwargs) is out
    return out


CASES = {  # (B, Hq, Hkv, Sq, Skv, D, layout, attention kwargs, block_n)
    "global, a partial last tile": (1, 2, 2, 100, 100, 64, "bhsd", {}, None),
    "chunked C=48, GQA 5:1, 128-key tiles": (1, 5, 1, 150, 150, 32, "bshd", dict(chunk_size=48), 128),
    "chunked at absolute positions, B=2": (2, 4, 2, 90, 90, 16, "bhsd", dict(chunk_size=40, kv_start=100), 32),
    "continued prefill, left padding": (2, 4, 2, 40, 70, 32, "bshd",
                                        dict(chunk_size=32, kv_start=torch.tensor([-7, 0])), 64),
    "padded head dim 80": (1, 5, 1, 70, 70, 80, "bhsd", dict(chunk_size=64), 128),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tma_variant_matches_pointer_loads_and_reference(case, device, descriptors):
    B, Hq, Hkv, Sq, Skv, D, layout, kwargs, block_n = CASES[case]
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, D, layout, device)
    kwargs = {key: val.to(device) if isinstance(val, torch.Tensor) else val for key, val in kwargs.items()}
    with attn.forward_variant(block_n=block_n):
        pointers = _run(q, k, v, **kwargs)
    assert descriptors == []
    with attn.forward_variant(tma=True, block_n=block_n):
        tma = _run(q, k, v, **kwargs)
    block_d = max(16, 1 << (D - 1).bit_length())
    assert descriptors == [((B, Hkv, Skv, D), block_n or 64, block_d)] * 2
    ref = attention64(q, k, v, **kwargs)
    assert_close(pointers, ref)
    assert_close(tma, ref)
    assert rel_err(tma, pointers) < TOL[DTYPE] / 10  # same tiles, same order: a copy engine changes no math


def test_tma_variant_reads_nothing_past_kv_len(device, descriptors):
    """A static cache prefill: NaN past each sequence's kv_len. TMA loads whole tiles, so the
    kernel must zero the values past the block's last key (p = 0 times NaN is NaN)."""
    q, k, v = _qkv(2, 5, 1, 24, 96, 32, "bhsd", device)
    lengths = [70, 50]
    for b, n in enumerate(lengths):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    kv_len = torch.tensor(lengths, device=device)
    with attn.forward_variant(tma=True, block_n=128):
        out = _run(q, k, v, chunk_size=64, kv_len=kv_len)
    assert len(descriptors) == 2
    for b, n in enumerate(lengths):
        assert_close(out[b:b + 1], attention64(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], chunk_size=64))


def test_layouts_tma_cannot_address_fall_back_to_pointer_loads_with_a_warning(device, descriptors):
    q, k, v = _qkv(1, 2, 1, 40, 40, 20, "bhsd", device)  # 40-byte rows: strides not 16-byte multiples
    with attn.forward_variant(tma=True):
        with pytest.warns(UserWarning, match="pointer loads run instead of TMA"):
            out = _run(q, k, v)
    assert descriptors == []
    assert_close(out, attention64(q, k, v))


def test_tma_layout_rule():
    k = torch.randn(1, 2, 40, 32, dtype=DTYPE)
    assert kernel_device.tma_layout_ok(k, torch.randn(1, 40, 2, 32, dtype=DTYPE).transpose(1, 2))
    assert not kernel_device.tma_layout_ok(k, torch.randn(1, 2, 40, 20, dtype=DTYPE))  # 40-byte rows
    assert not kernel_device.tma_layout_ok(torch.randn(k.numel() + 1, dtype=DTYPE)[1:].view(k.shape))  # base 2 bytes off
    assert not kernel_device.tma_layout_ok(k.transpose(2, 3))  # last stride not 1
    assert not kernel_device.tma_layout_ok(k[:, :, :0])  # empty
    assert kernel_device.tma_unavailable(k) is None
    assert "layout" in kernel_device.tma_unavailable(k.transpose(2, 3))


def test_forward_variant_scope_and_arguments():
    def cfg(dtype=torch.float16, decode=False, block_d=128):
        k = torch.empty(1, 1, 64, block_d)
        return attn._forward_config(block_d, dtype, decode, 4096, k, k)

    table = cfg()
    assert not table.tma and table == attn._launch_config(128, torch.float16, False, 4096)
    with attn.forward_variant(tma=True, block_n=128):
        assert (cfg().tma, cfg().block_n, cfg().num_stages) == (True, 128, 2)
        assert cfg(block_d=256).block_n == attn._launch_config(256, torch.float16, False, 4096).block_n
        assert cfg(decode=True) == attn._launch_config(128, torch.float16, True, 4096)  # decode keeps the table
        assert cfg(dtype=torch.float32) == attn._launch_config(128, torch.float32, False, 4096)
        with attn.forward_variant(block_n=32):  # nested: replaces the outer variant
            assert (cfg().tma, cfg().block_n, cfg().num_stages) == (False, 32, table.num_stages)
        assert cfg().tma
    assert cfg() == table
    with pytest.raises(RuntimeError, match="boom"), attn.forward_variant(tma=True):
        raise RuntimeError("boom")
    assert cfg() == table  # restored on an exception too
    with pytest.raises(TypeError, match="tma must be a bool"), attn.forward_variant(tma=1):
        pass
    for bad in (8, 96, 256, 64.0, True):
        with pytest.raises(ValueError, match="block_n must be None or a power of two"), \
                attn.forward_variant(block_n=bad):
            pass
    assert cfg() == table
