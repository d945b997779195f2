"""qk_prologue (RoPE + L2 qk-norm + NoPE temperature in one launch): the Triton kernel through the
interpreter on CPU (compiled on a GPU) against float64 references, the torch backend against the
separate ops it replaces, the pass-through / out-buffer rules, and bad input."""

import pytest
import torch

from helpers import TOL, assert_close, poisoned, rel_err
from llama4_fast import kernels, ops, registry
from reference64 import rms_norm64, rope64, temperature64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32]
THETA = 5e5
EPS = 1e-5


def inv_freq(D):
    return 1.0 / THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D)


def tables(positions, D):
    """cos, sin [B or 1, S, D/2] float32 from positions [S] or [B, S], as the model builds them."""
    pos = positions.reshape(-1, positions.shape[-1]).float()
    freqs = pos[..., None] * inv_freq(D).to(pos.device)
    return torch.cos(freqs), torch.sin(freqs)


def projection_views(B, S, Hq, Hkv, D, dtype):
    """q [B, S, Hq, D], k [B, S, Hkv, D] as strided views of one fused q|k|v projection output
    [B, S, (Hq + 2 Hkv) D], the layout a fused QKV GEMM produces."""
    qkv = torch.randn(B, S, (Hq + 2 * Hkv) * D, device=DEVICE).to(dtype)
    q = qkv[..., :Hq * D].unflatten(-1, (Hq, D))
    k = qkv[..., Hq * D:(Hq + Hkv) * D].unflatten(-1, (Hkv, D))
    assert not q.is_contiguous() and not k.is_contiguous()
    return q, k


def reference64(q, k, rope_positions=None, D=None, eps=None, temp_positions=None, temperature=None):
    q64, k64 = q.double().cpu(), k.double().cpu()
    if rope_positions is not None:
        q64, k64 = rope64(q64, rope_positions.cpu(), inv_freq(D)), rope64(k64, rope_positions.cpu(), inv_freq(D))
    if eps is not None:
        q64, k64 = rms_norm64(q64, None, eps), rms_norm64(k64, None, eps)
    if temperature is not None:
        q64 = temperature64(q64, temp_positions.cpu(), *temperature)
    return q64, k64


