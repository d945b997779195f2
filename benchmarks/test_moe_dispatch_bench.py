"""A few moe_dispatch cases for pytest-benchmark (`pytest benchmarks --benchmark-only`).

GPU: decode and prefill points of the real shapes (Scout, and the TP8 shards); CPU: the
--quick toy shape through the Triton interpreter. Each timed call synchronizes CUDA, so the
numbers are wall time of complete launches. `python benchmarks/moe_dispatch.py` gives the
full tables with baselines and the roofline. Each case also checks the timed call's answer
against the loop (llama4_fast's torch backend, the script's reference).
"""

import pytest
import torch

import moe_dispatch  # sets TRITON_INTERPRET on a machine without a GPU, before triton loads
from common import WRONG_REL_ERR, rel_err

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float16
SHAPES = ["scout-tp8", "maverick-tp8", "scout"] if ON_GPU else ["toy"]
TOKENS = [1, 8, 256] if ON_GPU else [1, 33]
IMPLS = {"ours": moe_dispatch.ours, "loop": moe_dispatch.loop}


@pytest.fixture(scope="module", params=SHAPES)
def experts(request):
    E, H, I = {**moe_dispatch.SHAPES, **moe_dispatch.QUICK_SHAPES}[request.param]
    gen = torch.Generator(device=DEV).manual_seed(moe_dispatch.SEED)
    w13 = torch.randn(E, H, 2 * I, device=DEV, dtype=DTYPE, generator=gen).mul_(0.02)
    w2 = torch.randn(E, I, H, device=DEV, dtype=DTYPE, generator=gen).mul_(0.02)
    yield w13, w2
    del w13, w2
    if ON_GPU:
        torch.cuda.empty_cache()


def _synced(fn, *args):
    def run():
        out = fn(*args)
        if ON_GPU:
            torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("T", TOKENS)
def test_moe_layer(benchmark, experts, impl, T):
    w13, w2 = experts
    E, H = w13.shape[0], w13.shape[1]
    gen = torch.Generator(device=DEV).manual_seed(T)
    x = torch.randn(T, H, device=DEV, dtype=DTYPE, generator=gen)
    logits = torch.randn(T, E, device=DEV, dtype=DTYPE, generator=gen)
    benchmark.extra_info.update(E=E, H=H, I=w2.shape[1], T=T, impl=impl)
    out = benchmark(_synced(IMPLS[impl], x, logits, w13, w2))
    assert out.shape == (T, H)
    assert rel_err(out, moe_dispatch.loop(x, logits, w13, w2)) <= WRONG_REL_ERR
