"""The hot operations of Llama 4, dispatched through the registry.

Model code, the transformers patch and research code call these; `llama4_fast.registry` picks
the backend (see its docstring). Each op validates its arguments once here, so every backend
receives well-formed input and bad input fails with an error naming the argument.
Signatures match the kernels in `llama4_fast.kernels`, so a backend is a drop-in.
"""

from __future__ import annotations

import torch

from llama4_fast import registry
from llama4_fast.kernels import checks


def route(router_logits: torch.Tensor, top_k: int, scoring: str = "sigmoid", renormalize: bool = False):
    """Top-k expert selection.

    router_logits: [T, E] float (model dtype). Returns `(topk_weights [T, k] float32,
    topk_ids [T, k] int32)`, ids in descending logit order. `scoring="sigmoid"` (Llama 4):
    weight = sigmoid(selected logit) computed in fp32. `scoring="softmax"`: softmax over all E
    logits, then top-k; `renormalize=True` rescales the k weights to sum to 1.
    """
    checks.route_args(router_logits, top_k, scoring, renormalize)
    return registry.call("route", router_logits, top_k, scoring, renormalize)


def fused_moe(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              apply_router_weight_on_input: bool = True, gate_up_bias: torch.Tensor | None = None,
              down_bias: torch.Tensor | None = None, activation: str = "silu", gate_up_interleaved: bool = False,
              clamped_swiglu: tuple[float, float] | None = None, skip_sentinel_ids: bool = False) -> torch.Tensor:
    """Routed SwiGLU experts, running only the selected ones.

    hidden_states [T, H]; gate_up_proj [E, H, 2I] (gate columns first, then up, transformers'
    layout); down_proj [E, I, H]; topk_weights [T, k] float; topk_ids [T, k] int32/int64.
    Returns [T, H] in hidden_states' dtype: sum over the k choices of
    `down(silu(x_e @ gate) * (x_e @ up))` where `x_e = x * w` when apply_router_weight_on_input
    (Llama 4), else the expert output is multiplied by `w`. The shared expert is not included.
    Weights are read through their strides: nn.Linear-style [E, 2I, H] / [E, H, I] experts pass
    `.transpose(1, 2)` views, without a copy.

    The experts of other transformers models (keyword-only; the defaults are Llama 4's):
    - gate_up_bias [E, 2I] (gate_up_proj's column order) and down_bias [E, H]: added to each
      projection, inside the router weight; only with apply_router_weight_on_input=False.
    - activation: "silu", "gelu" (erf) or "gelu_tanh", the gate's: h = act(gate) * up.
    - gate_up_interleaved: gate column n of gate_up_proj is 2n and up 2n + 1 (gpt-oss).
    - clamped_swiglu=(limit, alpha): gpt-oss's gate instead of act(gate) * up:
      h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
    - skip_sentinel_ids: ids >= E are expert-parallel sentinels (experts another rank holds)
      and contribute nothing; without it they are refused (CPU) or skipped (CUDA). Negative ids
      are always refused on CPU.

    Quantized experts: gate_up_proj and down_proj may both be `llama4_fast.quant.Fp8Weight` or
    both `Int4Weight` (logical shapes as above, one format; Llama 4's experts only: none of the
    options above, ValueError); then the router weight multiplies the fp32 GEMM result and FP8 formats
    quantize the activations at run time (see `kernels.fused_moe`'s weight_format).

    Differentiable (training) in hidden_states, both weights, both biases and topk_weights;
    quantized weights are frozen (a quantized tensor that requires grad is refused) and pass
    gradients to hidden_states and topk_weights through their dequantized values.
    """
    from llama4_fast.quant import QuantWeight, expert_kernel_args

    if isinstance(gate_up_proj, QuantWeight) or isinstance(down_proj, QuantWeight):
        from llama4_fast.kernels.moe import quant_experts_args

        if (gate_up_bias, down_bias, activation, gate_up_interleaved, clamped_swiglu, skip_sentinel_ids) != \
                (None, None, "silu", False, None, False):
            raise ValueError("quantized experts take Llama 4's SwiGLU experts only: no gate_up_bias, down_bias, "
                             "activation, gate_up_interleaved, clamped_swiglu or skip_sentinel_ids")
        kw = expert_kernel_args(gate_up_proj, down_proj)
        _frozen("gate_up_proj", gate_up_proj)
        _frozen("down_proj", down_proj)
        w13, w2 = gate_up_proj.tensors()[0], down_proj.tensors()[0]
        quant_experts_args(hidden_states, w13, w2, **kw)
        checks.routing_args(hidden_states, topk_weights, topk_ids, w13.shape[0])
        return registry.call("fused_moe", hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids,
                             apply_router_weight_on_input=apply_router_weight_on_input)
    checks.moe_args(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, skip_sentinel_ids)
    checks.moe_variant_args(hidden_states, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
                            gate_up_interleaved, clamped_swiglu, apply_router_weight_on_input)
    # Only the options that differ from Llama 4's defaults reach the backend, so a backend
    # registered for Llama 4's experts alone keeps working.
    options = dict(gate_up_bias=gate_up_bias, down_bias=down_bias,
                   clamped_swiglu=None if clamped_swiglu is None else tuple(float(v) for v in clamped_swiglu))
    options = {k: v for k, v in options.items() if v is not None}
    if activation != "silu":
        options["activation"] = activation
    if gate_up_interleaved:
        options["gate_up_interleaved"] = True
    if skip_sentinel_ids:
        options["skip_sentinel_ids"] = True
    return registry.call("fused_moe", hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids,
                         apply_router_weight_on_input=apply_router_weight_on_input, **options)


