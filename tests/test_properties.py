"""Property-based battery (hypothesis) over the public kernels and ops.

Random small shapes (the interpreter is slow), strides (transposed, sliced, fused-buffer
views), dtypes (fp16/fp32 activations, fp8 and int4 weights), NaN/inf placement and bad
arguments, through `llama4_fast.kernels` and through `llama4_fast.ops` with each backend
(`registry.use`). Every case either matches the float64 reference (tests/reference64.py, or
the dequantized-weight reference for quantized formats) or raises a ValueError/TypeError whose
message names the argument. "Matches" means: non-finite exactly where the reference is (NaN
where it is NaN, inf of the same sign), the finite rest within DESIGN's relative-norm bounds.

The NaN/inf semantics checked (reasons in the kernels' docstrings):
- FP8 activation quantization: a NaN in a row (or 1x128 group) makes its scale and every q
  NaN; an inf without scale_ub makes the scale inf, so the GEMM row is non-finite; with
  scale_ub an inf saturates (finite). Under the interpreter tl.dot reads e4m3's NaN as 480,
  so such a row comes out +-inf rather than NaN there: FP8 rows compare non-finite-ness only.
- Attention: per-row softmax math; a row that sees no key is zeros; NaN/inf in k or in the v
  of keys nobody in the block sees (padding, past kv_len) never matters; a non-finite v of a
  key that a row does not see but another row does may reach it (0 x NaN in a shared tile):
  those rows are not compared.
- Routing: NaN ranks highest; its weight is NaN.

Seeded (derandomize=True, no example database), bounded (max_examples per test), no deadline:
about 40 s on two cores. The bad-argument tests build CPU tensors and run without a GPU (some
checks, such as ids in range, read CPU tensors only); the rest also runs on CUDA, bf16 included.
"""

import math
from unittest import mock

import pytest
import torch
from helpers import TOL, poisoned, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference64 import moe64, quant_matmul64, quant_moe64, rms_norm64, route64, temperature64, visible64

from llama4_fast import kernels, ops, registry
from llama4_fast.kernels import attention as attention_module
from llama4_fast.kernels.routing import dispatch_metadata
from llama4_fast.quant import Fp8Weight, Int4Weight, expert_kernel_args, kernel_args

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter, on NaN

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
PATHS = ["kernel", "triton", "torch"]  # the launcher itself, or ops.* through a backend
NONFINITE = [float("nan"), float("inf"), float("-inf")]
FP8_TOL = 1e-2  # fp8/int4 against the dequantized-weight reference (DESIGN)


# Validation is the same on every device, and some of it (ids in range, kv_len bounds) runs on
# CPU tensors only: the bad-argument tests build CPU tensors and run where the interpreter does.
cpu_only = pytest.mark.skipif(DEVICE == "cuda", reason="bad arguments are checked on CPU tensors")


def examples(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def relayout(t, kind):
    """t's values stored another way: "contiguous", "transposed" (last two dims swapped in
    memory) or "sliced" (every other element of a wider last dimension)."""
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced"])


def poison(t, spots):
    """A copy of t with the values of `spots` [(position in [0, 1), value)] written in."""
    t = t.clone()
    flat = t.view(-1) if t.is_contiguous() else None
    for frac, value in spots:
        if t.numel():
            idx = int(frac * t.numel())
            if flat is not None:
                flat[idx] = value
            else:
                t[torch.unravel_index(torch.tensor(idx), t.shape)] = value
    return t


def spots(values=NONFINITE, max_size=2):
    return st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(values)), max_size=max_size)


def run(path, op, kernel_call, op_call):
    """kernel_call() for the launcher path, else op_call() with ops' `op` on that backend."""
    if path == "kernel":
        return kernel_call()
    with registry.use(**{op: path}):
        return op_call()


