"""The `torch` reference backend of every op, through `llama4_fast.ops`, against float64."""

import pytest
import torch

from helpers import assert_close, rel_err
from llama4_fast import ops, registry
from reference64 import attention64, moe64, rms_norm64, rope64, route64

pytestmark = pytest.mark.usefixtures("torch_backend")


@pytest.fixture
def torch_backend():
    with registry.use("torch"):
        yield


@pytest.mark.parametrize("scoring,renormalize", [("sigmoid", False), ("softmax", False), ("softmax", True)])
@pytest.mark.parametrize("T,E,k", [(1, 16, 1), (37, 128, 1), (20, 8, 2), (5, 4, 4)])
def test_route(T, E, k, scoring, renormalize):
    logits = torch.randn(T, E)
    w, ids = ops.route(logits, k, scoring, renormalize)
    ref_w, ref_ids = route64(logits, k, scoring, renormalize)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == (T, k)
    assert torch.equal(ids.long(), ref_ids)
    assert_close(w, ref_w, tol=1e-6)


def _moe_inputs(T, E, H, inter, k, dtype=torch.float32):
    x = torch.randn(T, H, dtype=dtype)
    gate_up = (torch.randn(E, H, 2 * inter) * H ** -0.5).to(dtype)
    down = (torch.randn(E, inter, H) * inter ** -0.5).to(dtype)
    logits = torch.randn(T, E)
    w, ids = route64(logits, k)
    return x, gate_up, down, w.float(), ids.int()


@pytest.mark.parametrize("on_input", [True, False])
@pytest.mark.parametrize("T,E,k", [(0, 4, 1), (1, 1, 1), (7, 3, 2), (64, 16, 1), (50, 128, 4)])
def test_fused_moe(T, E, k, on_input):
    x, gate_up, down, w, ids = _moe_inputs(T, E, 24, 40, k)
    out = ops.fused_moe(x, gate_up, down, w, ids, apply_router_weight_on_input=on_input)
    assert out.shape == (T, 24) and out.dtype == x.dtype
    if T:
        assert_close(out, moe64(x, gate_up, down, w, ids, on_input))


def test_fused_moe_all_tokens_on_one_expert_and_empty_experts():
    x, gate_up, down, w, ids = _moe_inputs(33, 8, 16, 8, 1)
    ids.fill_(5)
    assert_close(ops.fused_moe(x, gate_up, down, w, ids), moe64(x, gate_up, down, w, ids))


def test_fused_moe_runs_only_selected_experts():
    # Poison the unselected experts: a dense all-experts implementation would return NaN.
    x, gate_up, down, w, ids = _moe_inputs(10, 8, 16, 8, 1)
    ids.copy_(torch.arange(10).remainder(2)[:, None])
    gate_up[2:] = float("nan")
    down[2:] = float("nan")
    assert torch.isfinite(ops.fused_moe(x, gate_up, down, w, ids)).all()


def test_fused_moe_half_precision():
    x, gate_up, down, w, ids = _moe_inputs(40, 8, 32, 16, 2, torch.float16)
    assert_close(ops.fused_moe(x, gate_up, down, w, ids), moe64(x, gate_up, down, w, ids), torch.float16)


ATTN_CASES = [
    # B, Hq, Hkv, Sq, Skv, chunk, kv_start
    (1, 4, 4, 19, 19, None, 0),
    (2, 4, 2, 33, 33, 8, 0),
    (1, 10, 2, 5, 40, 16, 0),  # continued prefill, GQA group 5
    (2, 4, 1, 1, 9, 8, 13),  # decode, kv_start crosses a chunk boundary
    (1, 2, 2, 700, 700, 300, 0),  # several query blocks, chunk not a block multiple
]


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Skv,chunk,kv_start", ATTN_CASES)
def test_attention(B, Hq, Hkv, Sq, Skv, chunk, kv_start):
    q, k, v = torch.randn(B, Hq, Sq, 16), torch.randn(B, Hkv, Skv, 16), torch.randn(B, Hkv, Skv, 16)
    out = ops.attention(q, k, v, chunk_size=chunk, kv_start=kv_start)
    assert_close(out, attention64(q, k, v, chunk, None, kv_start))


def test_attention_left_padding_per_sequence_start():
    B, Sq = 3, 21
    q, k, v = torch.randn(B, 4, Sq, 8), torch.randn(B, 2, Sq, 8), torch.randn(B, 2, Sq, 8)
    starts = torch.tensor([0, -5, -12], dtype=torch.int32)  # 0, 5 and 12 padding tokens
    out = ops.attention(q, k, v, chunk_size=4, scale=0.3, kv_start=starts)
    ref = attention64(q, k, v, 4, 0.3, starts)
    assert_close(out, ref)
    assert torch.all(out[2, :, :12] == 0)  # padding queries see no key