def quant_linear(x: torch.Tensor, weight) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W for a quantized weight W (`llama4_fast.quant.Fp8Weight` or
    `Int4Weight`, logical shape [K, N]), in x's dtype (float16/bfloat16/float32), accumulated
    in fp32. FP8 weights quantize x at run time (per token, or per 1x128 group for block
    scales; the token amax clamped to weight.act_scale_ub when set); INT4 is weight-only.
    The kernel it stands for is `llama4_fast.kernels.quant_matmul` (weight as plain tensors)."""
    from llama4_fast.quant import QuantWeight

    checks.tensor("x", x, ndim=2, dtypes=checks.FLOAT_DTYPES)
    if not isinstance(weight, QuantWeight):
        raise TypeError(f"weight must be an Fp8Weight or Int4Weight, got {type(weight).__name__}")
    if len(weight.shape) != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be [K={x.shape[1]}, N], got {list(weight.shape)}")
    checks.same_device(x=x, weight=weight.tensors()[0])
    _frozen("weight", weight)
    return registry.call("quant_linear", x, weight)


def _frozen(name: str, weight):
    """Quantized weights are not trained (the backward gives the activations' gradient only)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in weight.tensors()):
        raise ValueError(f"{name} is a quantized weight that requires grad: quantized weights are frozen "
                         "(train adapters or full-precision weights; call .requires_grad_(False) on its tensors)")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int | None = None,
              scale: float | None = None, kv_start: int | torch.Tensor = 0,
              kv_len: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (optionally chunked) attention with grouped KV heads.

    q [B, Hq, Sq, D]; k, v [B, Hkv, Skv, D] with Hq a multiple of Hkv (query head h reads KV
    head h // (Hq // Hkv); K/V are never repeated). Returns [B, Hq, Sq, D] in q's dtype.

    Positions: key j of sequence b sits at position `kv_start + j` (`kv_start` an int, or an
    int tensor [B] for sequences that start at different places, e.g. left padding); the
    queries are the last Sq of the Skv positions. Keys at negative positions are padding and
    never attended. A query at position p attends keys at positions s with 0 <= s <= p, and,
    when chunk_size=C is set, s // C == p // C (Llama 4's chunked layers). A query that sees no
    key (a padding row) returns zeros. scale defaults to D ** -0.5.

    kv_len: None, or an int tensor [B] with Sq <= kv_len[b] <= Skv: only the first kv_len[b]
    keys of sequence b exist (its queries are the last Sq of those). A decode step passes the
    whole static cache buffer and keeps the fill level on the device (CUDA graphs, no sync).

    NaN / inf follow softmax math per query (a query that sees a NaN is NaN; one whose every
    visible score is -inf is NaN too), except that a non-finite v may also reach queries of the
    same block that do not see its key (0 x NaN); keys no query of the block sees (padding,
    past kv_len) never matter. Details: `llama4_fast.kernels.attention`'s module docstring.
    """
    checks.attention_args(q, k, v, chunk_size, scale, kv_start, kv_len)
    return registry.call("attention", q, k, v, chunk_size=chunk_size, scale=scale, kv_start=kv_start,
                         kv_len=kv_len)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in fp32 and cast back to x's dtype, then times
    `weight` [x.shape[-1]] (as transformers: the product takes the promoted dtype). With
    weight=None it is Llama 4's weight-free L2 qk-norm. eps: a finite float >= 0.
    NaN / inf as the float math gives: a row holding a NaN is NaN; one holding an inf is NaN
    there and 0 elsewhere (x / sqrt(inf))."""
    checks.rms_norm_args(x, weight, eps)
    return registry.call("rms_norm", x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama 4's interleaved-pair rotary embedding, in fp32, cast back to x's dtype.

    x [B, S, H, D] (pairs are (x[..., 2i], x[..., 2i+1])); cos, sin [B or 1, S, D/2] float32.
    """
    checks.tensor("x", x, ndim=4, dtypes=checks.FLOAT_DTYPES)
    for name, t in (("cos", cos), ("sin", sin)):
        checks.tensor(name, t, ndim=3, dtypes=(torch.float32,))
        if t.shape[1] != x.shape[1] or t.shape[2] * 2 != x.shape[3] or t.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"{name} must be [B or 1, S={x.shape[1]}, D/2={x.shape[3] // 2}], got {tuple(t.shape)}")
    return registry.call("rope", x, cos, sin)


def qk_prologue(q: torch.Tensor, k: torch.Tensor, *, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None, qk_norm_eps: float | None = None,
                positions: torch.Tensor | None = None, temperature: tuple[float, float] | None = None,
                q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None):
    """What Llama 4 does to q and k between the projections and attention, in one call.

    q [B, S, Hq, D], k [B, S, Hkv, D] (float16/bfloat16/float32, one dtype, any strides, e.g.
    views of the projection outputs). Applied in this order, each in fp32:

    1. RoPE when cos, sin [B or 1, S, D/2] float32 are given (both or neither; D even):
       the interleaved pairs of q and k as `ops.rope` rotates them;
    2. qk-norm when qk_norm_eps is given: q and k as `ops.rms_norm(x, None, qk_norm_eps)`;
    3. temperature when temperature=(floor_scale, attn_scale) is given, with positions [S] or
       [B, S] int32/int64 (absolute positions; required with temperature and only used by it):
       q times `log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`; k untouched.

    RoPE layers: `qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=eps or None)`; NoPE layers:
    `qk_prologue(q, k, positions=pos, temperature=(floor_scale, attn_scale))`.

    Returns (q', k') in the input dtype. q' is written whenever a step is set or q_out is
    given; k' whenever RoPE or qk-norm is set or k_out is given. A written result goes into
    q_out / k_out (shaped like q / k, any strides, e.g. a [B, S, Hkv, D] view of a KV cache) or
    a new contiguous tensor; a tensor that is not written comes back as it was given (no copy).
    q_out may be q itself (in place; likewise k_out and k), but an output that otherwise
    overlaps an input or the other output is refused (ValueError naming it). The torch backend
    rounds to the input dtype between steps as the separate ops do; the triton backend keeps
    fp32 throughout (one rounding).
    """
    checks.qk_prologue_args(q, k, cos, sin, qk_norm_eps, positions, temperature, q_out, k_out)
    return registry.call("qk_prologue", q, k, cos=cos, sin=sin, qk_norm_eps=qk_norm_eps, positions=positions,
                         temperature=None if temperature is None else tuple(temperature), q_out=q_out, k_out=k_out)
