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
