"""Argument validation shared by the kernel launchers and the `llama4_fast.ops` front door.

Every public entry point calls these before touching data, so bad input fails with a
ValueError/TypeError that names the argument instead of a crash or a silent wrong answer.
Checks that would need a device->host copy (expert ids in range) run only on CPU tensors;
on CUDA the kernels skip out-of-range ids instead, so decode stays free of host syncs.
"""

from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCORINGS = ("sigmoid", "softmax")
MOE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # the gate's activation in fused_moe


def tensor(name: str, x, *, ndim: int | None = None, dtypes=None, contiguous: bool = False):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}: all inputs must share a device")


def route_args(router_logits, top_k, scoring, renormalize):
    tensor("router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES)
    num_experts = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if renormalize and scoring != "softmax":
        raise ValueError("renormalize=True is only defined for scoring='softmax'")


def moe_args(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, skip_sentinel_ids: bool = False):
    """Shapes: hidden_states [T, H]; gate_up_proj [E, H, 2I]; down_proj [E, I, H];
    topk_weights [T, k] float; topk_ids [T, k] integer."""
    tensor("hidden_states", hidden_states, ndim=2, dtypes=FLOAT_DTYPES)
    tensor("gate_up_proj", gate_up_proj, ndim=3)
    tensor("down_proj", down_proj, ndim=3)
    tensor("topk_weights", topk_weights, ndim=2, dtypes=FLOAT_DTYPES)
    tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    same_device(hidden_states=hidden_states, gate_up_proj=gate_up_proj, down_proj=down_proj,
                topk_weights=topk_weights, topk_ids=topk_ids)
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if w.dtype != hidden_states.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but hidden_states has {hidden_states.dtype}: "
                            "weights and activations must share a dtype (quantized experts take the "
                            "quant_linear/fused_moe formats)")
    T, H = hidden_states.shape
    E, H2, two_i = gate_up_proj.shape
    if H2 != H:
        raise ValueError(f"gate_up_proj must be [E, H={H}, 2I], got {tuple(gate_up_proj.shape)}")
    if two_i % 2:
        raise ValueError(f"gate_up_proj's last dimension (2I) must be even, got {two_i}")
    inter = two_i // 2
    if tuple(down_proj.shape) != (E, inter, H):
        raise ValueError(f"down_proj must be [E={E}, I={inter}, H={H}], got {tuple(down_proj.shape)}")
    routing_args(hidden_states, topk_weights, topk_ids, E, skip_sentinel_ids)


def moe_variant_args(hidden_states, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
                     gate_up_interleaved, clamped_swiglu, apply_router_weight_on_input):
    """fused_moe's options for transformers' other experts (after moe_args): gate_up_bias
    [E, 2I] and down_bias [E, H] in the weights' dtype and device, only with the router weight
    on the output (the input-side weight would scale the bias too: no model does that);
    activation in MOE_ACTIVATIONS; gate_up_interleaved a bool; clamped_swiglu None or a
    (limit, alpha) pair of finite floats, limit > 0, with activation "silu"."""
    E, H, two_i = gate_up_proj.shape
    for name, bias, shape in (("gate_up_bias", gate_up_bias, (E, two_i)), ("down_bias", down_bias, (E, H))):
        if bias is None:
            continue
        tensor(name, bias, ndim=2, dtypes=(hidden_states.dtype,))
        if tuple(bias.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(bias.shape)}")
        same_device(hidden_states=hidden_states, **{name: bias})
        if apply_router_weight_on_input:
            raise ValueError(f"{name} needs apply_router_weight_on_input=False (the router weight on the expert "
                             "output, as every biased transformers expert has it)")
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {MOE_ACTIVATIONS}, got {activation!r}")
    if not isinstance(gate_up_interleaved, bool):
        raise TypeError(f"gate_up_interleaved must be a bool, got {type(gate_up_interleaved).__name__}")
    if clamped_swiglu is not None:
        if not (isinstance(clamped_swiglu, (tuple, list)) and len(clamped_swiglu) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in clamped_swiglu)):
            raise TypeError(f"clamped_swiglu must be a (limit, alpha) pair of floats or None, got {clamped_swiglu!r}")
        limit, alpha = clamped_swiglu
        if not (0 < limit < math.inf) or not math.isfinite(alpha):
            raise ValueError(f"clamped_swiglu's limit must be positive and finite and its alpha finite, "
                             f"got {clamped_swiglu!r}")
        if activation != "silu":
            raise ValueError(f"clamped_swiglu is gpt-oss's gate (its own sigmoid): activation must stay 'silu', "
                             f"got {activation!r}")


