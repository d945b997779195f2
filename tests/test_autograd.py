"""Gradients of every op on the `triton` backend (the Triton kernels, through the interpreter
on CPU) against torch.autograd of the torch backend's functions in float64, and the
training-only errors. The attention backward has its own kernel tests
(tests/test_attention_backward.py). Each `fn(api, *inputs)` is run with api = `ops` on the
triton backend, and with api = the torch backend module (which takes float64)."""

import pytest
import torch
from helpers import TOL, assert_close

from llama4_fast import ops, registry
from llama4_fast.backends import torch_ref
from llama4_fast.quant import Fp8Weight, Int4Weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grads_of(fn, inputs, reference: bool):
    """fn(api, *inputs) with fresh leaves (float64 for the reference), then the gradients of a
    fixed random projection of its outputs: [grad of each input that requires grad]."""
    dtype = torch.float64 if reference else None
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t
              for t in inputs]
    if reference:
        outs = fn(torch_ref, *leaves)
    else:
        with registry.use("triton"), registry.record() as calls:
            outs = fn(ops, *leaves)
        assert calls and all(b == "triton" for _, b in calls), dict(calls)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(0)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in outs if o.is_floating_point() and o.requires_grad)
    loss.backward()
    return [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


def check_op(fn, inputs, dtype=torch.float32, tol=None):
    got = grads_of(fn, [t.to(dtype) if t.is_floating_point() else t for t in inputs], reference=False)
    ref = grads_of(fn, inputs, reference=True)
    assert len(got) == len(ref) > 0
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g is not None, f"input {i}: no gradient"
        assert_close(g, r, dtype=dtype, tol=tol)


@pytest.mark.parametrize("scoring,renormalize,top_k", [("sigmoid", False, 1), ("sigmoid", False, 2),
                                                       ("softmax", False, 2), ("softmax", True, 3)])
def test_route_gradient(scoring, renormalize, top_k):
    logits = torch.randn(13, 8, device=DEVICE, requires_grad=True)
    check_op(lambda api, lg: api.route(lg, top_k, scoring, renormalize), [logits])


def moe_inputs(T, E, H, I, top_k, requires=(True, True, True, True)):
    x = torch.randn(T, H, device=DEVICE)
    w13 = torch.randn(E, H, 2 * I, device=DEVICE) * H ** -0.5
    w2 = torch.randn(E, I, H, device=DEVICE) * I ** -0.5
    weights = torch.rand(T, top_k, device=DEVICE) + 0.5
    ids = torch.stack([torch.randperm(E, device=DEVICE)[:top_k] for _ in range(T)]).to(torch.int32)
    for t, r in zip((x, w13, w2, weights), requires):
        t.requires_grad_(r)
    return [x, w13, w2, weights, ids]


@pytest.mark.parametrize("T,top_k,on_input", [(1, 1, True), (19, 1, True), (19, 2, False), (40, 2, True)])
def test_fused_moe_gradient(T, top_k, on_input):
    check_op(lambda api, x, w13, w2, w, ids: api.fused_moe(x, w13, w2, w, ids, apply_router_weight_on_input=on_input),
             moe_inputs(T, 6, 40, 24, top_k))


def test_fused_moe_gradient_fp16_and_partial_requires_grad():
    """LoRA-style: frozen experts, gradients to the activations and router weights only."""
    check_op(lambda api, x, w13, w2, w, ids: api.fused_moe(x, w13, w2, w, ids),
             moe_inputs(24, 4, 40, 24, 2, requires=(True, False, False, True)), dtype=torch.float16)


def test_route_then_moe_gradient_reaches_the_router_logits():
    x, w13, w2, _, _ = moe_inputs(17, 6, 40, 24, 2)
    logits = torch.randn(17, 6, device=DEVICE, requires_grad=True)

    def layer(api, x, w13, w2, logits):
        w, ids = api.route(logits, 2, "sigmoid")
        return api.fused_moe(x, w13, w2, w, ids)

    check_op(layer, [x, w13, w2, logits])


# transformers' other experts: biases (the router weight on the output), gpt-oss's interleaved
# clamped gate, a tanh-GELU gate, expert-parallel sentinel ids.
MOE_VARIANTS = {"gpt_oss": dict(gate_up_interleaved=True, clamped_swiglu=(0.7, 1.702)),
                "gelu_tanh_sentinels": dict(activation="gelu_tanh", skip_sentinel_ids=True)}


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_fused_moe_variant_gradient(variant):
    E, I = 6, 24
    x, w13, w2, weights, ids = moe_inputs(19, E, 40, I, 2)
    if MOE_VARIANTS[variant].get("skip_sentinel_ids"):
        ids[0, 1], ids[5, 0] = E, E + 3
    b13 = (torch.randn(E, 2 * I, device=DEVICE) * 0.5).requires_grad_()
    b2 = (torch.randn(E, 40, device=DEVICE) * 0.5).requires_grad_()

    def experts(api, x, w13, w2, w, ids, b13, b2):
        return api.fused_moe(x, w13, w2, w, ids, apply_router_weight_on_input=False, gate_up_bias=b13, down_bias=b2,
                             **MOE_VARIANTS[variant])

    check_op(experts, [x, w13, w2, weights, ids, b13, b2])


@pytest.mark.parametrize("fmt", ["int4", "fp8_channel", "fp8_block"])
def test_quantized_experts_are_frozen_and_pass_dx(fmt):
    """dX and d(router weight) through the dequantized experts; the FP8 activation rounding of
    the forward is passed straight through, so FP8 compares with its rounding's tolerance."""
    x, w13, w2, weights, ids = moe_inputs(21, 4, 128, 128, 2, requires=(True, False, False, True))
    quantize = {"int4": lambda w: Int4Weight.quantize(w, 32), "fp8_channel": Fp8Weight.quantize,
                "fp8_block": lambda w: Fp8Weight.quantize(w, "block")}[fmt]
    q13, q2 = quantize(w13), quantize(w2)
    d13, d2 = q13.dequantize(torch.float32), q2.dequantize(torch.float32)
    got = grads_of(lambda api, x, w: api.fused_moe(x, q13, q2, w, ids), [x, weights], reference=False)
    ref = grads_of(lambda api, x, w: api.fused_moe(x, d13.double(), d2.double(), w, ids), [x, weights],
                   reference=True)
    for g, r in zip(got, ref):
        assert_close(g, r, tol=TOL[torch.float32] if fmt == "int4" else 0.1)


def test_quant_linear_passes_dx():
    x = torch.randn(9, 64, device=DEVICE, requires_grad=True)
    w = Int4Weight.quantize(torch.randn(64, 40, device=DEVICE), 32)
    dense = w.dequantize(torch.float64)
    got = grads_of(lambda api, x: api.quant_linear(x, w), [x], reference=False)
    ref = grads_of(lambda api, x: x @ dense, [x], reference=True)
    assert_close(got[0], ref[0])


def test_quantized_weight_that_requires_grad_is_refused():
    x, w13, w2, weights, ids = moe_inputs(4, 4, 64, 32, 1, requires=(True, False, False, False))
    q13, q2 = Fp8Weight.quantize(w13), Fp8Weight.quantize(w2)
    q13.scale.requires_grad_()
    with pytest.raises(ValueError, match="gate_up_proj is a quantized weight that requires grad"):
        ops.fused_moe(x, q13, q2, weights, ids)
    with torch.no_grad():  # inference is not training: allowed
        ops.fused_moe(x, q13, q2, weights, ids)
    lin = Fp8Weight.quantize(torch.randn(64, 16, device=DEVICE))
    lin.scale.requires_grad_()
    with pytest.raises(ValueError, match="weight is a quantized weight"):
        ops.quant_linear(x, lin)


def rope_tables(B, S, D):
    angles = torch.randn(B, S, D // 2, device=DEVICE)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("steps", ["rope_norm", "rope", "temperature"])
def test_qk_prologue_gradient(steps):
    B, S, D = 2, 7, 16
    q = torch.randn(B, S, 4, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, S, 2, D, device=DEVICE, requires_grad=True)
    cos, sin = rope_tables(B, S, D)
    pos = torch.arange(S, device=DEVICE) + 5
    kw = {"rope_norm": dict(cos=cos, sin=sin, qk_norm_eps=1e-6), "rope": dict(cos=cos, sin=sin),
          "temperature": dict(positions=pos, temperature=(4.0, 0.1))}[steps]
    if steps == "temperature":  # k passes through: only q's gradient is the prologue's
        check_op(lambda api, q, k: api.qk_prologue(q, k, **kw)[0], [q, k.detach()])
    else:
        check_op(lambda api, q, k: api.qk_prologue(q, k, **kw), [q, k])


def test_qk_prologue_out_buffers_refused_under_grad():
    q = torch.randn(1, 3, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 3, 1, 16, device=DEVICE)
    with registry.use(qk_prologue="triton"), pytest.raises(ValueError, match="q_out / k_out"):
        ops.qk_prologue(q, k, qk_norm_eps=1e-6, q_out=torch.empty_like(q))
