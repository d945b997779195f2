"""The Triton MoE backward (`kernels.moe.fused_moe_backward`, with the forward's `preact`)
against float64 autograd gradients of the reference function (tests/reference64.moe64_grads).
On CPU the kernels run through the Triton interpreter: small H/I, fp16/fp32."""

import pytest
import torch
from helpers import TOL, assert_close, poisoned
from reference64 import moe64, moe64_grads
from test_moe_kernel import make_inputs

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