def routing_args(hidden_states, topk_weights, topk_ids, num_experts: int, skip_sentinel_ids: bool = False):
    """topk_weights [T, k] float and topk_ids [T, k] integer for hidden_states [T, H], with
    k <= num_experts and (on CPU) every id in [0, num_experts); with skip_sentinel_ids, ids >=
    num_experts are allowed (expert-parallel sentinels: another rank's experts, skipped)."""
    tensor("topk_weights", topk_weights, ndim=2, dtypes=FLOAT_DTYPES)
    tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    same_device(hidden_states=hidden_states, topk_weights=topk_weights, topk_ids=topk_ids)
    T, E = hidden_states.shape[0], num_experts
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must both be [T={T}, top_k]")
    if topk_ids.shape[1] > E:
        raise ValueError(f"top_k={topk_ids.shape[1]} exceeds the number of experts E={E}")
    if topk_ids.shape[1] == 0:
        raise ValueError(f"topk_ids must have at least one column (top_k >= 1), got {tuple(topk_ids.shape)}")
    # Data-dependent, so skipped while torch.compile traces (and on CUDA: no host sync).
    if topk_ids.device.type == "cpu" and topk_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or (hi >= E and not skip_sentinel_ids):
            where = "be >= 0 (ids >= E are expert-parallel sentinels, skipped)" if skip_sentinel_ids \
                else f"lie in [0, {E})"
            raise ValueError(f"topk_ids must {where}, got values in [{lo}, {hi}]")


def attention_args(q, k, v, chunk_size, scale, kv_start, kv_len=None):
    """Shapes: q [B, Hq, Sq, D]; k, v [B, Hkv, Skv, D]; Hq % Hkv == 0; Sq <= Skv;
    kv_len None or an int tensor [B] with Sq <= kv_len <= Skv (checked when it is on the CPU)."""
    tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES)
    same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, Skv, D={D}], got {tuple(k.shape)}")
    Hkv, Skv = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the KV heads ({Hkv})")
    if Sq > Skv:
        raise ValueError(f"q has {Sq} positions but k only {Skv}: the queries are the last Sq of the Skv keys")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if isinstance(kv_start, torch.Tensor):
        tensor("kv_start", kv_start, ndim=1, dtypes=(torch.int32, torch.int64))
        if kv_start.shape[0] != B:
            raise ValueError(f"kv_start must be an int or a [B={B}] tensor, got shape {tuple(kv_start.shape)}")
        same_device(q=q, kv_start=kv_start)
    elif isinstance(kv_start, bool) or not isinstance(kv_start, int):
        raise TypeError(f"kv_start must be an int or an int tensor [B], got {type(kv_start).__name__}")
    if kv_len is not None:
        if not isinstance(kv_len, torch.Tensor):
            raise TypeError(f"kv_len must be None or an int tensor [B], got {type(kv_len).__name__}")
        tensor("kv_len", kv_len, ndim=1, dtypes=(torch.int32, torch.int64))
        if kv_len.shape[0] != B:
            raise ValueError(f"kv_len must be a [B={B}] tensor, got shape {tuple(kv_len.shape)}")
        same_device(q=q, kv_len=kv_len)
        # A device tensor is not read back (that would sync the host): its range is the caller's;
        # nor while torch.compile traces (data-dependent).
        if (kv_len.device.type == "cpu" and B and not torch.compiler.is_compiling()
                and not bool(((kv_len >= Sq) & (kv_len <= Skv)).all())):
            raise ValueError(f"kv_len must lie in [Sq={Sq}, Skv={Skv}], got {kv_len.tolist()}")


def rms_norm_args(x, weight, eps):
    tensor("x", x, dtypes=FLOAT_DTYPES)
    if weight is not None:
        tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES)
        if weight.shape[0] != x.shape[-1]:
            raise ValueError(f"weight has {weight.shape[0]} elements but x's last dimension is {x.shape[-1]}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a non-negative finite float, got {eps!r}")


