"""NaN and inf: the deliberate cases, one by one (tests/test_properties.py places them at random).

Each kernel propagates NaN/inf as its torch reference does; the kernels' docstrings give the
rules and the one deliberate difference (attention: a non-finite v may reach rows of the same
row block that do not see its key).
"""

import math
from unittest import mock

import pytest
import torch
from helpers import assert_close

from llama4_fast import kernels, ops, registry
from llama4_fast.kernels import attention as attention_module
from llama4_fast.quant import Fp8Weight, quantize_fp8_activations_ref

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter, on NaN

NAN, INF = float("nan"), float("inf")


def bad_rows(device, K=200):
    """Rows: 0 finite, 1 one NaN, 2 one +inf, 3 one -inf, 4 an inf in the second 128-group."""
    x = torch.randn(5, K, device=device) * 3
    x[1, 7], x[2, 9], x[3, 11], x[4, 150] = NAN, INF, -INF, INF
    return x.half()


@pytest.mark.parametrize("group_size", [None, 128])
def test_fp8_quantizer_nan_and_inf(device, group_size):
    """A NaN makes its group's scale and q NaN; an inf makes the scale inf and q NaN at the inf,
    0 elsewhere; exactly as the torch twin (plain float math: amax, amax / 448, x / scale)."""
    x = bad_rows(device)
    q, s = kernels.quantize_fp8_activations(x, group_size=group_size)
    q_ref, s_ref = quantize_fp8_activations_ref(x, group_size)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0, atol=0, equal_nan=True)
    s, q = (s, q.float()) if group_size is None else (s[:, 0], q[:, :128].float())  # the first group
    assert s[1].isnan() and q[1].isnan().all()
    assert s[2] == INF and q[2].isnan().sum() == 1 and (q[2].nan_to_num() == 0).all()
    assert s[0].isfinite() and q[0].isfinite().all()
    if group_size is not None:  # the inf of row 4 spoils its second group only
        assert s[4].isfinite() and q[4].isfinite().all()


def test_fp8_quantizer_scale_ub_saturates_inf(device):
    """With scale_ub an inf is an outlier like any other: the scale is the bound's, q is +-448.
    A NaN still spoils its row."""
    x = bad_rows(device)
    q, s = kernels.quantize_fp8_activations(x, scale_ub=2.0)
    assert torch.equal(s[2:], torch.full((3,), 2.0 / 448, device=device))
    assert q[2, 9].float() == 448 and q[3, 11].float() == -448 and s[1].isnan()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("granularity", ["channel", "block"])
def test_quant_linear_rows_with_nan_or_inf_are_not_finite(device, backend, granularity):
    """FP8 GEMM rows that read a NaN/inf activation are non-finite (NaN on the GPU and in the
    torch backend; the interpreter's tl.dot reads e4m3's NaN as 480 and gives +-inf), the
    others are untouched."""
    W = Fp8Weight.quantize(torch.randn(200, 48, device=device) * 0.07, granularity)
    x = bad_rows(device)
    with registry.use(quant_linear=backend):
        y = ops.quant_linear(x, W)
        clean = ops.quant_linear(x[:1], W)
    assert not y[1:].isfinite().any()
    assert torch.equal(y[0], clean[0])


def attention_both(q, k, v, **kw):
    """(triton, torch) results, the triton one through a forced 3-way KV split as well."""
    outs = []
    for splits in (1, 3):
        with mock.patch.object(attention_module, "_num_splits", lambda *a: splits):
            outs.append(kernels.chunked_attention(q, k, v, **kw))
    torch.testing.assert_close(outs[0], outs[1], equal_nan=True)
    with registry.use(attention="torch"):
        return outs[0], ops.attention(q, k, v, **kw)


def test_attention_row_with_only_minus_inf_scores_is_nan(device):
    """Query 0 sees only key 0; an inf in q makes that score -inf: softmax is 0/0 = NaN there,
    while the other queries weigh key 0 by 0 and stay finite."""
    q, k, v = torch.randn(1, 1, 4, 16, device=device), torch.randn(1, 1, 4, 16, device=device), \
        torch.randn(1, 1, 4, 16, device=device)
    q[0, 0, 0, 0], k[0, 0, 0, 0] = INF, -1.0
    k[0, 0, 1:, 0] = 1.0
    for out in attention_both(q, k, v):
        assert out[0, 0, 0].isnan().all() and out[0, 0, 1:].isfinite().all()


def test_attention_minus_inf_tile_before_finite_keys(device):
    """A whole unmasked key tile of -inf scores (k = -inf against q > 0) before finite keys:
    those keys weigh 0 and the row is finite (the online softmax shifts by 0, not by -inf)."""
    q, k, v = (torch.randn(1, 1, n, 16, device=device) for n in (1, 40, 40))
    q[..., 0] = q[..., 0].abs() + 0.5
    k[0, 0, :16, 0] = -INF
    ref = kernels.chunked_attention(q, k[:, :, 16:], v[:, :, 16:], kv_start=16)
    for out in attention_both(q, k, v):
        assert_close(out, ref, tol=1e-5)


def test_attention_unseen_nan_values_never_matter(device):
    """NaN / inf in v (and k) of keys no query of the block sees (left padding, slots past
    kv_len) leave every output as without them; queries that see no key stay zeros."""
    q, k, v = (torch.randn(2, 2, n, 8, device=device) for n in (3, 8, 8))
    kv_start = torch.tensor([-2, 0], device=device)  # sequence 0: keys 0, 1 are padding
    kv_len = torch.tensor([6, 8], device=device)
    clean = attention_both(q, k, v, kv_start=kv_start, kv_len=kv_len)
    k2, v2 = k.clone(), v.clone()
    v2[0, :, :2], k2[0, :, :2] = NAN, INF  # padding keys
    v2[0, :, 6:], k2[0, :, 6:] = NAN, NAN  # stale cache slots
    for out, ref in zip(attention_both(q, k2, v2, kv_start=kv_start, kv_len=kv_len), clean):
        torch.testing.assert_close(out, ref)


def test_attention_padding_query_with_nan_is_zero(device):
    """A query at a negative position sees no key: zeros, whatever its q or the keys hold."""
    q, k, v = (torch.randn(1, 1, 4, 8, device=device) for _ in range(3))
    q[0, 0, 0], v[0, 0, 1:] = NAN, INF
    for out in attention_both(q, k, v, kv_start=-1):
        assert torch.equal(out[0, 0, 0], torch.zeros(8, device=device))


def test_bad_eps_and_scale_are_refused(device):
    x = torch.randn(2, 8, device=device)
    for eps in (NAN, INF, -1e-6):
        with pytest.raises(ValueError, match="eps"):
            ops.rms_norm(x, None, eps)
        with pytest.raises(ValueError, match="qk_norm_eps"):
            ops.qk_prologue(x.view(1, 2, 1, 8), x.view(1, 2, 1, 8), qk_norm_eps=eps)
    q = torch.randn(1, 1, 2, 8, device=device)
    for scale in (NAN, INF, -INF):
        with pytest.raises(ValueError, match="scale"):
            ops.attention(q, q, q, scale=scale)
    with pytest.raises(ValueError, match="attn_scale"):
        ops.qk_prologue(q, q, positions=torch.zeros(1, dtype=torch.int32, device=device),
                        temperature=(8192.0, math.nan))