def assert_matches(out, ref, tol, *, nan_exact=True, skip=None):
    """out against the float64 reference ref (see the module docstring). nan_exact=False
    accepts +-inf where ref is NaN (and the reverse); skip: elements not compared."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    keep = torch.ones_like(ref, dtype=torch.bool) if skip is None else ~skip
    bad_out, bad_ref = ~out.isfinite() & keep, ~ref.isfinite() & keep
    differ = (bad_out != bad_ref).nonzero()
    assert not len(differ), (f"non-finite mismatch at {differ[:4].tolist()}: out {out[tuple(differ[0])].item()} "
                             f"vs reference {ref[tuple(differ[0])].item()}")
    if nan_exact:
        assert torch.equal(out.isnan() & keep, ref.isnan() & keep), "NaN where the reference has +-inf (or back)"
        infs = ref.isinf() & keep
        assert torch.equal(out[infs], ref[infs]), "inf of the wrong sign"
    finite = keep & ~bad_ref
    err = rel_err(out[finite], ref[finite]) if finite.any() else 0.0
    assert err < tol, f"relative error {err:.3g} >= {tol:g}"


def raises_naming(name, call, errors=(ValueError, TypeError)):
    with pytest.raises(errors) as info:
        call()
    assert name in str(info.value), f"error does not name {name!r}: {info.value}"


# ----------------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------------

@examples(25)
@given(data=st.data(), T=st.integers(0, 5), E=st.integers(1, 12), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), layout=LAYOUTS, path=st.sampled_from(PATHS),
       scoring=st.sampled_from(["sigmoid", "softmax"]), bad=spots(max_size=2))
def test_route(data, T, E, seed, dtype, layout, path, scoring, bad):
    top_k = data.draw(st.integers(1, E), "top_k")
    renormalize = scoring == "softmax" and data.draw(st.booleans(), "renormalize")
    logits = relayout(poison(randn((T, E), dtype, seed), bad), layout)
    weights, ids = run(path, "route", lambda: kernels.route(logits, top_k, scoring, renormalize),
                       lambda: ops.route(logits, top_k, scoring, renormalize))
    ref_w, ref_ids = route64(logits, top_k, scoring, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert_matches(weights, ref_w, 1e-5)
    assert torch.equal(ids.cpu().long(), ref_ids)


@cpu_only
@examples(20)
@given(data=st.data(), T=st.integers(1, 4), E=st.integers(1, 6))
def test_route_bad_arguments(data, T, E):
    logits = randn((T, E), torch.float32, 0)
    name, args = data.draw(st.sampled_from([
        ("top_k", (logits, 0)), ("top_k", (logits, E + 1)), ("top_k", (logits, 1.0)), ("top_k", (logits, True)),
        ("top_k", (logits, "1")), ("scoring", (logits, 1, "relu")), ("renormalize", (logits, 1, "sigmoid", True)),
        ("router_logits", (logits[0], 1)), ("router_logits", (logits[None], 1)),
        ("router_logits", (logits.to(torch.int32), 1)), ("router_logits", (logits.tolist(), 1)),
    ]), "bad call")
    raises_naming(name, lambda: kernels.route(*args))
    raises_naming(name, lambda: ops.route(*args))


# ----------------------------------------------------------------------------------------------
# fused_moe: dense and quantized experts
# ----------------------------------------------------------------------------------------------

def moe_inputs(T, E, H, I, top_k, dtype, seed):
    x = randn((T, H), dtype, seed)
    w13 = randn((E, H, 2 * I), dtype, seed + 1, H ** -0.5)
    w2 = randn((E, I, H), dtype, seed + 2, I ** -0.5)
    g = torch.Generator().manual_seed(seed + 3)
    ids = torch.randint(0, E, (T, top_k), generator=g, dtype=torch.int32).to(DEVICE)  # repeats allowed
    weights = (torch.rand(T, top_k, generator=g) + 0.5).to(DEVICE)
    return x, w13, w2, weights, ids


@examples(20)
@given(data=st.data(), T=st.integers(0, 5), E=st.integers(1, 4), H=st.sampled_from([8, 16, 24]),
       I=st.sampled_from([4, 8, 12]), seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES), layout=LAYOUTS,
       on_input=st.booleans(), path=st.sampled_from(PATHS))
def test_fused_moe(data, T, E, H, I, seed, dtype, layout, on_input, path):
    top_k = data.draw(st.integers(1, min(E, 3)), "top_k")
    x, w13, w2, weights, ids = moe_inputs(T, E, H, I, top_k, dtype, seed)
    target = data.draw(st.sampled_from(["none", "x", "gate_up_proj", "down_proj", "topk_weights"]), "poison")
    if target == "x":
        x = poison(x, data.draw(spots(), "x spots"))
    elif target in ("gate_up_proj", "down_proj"):
        w = poison(w13 if target == "gate_up_proj" else w2, data.draw(spots([float("nan"), float("inf")], 1)))
        w13, w2 = (w, w2) if target == "gate_up_proj" else (w13, w)
    elif target == "topk_weights":
        weights = poison(weights, data.draw(spots([float("nan")], 1), "weight spots"))
    x = relayout(x, layout)
    out = poisoned(x.shape, dtype, DEVICE) if data.draw(st.booleans(), "out") else None
    y = run(path, "fused_moe",
            lambda: kernels.fused_moe(x, w13, w2, weights, ids, apply_router_weight_on_input=on_input, out=out),
            lambda: ops.fused_moe(x, w13, w2, weights, ids, apply_router_weight_on_input=on_input))
    assert y.dtype == dtype and (out is None or path != "kernel" or y.data_ptr() == out.data_ptr())
    assert_matches(y, moe64(x, w13, w2, weights, ids, on_input), TOL[dtype])


QUANT_FORMATS = [("fp8", "channel", None), ("fp8", "tensor", 2.0), ("fp8", "block", None), ("int4", True, None),
                 ("int4", False, None)]


def quantize(fmt, w):
    kind, option, ub = fmt
    return Fp8Weight.quantize(w, option, act_scale_ub=ub) if kind == "fp8" else Int4Weight.quantize(w, 32, option)


@examples(12)
@given(data=st.data(), fmt=st.sampled_from(QUANT_FORMATS), T=st.integers(1, 4), E=st.integers(1, 3),
       H=st.sampled_from([32, 64]), seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES),
       on_input=st.booleans(), path=st.sampled_from(PATHS), bad=spots())
def test_fused_moe_quantized(data, fmt, T, E, H, seed, dtype, on_input, path, bad):
    I = 32 if fmt[0] == "int4" else data.draw(st.sampled_from([8, 24, 32]), "I")
    top_k = data.draw(st.integers(1, min(E, 2)), "top_k")
    x, w13, w2, weights, ids = moe_inputs(T, E, H, I, top_k, dtype, seed)
    w13, w2, x = quantize(fmt, w13.float()), quantize(fmt, w2.float()), poison(x, bad)
    y = run(path, "fused_moe",
            lambda: kernels.fused_moe(x, w13.tensors()[0], w2.tensors()[0], weights, ids,
                                      apply_router_weight_on_input=on_input, **expert_kernel_args(w13, w2)),
            lambda: ops.fused_moe(x, w13, w2, weights, ids, apply_router_weight_on_input=on_input))
    assert_matches(y, quant_moe64(x, w13, w2, weights, ids, on_input), FP8_TOL,
                   nan_exact=fmt[0] == "int4" or DEVICE == "cuda")


@cpu_only
@examples(25)
@given(data=st.data(), T=st.integers(1, 3), E=st.integers(2, 4))
def test_fused_moe_bad_arguments(data, T, E):
    x, w13, w2, weights, ids = moe_inputs(T, E, 16, 8, 1, torch.float32, 0)
    ok = dict(hidden_states=x, gate_up_proj=w13, down_proj=w2, topk_weights=weights, topk_ids=ids)
    name, change = data.draw(st.sampled_from([
        ("hidden_states", dict(hidden_states=x[0])), ("hidden_states", dict(hidden_states=x.to(torch.int32))),
        ("gate_up_proj", dict(gate_up_proj=w13[..., :-1])), ("gate_up_proj", dict(gate_up_proj=w13.half())),
        ("gate_up_proj", dict(gate_up_proj=w13[:, :-1])), ("down_proj", dict(down_proj=w2[:, :-1])),
        ("down_proj", dict(down_proj=w2[:-1])), ("topk_ids", dict(topk_ids=ids.float())),
        ("topk_ids", dict(topk_ids=ids + E)), ("topk_ids", dict(topk_ids=ids - E)),
        ("topk_ids", dict(topk_ids=ids[:-1])), ("top_k", dict(topk_ids=torch.zeros(T, E + 1, dtype=torch.int32),
                                                              topk_weights=torch.ones(T, E + 1))),
        ("topk_weights", dict(topk_weights=weights[:, None])), ("topk_weights", dict(topk_weights=weights.int())),
    ]), "bad call")
    args = {**ok, **change}
    raises_naming(name, lambda: kernels.fused_moe(*args.values()))
    raises_naming(name, lambda: ops.fused_moe(*args.values()))
    out_name, out = data.draw(st.sampled_from([
        ("out", torch.empty(T, 15)), ("out", torch.empty(T, 16, dtype=torch.float16)),
        ("out", torch.empty(T, 1).expand(T, 16)), ("out", w2[0, :T]),
    ]), "bad out")
    raises_naming(out_name, lambda: kernels.fused_moe(*ok.values(), out=out))


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

def attention_rows64(q, k, v, chunk_size, scale, kv_start, kv_len):
    """reference64.attention64's math, restated with kv_len and with each query summing over
    the keys it sees only (so NaN/inf elsewhere never reaches it: the exact per-row semantics).
    Returns (out [B, Hq, Sq, D] float64, visible [B, Sq, Skv])."""
    B, Hq, Sq, D = q.shape
    Skv, group = k.shape[2], Hq // k.shape[1]
    k, v = (t.detach().double().cpu().repeat_interleave(group, 1) for t in (k, v))
    visible = torch.zeros(B, Sq, Skv, dtype=torch.bool)
    for b in range(B):
        n = Skv if kv_len is None else int(kv_len[b])
        start = kv_start if isinstance(kv_start, int) else int(kv_start[b])
        visible[b, :, :n] = visible64(1, Sq, n, chunk_size, start)[0]
    scale = D ** -0.5 if scale is None else scale
    scores = (q.detach().double().cpu() @ k.transpose(-1, -2) * scale).masked_fill(~visible[:, None], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    terms = torch.where(visible[:, None, :, :, None], probs[..., None] * v[:, :, None], 0.0)
    return terms.sum(-2).masked_fill(~visible[:, None, :, :, None].any(-2), 0.0), visible


@examples(30)
@given(data=st.data(), B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.integers(1, 3),
       Sq=st.sampled_from([1, 2, 3, 5, 17]), extra=st.integers(0, 8), D=st.sampled_from([4, 8, 16, 24]),
       chunk=st.one_of(st.none(), st.integers(1, 8)), seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES),
       path=st.sampled_from(PATHS), splits=st.integers(1, 3))
def test_attention(data, B, Hkv, group, Sq, extra, D, chunk, seed, dtype, path, splits):
    Hq, Skv = Hkv * group, Sq + extra
    q, k, v = randn((B, Hq, Sq, D), dtype, seed), randn((B, Hkv, Skv, D), dtype, seed + 1), \
        randn((B, Hkv, Skv, D), dtype, seed + 2)
    if data.draw(st.booleans(), "kv_start tensor"):
        kv_start = torch.tensor(data.draw(st.lists(st.integers(-6, 6), min_size=B, max_size=B)), device=DEVICE)
    else:
        kv_start = data.draw(st.integers(-6, 6), "kv_start")
    kv_len = None
    if data.draw(st.booleans(), "kv_len"):
        kv_len = torch.tensor(data.draw(st.lists(st.integers(Sq, Skv), min_size=B, max_size=B)), device=DEVICE)
    scale = data.draw(st.one_of(st.none(), st.floats(0.05, 2.0)), "scale")
    q = poison(q, data.draw(spots(max_size=1), "q spots"))
    k = poison(k, data.draw(spots(max_size=1), "k spots"))
    v = poison(v, data.draw(spots(max_size=2), "v spots"))
    if data.draw(st.booleans(), "[B, S, H, D] storage"):  # as transformers hands them over
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out = None
    if path == "kernel" and data.draw(st.booleans(), "out"):
        out = poisoned((B, Sq, Hq, D), dtype, DEVICE).transpose(1, 2)
    kw = dict(chunk_size=chunk, scale=scale, kv_start=kv_start, kv_len=kv_len)
    with mock.patch.object(attention_module, "_num_splits", lambda *a: splits):
        y = run(path, "attention", lambda: kernels.chunked_attention(q, k, v, out=out, **kw),
                lambda: ops.attention(q, k, v, **kw))
    ref, visible = attention_rows64(q, k, v, chunk, scale, kv_start, kv_len)
    # Rows that may take NaN/inf from the v of a key they do not see but another row does: not
    # compared, except that what is non-finite in the reference must stay so.
    bad_v = ~v.detach().cpu().isfinite().all(-1).repeat_interleave(group, 1)  # [B, Hq, Skv]
    seen = visible.any(-2)[:, None, None, :]
    reachable = (bad_v[:, :, None, :] & seen & ~visible[:, None]).any(-1) & visible[:, None].any(-1)
    reachable = reachable[..., None].expand(ref.shape)
    assert_matches(y, ref, TOL[dtype], skip=reachable)
    assert not (y.detach().cpu().isfinite() & ~ref.isfinite() & reachable).any()
    assert not y.detach().cpu()[~visible[:, None].any(-1).expand(B, Hq, Sq)].any(), "rows seeing no key must be 0"


@cpu_only
@examples(30)
@given(data=st.data(), Sq=st.integers(1, 3), D=st.sampled_from([8, 16]))
def test_attention_bad_arguments(data, Sq, D):
    q, k = randn((1, 2, Sq, D), torch.float32, 0), randn((1, 1, 4, D), torch.float32, 1)
    three_heads = randn((1, 3, 4, D), torch.float32, 2)  # 2 query heads over 3 KV heads
    ok = dict(q=q, k=k, v=k.clone())
    name, change = data.draw(st.sampled_from([
        ("q", dict(q=q[0])), ("q", dict(q=q.to(torch.int32))), ("k", dict(k=k[..., :-1], v=k[..., :-1])),
        ("k", dict(k=k.half())), ("v", dict(v=k[:, :, :-1])), ("heads", dict(k=three_heads, v=three_heads)),
        ("q", dict(q=randn((1, 2, 5, D), torch.float32, 3))), ("chunk_size", dict(chunk_size=0)),
        ("chunk_size", dict(chunk_size=2.5)), ("chunk_size", dict(chunk_size=True)), ("scale", dict(scale="1")),
        ("scale", dict(scale=math.nan)), ("scale", dict(scale=math.inf)), ("kv_start", dict(kv_start=1.5)),
        ("kv_start", dict(kv_start=torch.zeros(2, dtype=torch.int32))), ("kv_start", dict(kv_start=torch.zeros(1))),
        ("kv_len", dict(kv_len=4)), ("kv_len", dict(kv_len=torch.tensor([Sq - 1]))),
        ("kv_len", dict(kv_len=torch.tensor([5]))), ("kv_len", dict(kv_len=torch.tensor([4.0]))),
    ]), "bad call")
    args = {**ok, **change}
    q_, k_, v_ = args.pop("q"), args.pop("k"), args.pop("v")
    raises_naming(name, lambda: kernels.chunked_attention(q_, k_, v_, **args))
    raises_naming(name, lambda: ops.attention(q_, k_, v_, **args))
    # q, k, v as [B, H, S, D] views of one fused [B, S, (2 + 1 + 1) * D] projection output.
    heads = torch.randn(1, 4, 4 * D).unflatten(-1, (4, D)).transpose(1, 2)
    q2, k2, v2 = heads[:, :2], heads[:, 2:3], heads[:, 3:]
    out_name, out = data.draw(st.sampled_from([
        ("out", torch.empty(1, 2, 4, D - 1)), ("out", torch.empty(1, 2, 4, D, dtype=torch.float16)),
        ("out", torch.empty(1, 1, 4, D).expand(1, 2, 4, D)), ("out", q2), ("out", heads[:, 1:3]),
    ]), "bad out")
    raises_naming(out_name, lambda: kernels.chunked_attention(q2, k2, v2, out=out))
    kernels.chunked_attention(q2, k2, v2, out=torch.empty(1, 4, 2, D).transpose(1, 2))  # apart: fine


# ----------------------------------------------------------------------------------------------
# qk_prologue, rope, rms_norm
# ----------------------------------------------------------------------------------------------

def rope_pairs64(x, cos, sin):
    """Interleaved pairs (x[2i], x[2i+1]) times cos + i sin, in float64 (x [B, S, H, D])."""
    turn = torch.complex(cos.double().cpu(), sin.double().cpu())[:, :, None, :]
    pairs = torch.view_as_complex(x.detach().double().cpu().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2)


def prologue64(q, k, cos, sin, eps, positions, temperature):
    q, k = q.detach().double().cpu(), k.detach().double().cpu()
    if cos is not None:
        q, k = rope_pairs64(q, cos, sin), rope_pairs64(k, cos, sin)
    if eps is not None:
        q, k = rms_norm64(q, None, eps), rms_norm64(k, None, eps)
    if temperature is not None:
        q = temperature64(q, positions.cpu(), *temperature)
    return q, k


def qk_buffers(B, S, Hq, Hkv, D, dtype, seed, layout):
    """q [B, S, Hq, D] and k [B, S, Hkv, D]: separate tensors, views of one fused qkv
    projection output, or [B, H, S, D] storage seen through a transpose."""
    q, k = randn((B, S, Hq, D), dtype, seed), randn((B, S, Hkv, D), dtype, seed + 1)
    if layout == "fused":
        qkv = torch.zeros(B, S, (Hq + 2 * Hkv) * D, dtype=dtype, device=DEVICE)
        qv, kv = qkv[..., :Hq * D].unflatten(-1, (Hq, D)), qkv[..., Hq * D:(Hq + Hkv) * D].unflatten(-1, (Hkv, D))
        qv.copy_(q)
        kv.copy_(k)
        return qv, kv
    if layout == "head_major":
        return (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    return q, k


@examples(30)
@given(data=st.data(), B=st.integers(1, 2), S=st.integers(1, 4), Hq=st.integers(1, 4), Hkv=st.integers(1, 3),
       D=st.sampled_from([2, 6, 8, 16]), seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(["separate", "fused", "head_major"]), path=st.sampled_from(PATHS))
def test_qk_prologue(data, B, S, Hq, Hkv, D, seed, dtype, layout, path):
    q, k = qk_buffers(B, S, Hq, Hkv, D, dtype, seed, layout)
    cos = sin = positions = temperature = None
    if data.draw(st.booleans(), "rope"):
        angles = torch.rand(data.draw(st.sampled_from([1, B]), "cos batch"), S, D // 2) * 100
        cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    eps = data.draw(st.one_of(st.none(), st.floats(0.0, 1e-3)), "qk_norm_eps")
    if data.draw(st.booleans(), "temperature"):
        temperature = (data.draw(st.sampled_from([3.0, 100.0, 8192.0])), data.draw(st.floats(0.0, 1.0)))
        shape = data.draw(st.sampled_from([(S,), (B, S)]), "positions shape")
        positions = torch.randint(0, 20000, shape, dtype=data.draw(st.sampled_from([torch.int32, torch.int64])))
        positions = positions.to(DEVICE)
    with torch.no_grad():
        q.copy_(poison(q, data.draw(spots(max_size=1), "q spots")))
        k.copy_(poison(k, data.draw(spots(max_size=1), "k spots")))
    ref_q, ref_k = prologue64(q, k, cos, sin, eps, positions, temperature)
    outs = data.draw(st.sampled_from(["none", "new", "in_place"]), "outputs")
    if outs == "new":
        q_out = poisoned((B, Hq, S, D), dtype, DEVICE).transpose(1, 2)
        k_out = poisoned((B, S, Hkv, D), dtype, DEVICE)
    else:
        q_out, k_out = (q, k) if outs == "in_place" else (None, None)
    kw = dict(cos=cos, sin=sin, qk_norm_eps=eps, positions=positions, temperature=temperature, q_out=q_out,
              k_out=k_out)
    new_q, new_k = run(path, "qk_prologue", lambda: kernels.qk_prologue(q, k, **kw),
                       lambda: ops.qk_prologue(q, k, **kw))
    for new, out in ((new_q, q_out), (new_k, k_out)):
        assert out is None or new.data_ptr() == out.data_ptr()
    assert_matches(new_q, ref_q, TOL[dtype])
    assert_matches(new_k, ref_k, TOL[dtype])


@cpu_only
@examples(30)
@given(data=st.data(), S=st.integers(1, 3), H=st.integers(1, 3), D=st.sampled_from([4, 8]))
def test_qk_prologue_bad_arguments(data, S, H, D):
    """Outputs that overlap an input or each other (other than in place) and bad numbers."""
    q, k = qk_buffers(2, S, H, H, D, torch.float32, 0, data.draw(st.sampled_from(["separate", "fused"])))
    storage = torch.randn(2 * S * H * D + 1)
    q_below, shifted = storage[:-1].view(2, S, H, D), storage[1:].view(2, S, H, D)  # one element apart
    head_major = storage[:-1].view(2, H, S, D).transpose(1, 2)  # q_below's memory, other order
    cos = sin = torch.ones(1, S, D // 2)
    name, kw, qk = data.draw(st.sampled_from([
        ("q_out", dict(q_out=k), (q, k)), ("k_out", dict(k_out=q), (q, k)), ("q_out", dict(q_out=k, k_out=q), (q, k)),
        ("q_out", dict(q_out=shifted, k_out=shifted), (q, k)), ("q_out", dict(q_out=shifted), (q_below, k)),
        ("k_out", dict(k_out=shifted), (q_below, k)), ("q_out", dict(q_out=q, k_out=q), (q, k)),
        ("q_out", dict(q_out=head_major if S > 1 and H > 1 else shifted), (q_below, k)),
        ("q_out", dict(q_out=torch.empty(2, S, H, D + 2)), (q, k)),
        ("q_out", dict(q_out=torch.empty(2, S, H, D, dtype=torch.float16)), (q, k)),
        ("k_out", dict(k_out=torch.empty(1, S, H, D).expand(2, S, H, D)), (q, k)),
        ("qk_norm_eps", dict(qk_norm_eps=math.nan), (q, k)), ("qk_norm_eps", dict(qk_norm_eps=math.inf), (q, k)),
        ("qk_norm_eps", dict(qk_norm_eps=-1e-6), (q, k)), ("qk_norm_eps", dict(qk_norm_eps=True), (q, k)),
        ("temperature", dict(temperature=(math.nan, 0.1), positions=torch.zeros(S, dtype=torch.int32)), (q, k)),
        ("temperature", dict(temperature=(8192.0, math.inf), positions=torch.zeros(S, dtype=torch.int32)), (q, k)),
        ("temperature", dict(temperature=(math.inf, 0.1), positions=torch.zeros(S, dtype=torch.int32)), (q, k)),
        ("positions", dict(temperature=(8192.0, 0.1)), (q, k)),
        ("positions", dict(temperature=(8192.0, 0.1), positions=torch.zeros(S + 1, dtype=torch.int32)), (q, k)),
        ("cos", dict(cos=cos), (q, k)), ("cos", dict(cos=cos[..., :-1], sin=sin[..., :-1]), (q, k)),
        ("cos", dict(cos=cos.double(), sin=sin.double()), (q, k)),
    ]), "bad call")
    raises_naming(name, lambda: kernels.qk_prologue(*qk, **kw))
    raises_naming(name, lambda: ops.qk_prologue(*qk, **kw))


@examples(30)
@given(data=st.data(), lead=st.lists(st.integers(1, 3), max_size=2), N=st.integers(1, 16),
       seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES), layout=LAYOUTS,
       eps=st.floats(0.0, 1e-2), path=st.sampled_from(["triton", "torch"]), bad=spots())
def test_rms_norm(data, lead, N, seed, dtype, layout, eps, path, bad):
    """ops.rms_norm under each registry choice (only the torch backend implements it: a
    choice of "triton" falls through to it)."""
    x = relayout(poison(randn((*lead, N), dtype, seed), bad), layout)
    weight = None
    if data.draw(st.booleans(), "weight"):
        weight = poison(randn((N,), data.draw(st.sampled_from(DTYPES), "weight dtype"), seed + 1),
                        data.draw(spots([float("nan")], 1), "weight spots"))
    with registry.use(path):
        y = ops.rms_norm(x, weight, eps)
    assert_matches(y, rms_norm64(x, weight, eps), TOL[x.dtype])


@examples(25)
@given(data=st.data(), B=st.integers(1, 2), S=st.integers(1, 4), H=st.integers(1, 3), D=st.sampled_from([2, 8]),
       seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES), path=st.sampled_from(["triton", "torch"]),
       bad=spots())
def test_rope(data, B, S, H, D, seed, dtype, path, bad):
    x = poison(randn((B, S, H, D), dtype, seed), bad)
    angles = torch.rand(data.draw(st.sampled_from([1, B]), "cos batch"), S, D // 2) * 100
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    with registry.use(path):
        y = ops.rope(x, cos, sin)
    assert_matches(y, rope_pairs64(x, cos, sin), TOL[dtype])


@cpu_only
@examples(20)
@given(data=st.data(), N=st.integers(1, 8))
def test_norm_and_rope_bad_arguments(data, N):
    x, pairs = randn((2, N), torch.float32, 0), randn((1, 2, 1, 2 * N), torch.float32, 1)
    name, call = data.draw(st.sampled_from([
        ("eps", lambda: ops.rms_norm(x, None, math.nan)), ("eps", lambda: ops.rms_norm(x, None, math.inf)),
        ("eps", lambda: ops.rms_norm(x, None, -1e-6)), ("eps", lambda: ops.rms_norm(x, None, "1e-6")),
        ("eps", lambda: ops.rms_norm(x, None, True)), ("weight", lambda: ops.rms_norm(x, torch.ones(N + 1), 1e-6)),
        ("weight", lambda: ops.rms_norm(x, torch.ones(1, N), 1e-6)),
        ("x", lambda: ops.rms_norm(x.to(torch.int32), None, 1e-6)),
        ("x", lambda: ops.rope(x, torch.ones(1, 2, 1), torch.ones(1, 2, 1))),
        ("cos", lambda: ops.rope(pairs, torch.ones(1, 2, N + 1), torch.ones(1, 2, N + 1))),
        ("sin", lambda: ops.rope(pairs, torch.ones(1, 2, N), torch.ones(1, 2, N).half())),
        ("sin", lambda: ops.rope(pairs, torch.ones(1, 2, N), torch.ones(2, 2, N))),
    ]), "bad call")
    raises_naming(name, call)


# ----------------------------------------------------------------------------------------------
# quantized GEMM and FP8 activation quantization
# ----------------------------------------------------------------------------------------------

@examples(25)
@given(data=st.data(), fmt=st.sampled_from(QUANT_FORMATS), M=st.sampled_from([0, 1, 3, 5, 17]),
       N=st.integers(1, 40), seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES), layout=LAYOUTS,
       path=st.sampled_from(PATHS), bad=spots())
def test_quant_matmul(data, fmt, M, N, seed, dtype, layout, path, bad):
    K = data.draw(st.sampled_from([32, 64]) if fmt[0] == "int4" else st.integers(1, 160), "K")
    W = quantize(fmt, randn((K, N), torch.float32, seed + 1, K ** -0.5))
    x = relayout(poison(randn((M, K), dtype, seed), bad), layout)
    out = poisoned((M, N), dtype, DEVICE) if data.draw(st.booleans(), "out") else None
    y = run(path, "quant_linear", lambda: kernels.quant_matmul(x, out=out, **kernel_args(W)),
            lambda: ops.quant_linear(x, W))
    assert y.dtype == dtype and y.shape == (M, N)
    assert_matches(y, quant_matmul64(x, W), FP8_TOL, nan_exact=fmt[0] == "int4" or DEVICE == "cuda")


@examples(25)
@given(M=st.integers(0, 4), K=st.integers(1, 300), group=st.sampled_from([None, 128]),
       ub=st.sampled_from([None, 1.5, 1200.0]), seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES),
       layout=LAYOUTS, bad=spots(max_size=3))
def test_quantize_fp8_activations(M, K, group, ub, seed, dtype, layout, bad):
    """The kernel against its torch twin, element for element: scales equal (NaN where the
    twin's are), q equal as e4m3 values with NaN in the same places."""
    from llama4_fast.quant import quantize_fp8_activations_ref

    x = relayout(poison(randn((M, K), dtype, seed, 3.0), bad), layout)
    q, s = kernels.quantize_fp8_activations(x, group_size=group, scale_ub=ub)
    q_ref, s_ref = quantize_fp8_activations_ref(x, group, ub)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == s_ref.shape
    torch.testing.assert_close(s.cpu(), s_ref.cpu(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(q.float().cpu(), q_ref.float().cpu(), rtol=0, atol=0, equal_nan=True)


@cpu_only
@examples(25)
@given(data=st.data(), fmt=st.sampled_from(QUANT_FORMATS))
def test_quant_matmul_bad_arguments(data, fmt):
    K, N = 64, 24
    W = quantize(fmt, randn((K, N), torch.float32, 0))
    x = randn((3, K), torch.float32, 1)
    kw = kernel_args(W)
    name, change = data.draw(st.sampled_from([
        ("x", dict(x=x[0])), ("x", dict(x=x.to(torch.int32))), ("qweight", dict(x=x[:, :-2])),
        ("weight_format", dict(weight_format="fp4")), ("act_scale_ub", dict(act_scale_ub=math.nan)),
        ("act_scale_ub", dict(act_scale_ub=-1.0)), ("out", dict(out=torch.empty(3, N + 1))),
        ("out", dict(out=torch.empty(3, N, dtype=torch.float16))), ("out", dict(out=torch.empty(1, N).expand(3, N))),
        ("scale", dict(scale=kw["scale"][..., :-1])),
    ]), "bad call")
    args = {**kw, "x": x, **change}
    raises_naming(name, lambda: kernels.quant_matmul(args.pop("x"), **args))
    packed = torch.zeros(K // 2, N, dtype=torch.uint8)
    raises_naming("group_size", lambda: kernels.quant_matmul(x, packed, torch.ones(1, N), weight_format="int4",
                                                             group_size=48))
    raises_naming("weight", lambda: ops.quant_linear(x, W.dequantize()))  # a plain tensor is no format


# ----------------------------------------------------------------------------------------------
# dispatch metadata
# ----------------------------------------------------------------------------------------------

@examples(20)
@given(T=st.integers(0, 100), top_k=st.integers(1, 3), E=st.integers(1, 10),
       block_m=st.sampled_from([1, 3, 16, 64]), seed=st.integers(0, 2**16), wide=st.booleans())
def test_dispatch_metadata(T, top_k, E, block_m, seed, wide):
    """Pairs grouped by expert, stably; ids outside [0, E) in bucket E; offsets and block
    offsets as prefix sums; the block count within the static bound."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, E + 1, (T, top_k), generator=g, dtype=torch.int64 if wide else torch.int32)
    meta = dispatch_metadata(ids.to(DEVICE), E, block_m)
    flat = ids.view(-1).long()
    bucket = torch.where((flat >= 0) & (flat < E), flat, E)
    counts = torch.bincount(bucket, minlength=E + 1)
    assert meta.expert_offsets.cpu().tolist() == [0] + counts.cumsum(0).tolist()
    blocks = (counts + block_m - 1) // block_m
    assert meta.block_offsets.cpu().tolist() == [0] + blocks.cumsum(0).tolist()
    assert meta.sorted_pairs.cpu().long().tolist() == torch.argsort(bucket, stable=True).tolist()
    assert int(blocks.sum()) <= meta.max_blocks


@cpu_only
@examples(10)
@given(data=st.data())
def test_dispatch_metadata_bad_arguments(data):
    ids = torch.zeros(2, 1, dtype=torch.int32)
    name, args = data.draw(st.sampled_from([
        ("num_experts", (ids, 0, 16)), ("num_experts", (ids, 2.0, 16)), ("num_experts", (ids, True, 16)),
        ("block_m", (ids, 4, 0)), ("block_m", (ids, 4, None)), ("topk_ids", (ids.float(), 4, 16)),
        ("topk_ids", (ids[:, 0], 4, 16)),
    ]), "bad call")
    raises_naming(name, lambda: dispatch_metadata(*args))


@examples(40)
@given(data=st.data(), size=st.integers(1, 24), itemsizes=st.sampled_from([(4, 4), (2, 2), (4, 2)]))
def test_may_overlap_never_misses_an_overlap(data, size, itemsizes):
    """checks.may_overlap (behind every out/q_out/k_out refusal) against the exact byte sets of
    two random strided views of one buffer: it may say "overlap" for disjoint views, never the
    reverse; and the fused-qkv case (disjoint column slices of one buffer) must pass."""
    from llama4_fast.kernels.checks import may_overlap

    base = torch.zeros(256, dtype=torch.uint8)  # holds any view drawn below

    def view(itemsize):
        dtype = {2: torch.float16, 4: torch.float32}[itemsize]
        shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3), "shape")
        strides = data.draw(st.lists(st.integers(0, 6), min_size=len(shape), max_size=len(shape)), "strides")
        offset = data.draw(st.integers(0, 8), "offset")
        t = base.view(dtype).as_strided(shape, strides, offset)
        index = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"), -1).view(-1, len(shape))
        first = {(offset + int((ix * torch.tensor(strides)).sum())) * itemsize for ix in index}
        return t, {b + i for b in first for i in range(itemsize)}

    (a, bytes_a), (b, bytes_b) = view(itemsizes[0]), view(itemsizes[1])
    if bytes_a & bytes_b:
        assert may_overlap(a, b) and may_overlap(b, a)
    qkv = torch.zeros(2, 3, size + 6)
    q, k = qkv[..., :size].unflatten(-1, (size, 1)), qkv[..., size:size + 3]
    assert not may_overlap(q, k) and not may_overlap(k, q) and may_overlap(q, qkv[..., size - 1:size + 1])


# ----------------------------------------------------------------------------------------------
# GPU only: what the interpreter cannot show
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_fp8_nan_weight_and_inf_activation_give_nan():
    """On the GPU tl.dot reads e4m3's NaN as NaN (the interpreter reads 480): a NaN weight
    spoils its output column, and an inf activation (no scale_ub) its whole row, as NaN."""
    W = Fp8Weight.quantize(torch.randn(64, 32, device="cuda"))
    qweight = W.qweight.float()
    qweight[5, 7] = float("nan")
    W.qweight.copy_(qweight.to(torch.float8_e4m3fn))
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    x[1, 3] = float("inf")
    y = kernels.quant_matmul(x, **kernel_args(W)).float().cpu()
    assert y[:, 7].isnan().all() and y[1].isnan().all()
    assert y[[0, 2, 3]][:, [c for c in range(32) if c != 7]].isfinite().all()