def qk_prologue_args(q, k, cos, sin, qk_norm_eps, positions, temperature, q_out, k_out):
    """Shapes: q [B, S, Hq, D]; k [B, S, Hkv, D]; cos, sin [B or 1, S, D/2] float32 (both or
    neither); positions [S] or [B, S] int32/int64, required with temperature = (floor_scale,
    attn_scale); q_out / k_out like q / k."""
    tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    same_device(q=q, k=k)
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    B, S, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, S={S}, Hkv, D={D}] like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (RoPE) or both be None")
    if cos is not None:
        if D % 2:
            raise ValueError(f"RoPE rotates pairs of the head dim, which must be even, got D={D}")
        for name, t in (("cos", cos), ("sin", sin)):
            tensor(name, t, ndim=3, dtypes=(torch.float32,))
            if t.shape[1] != S or t.shape[2] * 2 != D or t.shape[0] not in (1, B):
                raise ValueError(f"{name} must be [B={B} or 1, S={S}, D/2={D // 2}], got {tuple(t.shape)}")
        same_device(q=q, cos=cos, sin=sin)
    if qk_norm_eps is not None and (isinstance(qk_norm_eps, bool) or not isinstance(qk_norm_eps, (int, float))
                                    or not 0 <= qk_norm_eps < math.inf):
        raise ValueError(f"qk_norm_eps must be a non-negative finite float or None, got {qk_norm_eps!r}")
    if temperature is not None:
        if not (isinstance(temperature, (tuple, list)) and len(temperature) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in temperature)):
            raise TypeError(f"temperature must be a (floor_scale, attn_scale) pair of floats or None, "
                            f"got {temperature!r}")
        if not 0 < temperature[0] < math.inf:
            raise ValueError(f"temperature's floor_scale must be positive and finite, got {temperature[0]!r}")
        if not math.isfinite(temperature[1]):
            raise ValueError(f"temperature's attn_scale must be finite, got {temperature[1]!r}")
        if positions is None:
            raise ValueError("positions is required with temperature: the query scale depends on the position")
    if positions is not None:
        if temperature is None:
            raise ValueError("positions is only used by temperature (RoPE takes its angles from cos/sin): "
                             "pass temperature or drop positions")
        tensor("positions", positions, dtypes=(torch.int32, torch.int64))
        if tuple(positions.shape) not in ((S,), (B, S)):
            raise ValueError(f"positions must be [S={S}] or [B={B}, S={S}], got {tuple(positions.shape)}")
        same_device(q=q, positions=positions)
    if q_out is not None:
        out_like(q_out, q, "q", "q_out")
    if k_out is not None:
        out_like(k_out, k, "k", "k_out")
    # An output may be the very tensor it replaces (in place: each program reads its tile of q
    # or k before writing the same elements, and no other program touches them); any other
    # overlap with an input or the other output would be read after another program wrote it.
    inputs = dict(q=q, k=k, cos=cos, sin=sin, positions=positions)
    if q_out is not None:
        disjoint("q_out", q_out, in_place_of="q", **inputs, k_out=k_out)
    if k_out is not None:
        disjoint("k_out", k_out, in_place_of="k", **inputs)


def power_of_two(name: str, v, lo: int = 16) -> int:
    """`v` (called `name`) as a power of two >= lo (tile sizes: tl.dot's least shape is 16)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or v & (v - 1):
        raise ValueError(f"{name} must be a power of two >= {lo}, got {v!r}")
    return v


def flag(name: str, v) -> bool:
    """`v` (called `name`) as an on/off option: True or False, nothing truthy in their place."""
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return v


def positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (CPU tensors are then valid)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Why bfloat16 inputs are refused on the CPU by the kernels that multiply in bf16.
INTERPRETER_BF16_DOT = "its bf16 tl.dot multiplies raw bits, triton issue 11584"


def kernel_device(name: str, x: torch.Tensor, op: str, bf16_reason: str | None = None):
    """A launcher's input `x` (called `name`) must be on CUDA, or on the CPU under the Triton
    interpreter, where bfloat16 is refused when `bf16_reason` is given (what the interpreter
    gets wrong for this kernel)."""
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        raise ValueError(f"{name} is on {x.device}: {op} needs CUDA tensors "
                         "(or CPU tensors with TRITON_INTERPRET=1)")
    if bf16_reason and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        raise TypeError(f"bfloat16 is not supported under the Triton interpreter ({bf16_reason}): "
                        "use float16/float32 on CPU")


def scale_bound(name: str, value) -> float | None:
    """An optional upper bound on activation amaxes: None, or a positive finite number."""
    if value is None:
        return None
    bound = float(value)
    if not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"{name} must be a positive finite number or None, got {value!r}")
    return bound


def _overlapping(t: torch.Tensor) -> bool:
    """True unless t's elements provably occupy distinct addresses: with the dimensions taken by
    increasing stride, each stride must exceed the span of the smaller ones (a stride-0 view,
    or as_strided((T, H), (1, 1)), fails). Rare non-overlapping interleavings fail too."""
    span = 0
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def like(x, ref: torch.Tensor, like_name: str, name: str, shape: tuple | None = None):
    """`x` (called `name` in errors) must be a tensor with the shape (or `shape` when given),
    dtype and device of `ref` (called `like_name`); any strides."""
    tensor(name, x)
    if shape is not None:
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name} must be {list(shape)}, got {list(x.shape)}")
    elif x.shape != ref.shape:
        raise ValueError(f"{name} must have {like_name}'s shape {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have {like_name}'s dtype {ref.dtype}, got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {ref.device}")


def out_like(out, ref: torch.Tensor, like_name: str, name: str = "out", shape: tuple | None = None):
    """`out` as `like` checks it, and with no overlapping elements (every element is written once)."""
    like(out, ref, like_name, name, shape)
    if _overlapping(out):
        raise ValueError(f"{name} has overlapping elements (shape {tuple(out.shape)}, strides {out.stride()}), "
                         "e.g. a broadcast (stride-0) view: each element must have its own memory")


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] of t's elements (strides are never negative)."""
    span = 1
    for n, st in zip(t.shape, t.stride()):
        span += (n - 1) * st
    lo = t.data_ptr()
    return lo, lo + span * t.itemsize