# (B, S, Hq, Hkv, D): odd S and head counts, several head blocks (Hq=11 at D>=80), a
# non-power-of-two head dim (80), one token, and Llama 4's head dim.
SHAPES = [(2, 3, 11, 3, 128), (1, 5, 5, 1, 64), (2, 1, 4, 2, 32), (1, 3, 11, 3, 80)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-Hq{}-Hkv{}-D{}".format(*s))
def test_rope_and_qk_norm_match_float64(shape, dtype):
    """A RoPE layer with qk-norm, per-sequence positions (one sequence left-padded), strided
    views in, poisoned out buffers."""
    B, S, Hq, Hkv, D = shape
    q, k = projection_views(B, S, Hq, Hkv, D, dtype)
    positions = torch.arange(S, device=DEVICE)[None] + torch.tensor([[40], [-2]], device=DEVICE)[:B]
    cos, sin = tables(positions, D)
    q_out, k_out = poisoned(q.shape, dtype, DEVICE), poisoned(k.shape, dtype, DEVICE)
    got_q, got_k = kernels.qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=EPS, q_out=q_out, k_out=k_out)
    assert got_q is q_out and got_k is k_out
    ref_q, ref_k = reference64(q, k, positions, D, EPS)
    assert_close(got_q, ref_q, dtype)
    assert_close(got_k, ref_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
def test_qk_norm_of_small_heads_keeps_eps_inside_the_mean_square(dtype):
    """Heads whose mean square is near eps (1e-5): x * rsqrt(mean(x^2) + eps) differs there from
    x / (norm + eps) or rsqrt(mean(x^2)) + eps by percents, not by rounding."""
    B, S, Hq, Hkv, D = 1, 2, 4, 2, 64
    q, k = projection_views(B, S, Hq, Hkv, D, torch.float32)
    head_scale = torch.tensor([1e-3, 3e-3, 1e-2, 1.0], device=DEVICE)
    q, k = (q * head_scale[:Hq, None]).to(dtype), (k * head_scale[:Hkv, None]).to(dtype)
    got_q, got_k = kernels.qk_prologue(q, k, qk_norm_eps=EPS, q_out=poisoned(q.shape, dtype, DEVICE),
                                       k_out=poisoned(k.shape, dtype, DEVICE))
    ref_q, ref_k = reference64(q, k, eps=EPS)
    assert_close(got_q, ref_q, dtype)
    assert_close(got_k, ref_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
def test_rope_only_with_shared_tables_and_new_outputs(dtype):
    """Maverick's RoPE layers (no qk-norm): one [1, S, D/2] table for the batch; the kernel
    allocates contiguous outputs; cos/sin given as strided views of a complex freqs_cis."""
    B, S, Hq, Hkv, D = 2, 7, 5, 1, 64
    q, k = projection_views(B, S, Hq, Hkv, D, dtype)
    positions = torch.arange(100, 100 + S, device=DEVICE)
    cos, sin = tables(positions, D)
    freqs_cis = torch.complex(cos, sin)  # transformers' layout; .real / .imag have stride 2
    got_q, got_k = kernels.qk_prologue(q, k, cos=freqs_cis.real, sin=freqs_cis.imag)
    assert got_q.is_contiguous() and got_k.is_contiguous() and got_q.shape == q.shape
    ref_q, ref_k = reference64(q, k, positions, D)
    assert_close(got_q, ref_q, dtype)
    assert_close(got_k, ref_k, dtype)


@pytest.mark.parametrize("positions_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
def test_temperature_matches_float64_at_floor_boundaries(dtype, positions_dtype):
    """NoPE layer: q scaled, k passed through untouched (the same tensor). Positions sit on both
    sides of multiples of floor_scale (pos + 1 = m * floor_scale exactly), with a floor_scale
    that is not a power of two, and per-sequence positions."""
    B, S, Hq, Hkv, D = 2, 6, 5, 1, 32
    q, k = projection_views(B, S, Hq, Hkv, D, dtype)
    floor_scale, attn_scale = 7.0, 0.1
    positions = torch.tensor([[0, 5, 6, 7, 13, 20], [26, 27, 69, 699_999, 700_000, 1_048_575]],
                             dtype=positions_dtype, device=DEVICE)
    q_out = poisoned(q.shape, dtype, DEVICE)
    got_q, got_k = kernels.qk_prologue(q, k, positions=positions, temperature=(floor_scale, attn_scale), q_out=q_out)
    assert got_k is k
    ref_q = temperature64(q, positions.cpu(), floor_scale, attn_scale)
    # One rounding of q * scale: fp32 is exact to a few ulp, so an off-by-one floor would show.
    assert_close(got_q, ref_q, dtype, tol=TOL[dtype] if dtype == torch.float16 else 1e-6)
    # Llama 4's floor_scale 8192 with one [S] positions vector shared by the batch.
    positions = torch.tensor([0, 8190, 8191, 8192, 16383, 1_000_000], dtype=positions_dtype, device=DEVICE)
    got_q, _ = kernels.qk_prologue(q, k, positions=positions, temperature=(8192.0, 0.1))
    assert_close(got_q, temperature64(q, positions.cpu(), 8192.0, 0.1), dtype,
                 tol=TOL[dtype] if dtype == torch.float16 else 1e-6)


def test_all_steps_together_and_one_step_each():
    """The switches compose in the documented order (RoPE, norm, temperature) and each works
    alone; qk-norm alone also writes k."""
    B, S, Hq, Hkv, D = 1, 3, 3, 1, 32
    q, k = projection_views(B, S, Hq, Hkv, D, torch.float32)
    positions = torch.arange(5, 5 + S, device=DEVICE)
    cos, sin = tables(positions, D)
    got = kernels.qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=EPS, positions=positions, temperature=(4.0, 0.5))
    ref = reference64(q, k, positions, D, EPS, positions, (4.0, 0.5))
    for g, r in zip(got, ref):
        assert_close(g, r)
    got = kernels.qk_prologue(q, k, qk_norm_eps=EPS)
    ref = reference64(q, k, eps=EPS)
    for g, r in zip(got, ref):
        assert_close(g, r)


def test_out_buffers_in_attention_and_cache_layouts():
    """q' straight into attention's [B, Hq, S, D] layout and k' into a slice of a [B, Hkv, L, D]
    KV cache (both as [B, S, H, D] views); nothing outside the slice is written. Without a
    transform, an out buffer receives a copy."""
    B, S, Hq, Hkv, D, L = 2, 3, 5, 1, 64, 8
    q, k = projection_views(B, S, Hq, Hkv, D, torch.float16)
    positions = torch.arange(2, 2 + S, device=DEVICE)
    cos, sin = tables(positions, D)
    q_attn = poisoned((B, Hq, S, D), torch.float16, DEVICE)
    cache = poisoned((B, Hkv, L, D), torch.float16, DEVICE)
    got_q, got_k = kernels.qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=EPS,
                                       q_out=q_attn.transpose(1, 2), k_out=cache[:, :, 2:2 + S].transpose(1, 2))
    ref_q, ref_k = reference64(q, k, positions, D, EPS)
    assert_close(q_attn.transpose(1, 2), ref_q, torch.float16)
    assert_close(cache[:, :, 2:2 + S].transpose(1, 2), ref_k, torch.float16)
    assert cache[:, :, :2].isnan().all() and cache[:, :, 2 + S:].isnan().all()
    # NoPE layer writing its unchanged k into the cache: a plain copy, q scaled.
    cache = poisoned((B, Hkv, L, D), torch.float16, DEVICE)
    kernels.qk_prologue(q, k, positions=positions, temperature=(8192.0, 0.1),
                        k_out=cache[:, :, :S].transpose(1, 2))
    assert torch.equal(cache[:, :, :S].transpose(1, 2), k) and cache[:, :, S:].isnan().all()
    # No transform at all: inputs come back as they are.
    same_q, same_k = kernels.qk_prologue(q, k)
    assert same_q is q and same_k is k
    empty_q, empty_k = kernels.qk_prologue(q[:, :0], k[:, :0], cos=cos[:, :0], sin=sin[:, :0])
    assert empty_q.shape == (B, 0, Hq, D) and empty_k.shape == (B, 0, Hkv, D)


def test_torch_backend_is_the_separate_ops_chain():
    """The torch backend is, bit for bit, today's ops.rope -> ops.rms_norm chain and the thin
    model's temperature code."""
    B, S, Hq, Hkv, D = 2, 4, 4, 2, 32
    q, k = projection_views(B, S, Hq, Hkv, D, torch.float16)
    start = 9
    positions = torch.arange(start, start + S, device=DEVICE)
    cos, sin = tables(positions, D)
    with registry.use("torch"):
        got_q, got_k = ops.qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=EPS)
        want_q = ops.rms_norm(ops.rope(q, cos, sin), None, EPS)
        want_k = ops.rms_norm(ops.rope(k, cos, sin), None, EPS)
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
        got_q, got_k = ops.qk_prologue(q, k, positions=positions, temperature=(3.0, 0.1))
    pos = torch.arange(start, start + S, device=DEVICE, dtype=torch.float32)  # model.Attention.forward
    scale = torch.log1p(torch.floor((pos + 1.0) / 3.0)) * 0.1 + 1.0
    assert torch.equal(got_q, (q * scale[None, :, None, None]).to(q.dtype)) and got_k is k


