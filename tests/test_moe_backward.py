"""The Triton MoE backward (`kernels.moe.fused_moe_backward`, with the forward's `preact`)
against float64 autograd gradients of the reference function (tests/reference64.moe64_grads).
On CPU the kernels run through the Triton interpreter: small H/I, fp16/fp32."""

import pytest
import torch
from helpers import TOL, assert_close, poisoned
from reference64 import experts64, moe64, moe64_grads
from test_moe_kernel import VARIANTS, linear_style, make_inputs, reference_kwargs, variant_kwargs

from llama4_fast.kernels import fused_moe
from llama4_fast.kernels.moe import fused_moe_backward


def forward_backward(x, w13, w2, weights, ids, grad_out, on_input, weight_grads=True):
    P = ids.numel()
    preact = poisoned((P, w13.shape[2]), x.dtype, x.device)
    out = fused_moe(x, w13, w2, weights, ids, apply_router_weight_on_input=on_input, preact=preact)
    grads = fused_moe_backward(grad_out, x, w13, w2, weights, ids, preact, apply_router_weight_on_input=on_input,
                               weight_grads=weight_grads)
    return out, grads


def check(x, w13, w2, weights, ids, on_input, grad_out=None, tol=None):
    grad_out = torch.randn_like(x) if grad_out is None else grad_out
    out, grads = forward_backward(x, w13, w2, weights, ids, grad_out, on_input)
    assert_close(out, moe64(x, w13, w2, weights, ids, on_input), tol=tol)
    refs = moe64_grads(x, w13, w2, weights, ids, grad_out, on_input)
    for name, g, ref, like in zip(("dx", "d_gate_up", "d_down", "d_weights"), grads, refs, (x, w13, w2, weights)):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        try:
            assert_close(g, ref, dtype=x.dtype, tol=tol)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    return grads


# Sizes are not multiples of any block; T * top_k spans the direct (forward) and sorted paths.
@pytest.mark.parametrize("T,E,top_k,H,I,dtype", [
    (1, 4, 1, 40, 24, torch.float32),
    (5, 3, 2, 40, 24, torch.float32),
    (37, 4, 1, 72, 48, torch.float32),
    (37, 8, 4, 40, 24, torch.float32),
    (37, 4, 2, 40, 24, torch.float16),
])
@pytest.mark.parametrize("on_input", [True, False])
def test_backward_matches_float64_autograd(device, T, E, top_k, H, I, dtype, on_input):
    check(*make_inputs(T, E, H, I, top_k, dtype, device), on_input)


def test_expert_without_tokens_gets_zero_weight_gradient(device):
    x, w13, w2, weights, _ = make_inputs(20, 4, 40, 24, 1, torch.float32, device)
    ids = torch.full((20, 1), 2, dtype=torch.int32, device=device)  # all tokens on expert 2
    _, d13, d2, _ = check(x, w13, w2, weights, ids, True)
    for e in (0, 1, 3):
        assert torch.equal(d13[e], torch.zeros_like(d13[e])) and torch.equal(d2[e], torch.zeros_like(d2[e]))
    assert d13[2].abs().sum() > 0


def test_expanded_grad_out_and_strided_weights(device):
    """loss = out.sum() hands a stride-0 gradient; transposed weight views read in place."""
    x, w13, w2, weights, ids = make_inputs(9, 4, 40, 24, 2, torch.float32, device)
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)
    grad_out = torch.ones(1, 1, device=device).expand(9, 40)
    check(x, w13_t, w2, weights, ids, True, grad_out=grad_out)


def test_input_gradient_only(device):
    x, w13, w2, weights, ids = make_inputs(9, 4, 40, 24, 2, torch.float32, device)
    g = torch.randn_like(x)
    _, (dx, d13, d2, dw) = forward_backward(x, w13, w2, weights, ids, g, True, weight_grads=False)
    assert d13 is None and d2 is None
    ref = moe64_grads(x, w13, w2, weights, ids, g, True)
    assert_close(dx, ref[0]) and assert_close(dw, ref[3])