def _arc(t: torch.Tensor, period: int):
    """(first byte modulo `period`, width) of the bytes t occupies within each period, when
    every stride of t is a multiple of the period except those of an inner block narrower
    than it; else None."""
    width = t.itemsize
    for n, st in zip(t.shape, t.stride()):
        if n > 1 and (st * t.itemsize) % period:
            width += (n - 1) * st * t.itemsize
    return (t.data_ptr() % period, width) if width <= period else None


def _interleaved_apart(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b, though their byte ranges meet, each lie in one arc of bytes modulo a
    common period (a row stride) and the arcs do not meet: e.g. the q and k column slices of one
    fused qkv projection output."""
    strides = {st * t.itemsize for t in (a, b) for n, st in zip(t.shape, t.stride()) if n > 1 and st}
    for period in sorted(strides):
        arc_a, arc_b = _arc(a, period), _arc(b, period)
        if arc_a and arc_b:
            (a0, wa), (b0, wb) = arc_a, arc_b
            if (b0 - a0) % period >= wa and (a0 - b0) % period >= wb:
                return True
    return False


def may_overlap(a: torch.Tensor, b: torch.Tensor, a_range: tuple[int, int] | None = None) -> bool:
    """False when a and b provably share no byte of memory: empty, on different devices, apart
    in memory, or interleaved but apart (_interleaved_apart). True when they do overlap, and
    (rarely) when disjointness cannot be shown this way. a_range: _byte_range(a), if known."""
    if not a.numel() or not b.numel() or a.get_device() != b.get_device():
        return False
    (a_lo, a_hi), (b_lo, b_hi) = a_range or _byte_range(a), _byte_range(b)
    return a_lo < b_hi and b_lo < a_hi and not _interleaved_apart(a, b)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b map every index to the same address (strides of size-1 dimensions do not count)."""
    if a is b:
        return True
    strides = [[st for n, st in zip(t.shape, t.stride()) if n > 1] for t in (a, b)]
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and strides[0] == strides[1]
            and a.dtype == b.dtype and a.device == b.device)


def disjoint(name: str, out: torch.Tensor, *, in_place_of: str | None = None, **others):
    """The output `out` (called `name`) must share no memory with the tensors in `others`
    (None entries are skipped), except that it may be exactly the tensor named `in_place_of`
    (same storage, shape and strides) when the kernel supports running in place. Skipped
    while torch.compile traces (fake tensors have no addresses; the kernel checks again)."""
    if torch.compiler.is_compiling():
        return
    out_range = _byte_range(out)
    for other_name, other in others.items():
        if other is None:
            continue
        if other_name == in_place_of and _same_view(out, other):
            continue
        if may_overlap(out, other, out_range):
            also = f" (or be exactly {in_place_of}, in place)" if in_place_of else ""
            raise ValueError(f"{name} overlaps {other_name} in memory: an output must not share memory "
                             f"with an input or another output{also}")