def test_triton_backend_through_the_registry():
    """ops.qk_prologue reaches the triton backend (interpreter on CPU) and agrees with the torch
    backend within one rounding; bf16 on CPU falls through to torch."""
    B, S, Hq, Hkv, D = 2, 3, 5, 1, 32
    q, k = projection_views(B, S, Hq, Hkv, D, torch.float16)
    positions = torch.arange(S, device=DEVICE)
    cos, sin = tables(positions, D)
    with registry.record() as calls:
        got = ops.qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=EPS)
        nope = ops.qk_prologue(q, k, positions=positions, temperature=(2.0, 0.1))
    assert calls[("qk_prologue", "triton")] == 2
    assert nope[1] is k
    with registry.use("torch"):
        want = ops.qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=EPS)
        want_nope = ops.qk_prologue(q, k, positions=positions, temperature=(2.0, 0.1))
    for g, w in zip((*got, nope[0]), (*want, want_nope[0])):
        assert rel_err(g, w) < 2e-3
    if DEVICE == "cpu":
        with registry.record() as calls:
            ops.qk_prologue(q.bfloat16(), k.bfloat16(), cos=cos, sin=sin)
        assert calls[("qk_prologue", "torch")] == 1


def _bad(q, k, **kw):
    kernels.qk_prologue(q, k, **kw)


