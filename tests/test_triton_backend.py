"""The `triton` backend end to end: the patched transformers model and the thin model running
the Triton kernels (through the interpreter on CPU, compiled on a GPU), against the torch
backend; and the ops inside torch.compile on a GPU."""

import pytest
import torch
from helpers import assert_close
from reference64 import attention64, moe64

import llama4_fast
from llama4_fast import Llama4, ops, registry
from llama4_fast.tiny import tiny_hf_model

pytest.importorskip("transformers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small enough for the interpreter: every structural feature of the tiny model, narrower.
NARROW = dict(hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
              attention_chunk_size=8)


def _close(a, b, tol):
    scale = b.float().abs().max().item()
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= tol * max(scale, 1.0), f"max |diff| {diff:.3g} vs scale {scale:.3g}"


@torch.no_grad()
def test_patched_model_runs_the_triton_kernels():
    model = tiny_hf_model(seed=21, device=DEVICE, **NARROW)
    ids = torch.randint(3, 1024, (2, 19), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding: kv_start travels as a per-sequence tensor
    llama4_fast.patch(model)
    with registry.use("torch"):
        ref = model(ids, attention_mask=mask).logits
        ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with registry.record() as calls:
        got = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for op in ("route", "fused_moe", "attention"):
        assert calls[(op, "triton")] > 0, f"{op} did not reach the triton backend: {dict(calls)}"
    real = mask.bool()
    _close(got[real], ref[real], 1e-4)
    assert torch.equal(tokens, ref_tokens)


@torch.no_grad()
def test_patched_model_static_cache_on_triton():
    """transformers' static cache: the whole buffer and its filled count (kv_len) reach the kernel."""
    model = llama4_fast.patch(tiny_hf_model(seed=24, device=DEVICE, **NARROW))
    ids = torch.randint(3, 1024, (2, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                  cache_implementation="static")
    with registry.use("torch"):
        ref = model.generate(ids, **kwargs)
    with registry.record() as calls:
        got = model.generate(ids, **kwargs)
    assert calls[("attention", "triton")] == 4 * 6
    assert torch.equal(got, ref)


@torch.no_grad()
def test_patched_model_compiles_as_whole_graphs():
    """transformers' recipe for fast decode, a static cache and a compiled forward, on the
    patched model: every forward traces without a graph break (fullgraph=True raises on one),
    left padding included, and the tokens match the unpatched model."""
    model = tiny_hf_model(seed=26, device=DEVICE, **NARROW)
    ids = torch.randint(3, 1024, (2, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                  cache_implementation="static")
    ref = model.generate(ids, **kwargs)
    llama4_fast.patch(model)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager", fullgraph=True)
    with registry.record() as calls:
        got = model.generate(ids, **kwargs)
    assert calls[("qk_prologue", "triton")] and calls[("fused_moe", "triton")]
    assert torch.equal(got, ref)


@torch.no_grad()
def test_thin_model_cached_decode_on_triton():
    model = Llama4.from_hf(tiny_hf_model(seed=22, device=DEVICE, **NARROW))
    ids = torch.randint(3, 1024, (1, 13), device=DEVICE)
    with registry.use("torch"):
        ref = model.generate(ids, 7)
    with registry.record() as calls:
        # one prefill piece crossing a chunk boundary, then 6 device-position decode steps
        # (kv_len over the static cache) crossing another
        got = model.generate(ids, 7, prefill_piece=13)
    assert calls[("attention", "triton")] == 4 * 7
    assert torch.equal(got, ref)


@torch.no_grad()
def test_thin_model_padded_batch_on_triton():
    """Left-padded prompts of different lengths: per-sequence kv_start and kv_len [B] tensors
    reach the kernel at prefill (pieces crossing chunk boundaries) and at decode."""
    model = Llama4.from_hf(tiny_hf_model(seed=23, device=DEVICE, **NARROW))
    prompts = [torch.randint(3, 1024, (n,), device=DEVICE) for n in (5, 13)]
    with registry.use("torch"):
        ref = model.generate(prompts, 5, prefill_piece=6)
    with registry.record() as calls:
        got = model.generate(prompts, 5, prefill_piece=6)
    assert calls[("attention", "triton")] == 4 * (3 + 4)
    for g, r in zip(got, ref):
        assert torch.equal(g, r)


@torch.no_grad()
def test_thin_decode_step_traces_as_one_graph():
    """torch.compile sees a whole decode step (device position, kv_len over the static caches,
    the Triton custom ops) as one graph: nothing in it reads a tensor back to the host, which
    is also what lets the step be captured in a CUDA graph."""
    model = Llama4.from_hf(tiny_hf_model(seed=25, device=DEVICE, **NARROW))
    ids = torch.randint(3, 1024, (2, 9), device=DEVICE)
    model.setup_caches(2, 16)
    model.prefill(ids)
    step = model.decode_step(2, cuda_graph=False)
    ref = step(ids[:, -1], 9).clone()
    torch._dynamo.reset()
    compiled = torch.compile(step._run, backend="eager", fullgraph=True)  # raises on a graph break
    with registry.record() as calls:
        got = compiled()  # the same inputs, still in the step's buffers
    assert calls[("attention", "triton")] == 4
    torch.testing.assert_close(got, ref)


@pytest.mark.gpu
def test_ops_inside_torch_compile_and_cuda_graphs():
    T, E, H, I = 8, 16, 256, 128
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(E, H, 2 * I, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16) * I ** -0.5
    router = torch.randn(H, E, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 8, 4, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 40, 64, device="cuda", dtype=torch.bfloat16)

    def step(x, q, kv):
        weights, ids = ops.route(x @ router, 1)
        moe = ops.fused_moe(x, w13, w2, weights, ids)
        att = ops.attention(q, kv, kv, chunk_size=16, kv_start=3)
        return moe, att

    eager = step(x, q, kv)
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, then CUDA-graph replays
        out = compiled(x, q, kv)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    # consistent with eager, and right: both against float64 (the routing eager chose)
    weights, ids = ops.route(x @ router, 1)
    refs = moe64(x, w13, w2, weights, ids), attention64(q, kv, kv, chunk_size=16, kv_start=3)
    for got in (eager, out):
        for a, ref in zip(got, refs):
            assert_close(a, ref)


@pytest.mark.gpu
@torch.no_grad()
def test_patched_tiny_model_bf16_on_gpu():
    """bf16 rounds differently along every path, so both bf16 models are held against the same
    model in fp32: the patched one must be about as close to it as transformers itself."""
    exact = tiny_hf_model(seed=23, dtype=torch.float32, device="cuda")
    model = tiny_hf_model(seed=23, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(3, 1024, (2, 100), device="cuda")  # crosses chunks of 32
    ref = exact(ids).logits

    def err(logits):
        return ((logits.float() - ref).norm() / ref.norm()).item()

    unpatched = err(model(ids).logits)
    llama4_fast.patch(model)
    with registry.record() as calls:
        patched = err(model(ids).logits)
    assert calls[("fused_moe", "triton")] == 4 and calls[("attention", "triton")] == 4
    assert patched < 1.5 * unpatched + 1e-3, f"patched bf16 error {patched:.3g} vs transformers' own {unpatched:.3g}"