def test_attention_accepts_transposed_views():
    # transformers hands q/k/v as [B, S, H, D].transpose(1, 2): non-contiguous views
    q, k, v = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    assert_close(ops.attention(q, k, v, chunk_size=4), attention64(q, k, v, 4))


def test_rms_norm_and_l2_norm():
    x, w = torch.randn(6, 5, 32), torch.randn(32)
    assert_close(ops.rms_norm(x, w, 1e-5), rms_norm64(x, w, 1e-5))
    assert_close(ops.rms_norm(x, None, 1e-6), rms_norm64(x, None, 1e-6))
    xh = x.half()
    assert ops.rms_norm(xh, None, 1e-6).dtype == torch.float16


def test_rope():
    x = torch.randn(2, 7, 3, 16)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    pos = torch.arange(100, 107).float()
    freqs = pos[:, None] * inv_freq
    out = ops.rope(x, torch.cos(freqs)[None], torch.sin(freqs)[None])
    assert_close(out, rope64(x, pos, inv_freq))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.route(torch.randn(4, 8), 9), "top_k must be in"),
    (lambda: ops.route(torch.randn(4, 8), 0), "top_k must be in"),
    (lambda: ops.route(torch.randn(4, 8), 1, "relu"), "scoring must be one of"),
    (lambda: ops.route(torch.randn(4, 8, 2), 1), "router_logits must have 2"),
    (lambda: ops.route(torch.randn(4, 8), 1, "sigmoid", True), "renormalize"),
    (lambda: ops.route(torch.randint(0, 3, (4, 8)), 1), "router_logits must have dtype"),
])
def test_route_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def _good_moe():
    return _moe_inputs(5, 4, 8, 6, 2)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__(4, a[4].fill_(4)), r"topk_ids must lie in \[0, 4\)"),
    (lambda a: a.__setitem__(4, a[4].fill_(-1)), r"topk_ids must lie in"),
    (lambda a: a.__setitem__(1, a[1].half()), "gate_up_proj has dtype"),
    (lambda a: a.__setitem__(2, a[2][:, :5]), "down_proj must be"),
    (lambda a: a.__setitem__(1, a[1][:, :7]), "gate_up_proj must be"),
    (lambda a: a.__setitem__(1, a[1][..., :11]), "must be even"),
    (lambda a: a.__setitem__(3, a[3][:4]), "must both be"),
    (lambda a: a.__setitem__(4, a[4].float()), "topk_ids must have dtype"),
    (lambda a: a.__setitem__(0, a[0][None]), "hidden_states must have 2"),
])
def test_fused_moe_bad_input(mutate, match):
    args = list(_good_moe())
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.fused_moe(*args)


def test_fused_moe_top_k_above_experts():
    x, gate_up, down, w, ids = _moe_inputs(5, 2, 8, 6, 2)
    with pytest.raises(ValueError, match="exceeds the number of experts"):
        ops.fused_moe(x, gate_up, down, torch.rand(5, 3), torch.zeros(5, 3, dtype=torch.int32))


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=torch.randn(1, 3, 4, 8)), "multiple of the KV heads"),
    (dict(q=torch.randn(1, 4, 9, 8)), "queries are the last Sq"),
    (dict(q=torch.randn(1, 4, 4, 8).half()), "share a dtype"),
    (dict(k=torch.randn(1, 2, 5, 8)), "must have the same shape"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(kv_start=torch.zeros(3, dtype=torch.int32)), r"kv_start must be an int or a \[B=1\]"),
    (dict(kv_start=1.5), "kv_start must be an int"),
    (dict(q=torch.randn(4, 4, 8)), "q must have 4 dimensions"),
])
def test_attention_bad_input(kwargs, match):
    args = dict(q=torch.randn(1, 4, 4, 8), k=torch.randn(1, 2, 8, 8), v=torch.randn(1, 2, 8, 8))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises((ValueError, TypeError), match=match):
        ops.attention(q, k, v, **args)


def test_rms_norm_and_rope_bad_input():
    with pytest.raises(ValueError, match="weight has 4 elements"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="eps must be"):
        ops.rms_norm(torch.randn(2, 8), None, -1.0)
    with pytest.raises(ValueError, match="cos must be"):
        ops.rope(torch.randn(1, 3, 2, 8), torch.ones(1, 3, 3), torch.ones(1, 3, 4))


def test_reference_error_metric_rejects_nan():
    assert rel_err(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")