def test_bad_input_names_the_argument():
    B, S, Hq, Hkv, D = 1, 3, 4, 2, 16
    q = torch.randn(B, S, Hq, D, device=DEVICE)
    k = torch.randn(B, S, Hkv, D, device=DEVICE)
    cos, sin = tables(torch.arange(S, device=DEVICE), D)
    pos = torch.arange(S, device=DEVICE)
    temp = (8192.0, 0.1)
    cases = [
        (ValueError, "q must have 4", dict(q=q[0])),
        (TypeError, "q and k must share a dtype", dict(k=k.half())),
        (ValueError, "k must be", dict(k=torch.randn(B, S + 1, Hkv, D, device=DEVICE))),
        (ValueError, "cos and sin", dict(cos=cos)),
        (ValueError, "sin must be", dict(cos=cos, sin=sin[:, :, :-1])),
        (TypeError, "cos must have dtype", dict(cos=cos.double(), sin=sin)),
        (ValueError, "even", dict(q=q[..., :15], k=k[..., :15], cos=cos[..., :7], sin=sin[..., :7])),
        (ValueError, "qk_norm_eps", dict(qk_norm_eps=-1.0)),
        (ValueError, "positions is required", dict(temperature=temp)),
        (ValueError, "positions is only used", dict(positions=pos)),
        (ValueError, "positions must be", dict(positions=pos[None].expand(2, S), temperature=temp)),
        (TypeError, "positions must have dtype", dict(positions=pos.float(), temperature=temp)),
        (TypeError, "temperature must be", dict(positions=pos, temperature=8192.0)),
        (ValueError, "floor_scale must be positive", dict(positions=pos, temperature=(0.0, 0.1))),
        (ValueError, "q_out must have q's shape", dict(qk_norm_eps=EPS, q_out=torch.empty_like(k))),
        (ValueError, "k_out has overlapping elements", dict(qk_norm_eps=EPS, k_out=k[:, :1].expand_as(k))),
    ]
    for exc, match, kw in cases:
        args = dict(q=q, k=k)
        args.update(kw)
        with pytest.raises(exc, match=match):
            _bad(**args)
        with pytest.raises(exc, match=match):  # the ops front door validates the same way
            ops.qk_prologue(**args)
    if DEVICE == "cpu":
        with pytest.raises(TypeError, match="bfloat16"):
            kernels.qk_prologue(q.bfloat16(), k.bfloat16(), qk_norm_eps=EPS)


def test_traces_under_torch_compile():
    """The triton backend's mutating custom op and its fake traced by dynamo + AOT autograd in one
    graph (fullgraph), both layer kinds, outputs equal to eager."""
    B, S, Hq, Hkv, D = 1, 3, 4, 2, 16
    q, k = projection_views(B, S, Hq, Hkv, D, torch.float16)
    positions = torch.arange(S, device=DEVICE)
    cos, sin = tables(positions, D)

    def layers(q, k, cos, sin, positions):
        rq, rk = ops.qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=EPS)
        nq, nk = ops.qk_prologue(q, k, positions=positions, temperature=(2.0, 0.1))
        return rq, rk, nq, nk * 2  # nk is k itself: an input, not an op output

    with registry.record() as calls:
        got = torch.compile(layers, backend="aot_eager", fullgraph=True)(q, k, cos, sin, positions)
    assert calls[("qk_prologue", "triton")] == 2
    for a, b in zip(got, layers(q, k, cos, sin, positions)):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_bf16_and_cuda_graph_replay():
    """Llama 4 heads in bf16 against float64; the op captured in a CUDA graph and replayed after
    the positions, tables and inputs change in place (no host sync, nothing baked in)."""
    B, S, Hq, Hkv, D = 2, 37, 40, 8, 128
    q, k = projection_views(B, S, Hq, Hkv, D, torch.bfloat16)
    positions = torch.arange(S, device=DEVICE)[None] + torch.tensor([[0], [8000]], device=DEVICE)
    cos, sin = tables(positions, D)
    got_q, got_k = ops.qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=EPS)
    ref_q, ref_k = reference64(q, k, positions, D, EPS)
    assert_close(got_q, ref_q, torch.bfloat16)
    assert_close(got_k, ref_k, torch.bfloat16)

    def layers():
        rq, rk = ops.qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=EPS)
        nq, _ = ops.qk_prologue(q, k, positions=positions, temperature=(8192.0, 0.1))
        return rq, rk, nq

    layers()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = layers()
    positions += 9000
    new_cos, new_sin = tables(positions, D)
    cos.copy_(new_cos)
    sin.copy_(new_sin)
    q.copy_(torch.randn_like(q))
    graph.replay()
    for a, b in zip(outs, layers()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    ref_q, ref_k = reference64(q, k, positions, D, EPS)  # the replay is right, not only repeatable
    for got, ref in zip(outs, (ref_q, ref_k, temperature64(q, positions.cpu(), 8192.0, 0.1))):
        assert_close(got, ref, torch.bfloat16)