def test_backward_is_deterministic(device):
    x, w13, w2, weights, ids = make_inputs(40, 4, 40, 24, 2, torch.float32, device)
    g = torch.randn_like(x)
    a = forward_backward(x, w13, w2, weights, ids, g, True)[1]
    b = forward_backward(x, w13, w2, weights, ids, g, True)[1]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_backward_argument_errors(device):
    x, w13, w2, weights, ids = make_inputs(4, 4, 40, 24, 1, torch.float32, device)
    preact = torch.zeros(4, 48, device=device)
    with pytest.raises(ValueError, match="grad_out"):
        fused_moe_backward(x[:3], x, w13, w2, weights, ids, preact)
    with pytest.raises(ValueError, match="preact"):
        fused_moe_backward(x, x, w13, w2, weights, ids, preact[:, :40])
    with pytest.raises(TypeError, match="grad_out"):
        fused_moe_backward(x.double(), x, w13, w2, weights, ids, preact)
    with pytest.raises(ValueError, match="preact"):
        fused_moe(x, w13, w2, weights, ids, preact=torch.zeros(3, 48, device=device))


# -- transformers' other experts: biases, activations, interleaved gate/up, gpt-oss's gate -------

def check_variant(x, w13, w2, weights, ids, on_input, kw, skip_sentinel_ids=False):
    """Forward and backward with fused_moe's options `kw` against experts64's float64 autograd;
    returns the kernel's gradients."""
    P = ids.numel()
    preact = poisoned((P, w13.shape[2]), x.dtype, x.device)
    out = fused_moe(x, w13, w2, weights, ids, apply_router_weight_on_input=on_input, preact=preact,
                    skip_sentinel_ids=skip_sentinel_ids, **kw)
    ref_kw = reference_kwargs(kw, on_input)
    assert_close(out, experts64(x, w13, w2, weights, ids, **ref_kw))
    grad_out = torch.randn_like(x)
    grads = fused_moe_backward(grad_out, x, w13, w2, weights, ids, preact, apply_router_weight_on_input=on_input,
                               skip_sentinel_ids=skip_sentinel_ids, **kw)
    has_bias = "gate_up_bias" in kw or "down_bias" in kw
    assert len(grads) == (6 if has_bias else 4)
    refs = experts64(x, w13, w2, weights, ids, grad_out=grad_out, **ref_kw)
    names = ("dx", "d_gate_up", "d_down", "d_weights", "d_gate_up_bias", "d_down_bias")
    likes = (x, w13, w2, weights, kw.get("gate_up_bias"), kw.get("down_bias"))
    for name, g, ref, like in zip(names, grads, refs, likes):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        try:
            assert_close(g, ref, dtype=x.dtype)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    return grads


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T,E,top_k,dtype,on_input", [
    (13, 4, 2, torch.float32, True),
    (37, 4, 2, torch.float16, False),
])
def test_variant_backward_matches_float64_autograd(device, variant, T, E, top_k, dtype, on_input):
    H, I = 40, 24
    x, w13, w2, weights, ids = make_inputs(T, E, H, I, top_k, dtype, device)
    kw = variant_kwargs(variant, E, H, I, dtype, device)
    check_variant(x, w13, w2, weights, ids, on_input and "down_bias" not in kw, kw)


def test_linear_style_weights_get_gradients_in_their_layout(device):
    """nn.Linear-style experts ([E, 2I, H] / [E, H, I], passed as transposed views) with gpt-oss's
    options: the weight gradients come back with the weights' strides, the values right."""
    E, H, I = 4, 40, 24
    x, w13, w2, weights, ids = make_inputs(11, E, H, I, 2, torch.float32, device)
    w13, w2 = linear_style(w13, w2)
    grads = check_variant(x, w13, w2, weights, ids, False, variant_kwargs("gpt_oss", E, H, I, torch.float32, device))
    assert grads[1].stride() == w13.stride() and grads[2].stride() == w2.stride()


def test_sentinel_ids_get_no_gradient(device):
    """Expert-parallel sentinels (ids >= E): no contribution to dX or the weights, a zero router
    weight gradient."""
    E, H, I = 4, 40, 24
    x, w13, w2, weights, ids = make_inputs(21, E, H, I, 2, torch.float32, device)
    ids[0, 1], ids[3] = E, torch.tensor([E + 2, E])
    kw = variant_kwargs("biases", E, H, I, torch.float32, device)
    grads = check_variant(x, w13, w2, weights, ids, False, kw, skip_sentinel_ids=True)
    assert grads[3][0, 1].item() == 0.0 and grads[3][3].abs().max().item() == 0.0
    assert grads[0][3].abs().max().item() == 0.0
