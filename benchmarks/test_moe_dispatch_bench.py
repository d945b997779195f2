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


# transformers' MoE models through their experts interface: ours vs transformers' grouped_mm
HF_SHAPES = ["qwen3-30b-a3b", "gpt-oss-120b"] if ON_GPU else ["toy-top2", "toy-gpt-oss"]
HF_TOKENS = [1, 64] if ON_GPU else [1, 33]


@pytest.fixture(scope="module", params=HF_SHAPES)
def hf_experts(request):
    if reason := moe_dispatch.hf_available():
        pytest.skip(reason)
    import llama4_fast

    llama4_fast.register_experts()
    E, H, I, top_k, kind = {**moe_dispatch.HF_SHAPES, **moe_dispatch.QUICK_HF_SHAPES}[request.param]
    module = moe_dispatch.hf_experts_module(kind, E, H, I, top_k, DTYPE, DEV)
    yield module, top_k
    del module
    if ON_GPU:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("impl", ["ours", "grouped_mm"])
@pytest.mark.parametrize("T", HF_TOKENS)
@torch.no_grad()
def test_hf_experts(benchmark, hf_experts, impl, T):
    module, top_k = hf_experts
    E, H = module.gate_up_proj.shape[0], module.down_proj.shape[-1 if module.is_transposed else 1]
    gen = torch.Generator(device=DEV).manual_seed(T)
    x = torch.randn(T, H, device=DEV, dtype=DTYPE, generator=gen)
    logits = torch.randn(T, E, device=DEV, dtype=DTYPE, generator=gen)
    fn = moe_dispatch.hf_ours if impl == "ours" else moe_dispatch.hf_baseline(impl)
    benchmark.extra_info.update(E=E, H=H, T=T, top_k=top_k, impl=impl)
    out = benchmark(_synced(fn, module, x, logits, top_k))
    weights, ids = moe_dispatch.hf_router(logits, top_k)
    assert out.shape == (T, H)
    assert rel_err(out, moe_dispatch.hf_eager(module, x, ids, weights)) <= WRONG_REL_ERR
