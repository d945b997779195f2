"""The `triton` backend: the launchers in `llama4_fast.kernels`, wrapped as torch custom ops.

Custom ops with fake (meta) implementations let `torch.compile` trace through them and keep
them capturable in CUDA graphs. Training: when grad mode is on and an input requires grad,
each op runs a `*_train` twin that also returns what its backward needs (the MoE's
pre-activations, attention's log-sum-exp), with the backward registered on it
(`torch.library.register_autograd`) and run by backward custom ops; inference never pays for
the saved tensors. Quantized weights are frozen (their backward gives dX and the router
weight's gradient from the dequantized weights, QLoRA style). The backend supports CUDA tensors, and CPU tensors when
TRITON_INTERPRET=1 (how the kernels are tested without a GPU). The interpreter multiplies raw
bit patterns in bf16 `tl.dot` (triton issue 11584) and truncates fp32 -> bf16 casts, so there
it declines bf16 inputs and the registry falls through to the `torch` backend.
"""

from __future__ import annotations

import torch

from llama4_fast import kernels, registry
from llama4_fast.quant import QuantWeight, expert_kernel_args, from_kernel_args, kernel_args

PRIORITY = 10  # preferred over the torch reference wherever it supports the inputs


def _supported(*tensors: torch.Tensor) -> bool:
    if all(t.is_cuda for t in tensors):
        return True
    if kernels.checks.interpreting() and all(t.device.type == "cpu" for t in tensors):
        return not any(t.dtype == torch.bfloat16 for t in tensors)
    return False


@torch.library.custom_op("llama4_fast::route", mutates_args=())
def _route(router_logits: torch.Tensor, top_k: int, scoring: str,
           renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.route(router_logits, top_k, scoring, renormalize)


@_route.register_fake
def _(router_logits, top_k, scoring, renormalize):
    T = router_logits.shape[0]
    return (router_logits.new_empty(T, top_k, dtype=torch.float32),
            router_logits.new_empty(T, top_k, dtype=torch.int32))


# The dense MoE ops take fused_moe's options for transformers' other experts as their last
# arguments, (gate_up_bias, down_bias, activation, gate_up_interleaved, swiglu_limit,
# swiglu_alpha, skip_sentinel_ids): clamped_swiglu travels as its two floats (None: not clamped).
def _variant_kwargs(gate_up_bias, down_bias, activation, gate_up_interleaved, swiglu_limit, swiglu_alpha,
                    skip_sentinel_ids) -> dict:
    return dict(gate_up_bias=gate_up_bias, down_bias=down_bias, activation=activation,
                gate_up_interleaved=gate_up_interleaved, skip_sentinel_ids=skip_sentinel_ids,
                clamped_swiglu=None if swiglu_limit is None else (swiglu_limit, swiglu_alpha))


@torch.library.custom_op("llama4_fast::fused_moe", mutates_args=())
def _fused_moe(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
               topk_weights: torch.Tensor, topk_ids: torch.Tensor, apply_router_weight_on_input: bool,
               gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, activation: str,
               gate_up_interleaved: bool, swiglu_limit: float | None, swiglu_alpha: float | None,
               skip_sentinel_ids: bool) -> torch.Tensor:
    return kernels.fused_moe(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids,
                             apply_router_weight_on_input=apply_router_weight_on_input,
                             **_variant_kwargs(gate_up_bias, down_bias, activation, gate_up_interleaved, swiglu_limit,
                                               swiglu_alpha, skip_sentinel_ids))


@_fused_moe.register_fake
def _(hidden_states, *args):
    return torch.empty_like(hidden_states)


@torch.library.custom_op("llama4_fast::quant_linear", mutates_args=())
def _quant_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  weight_format: str, group_size: int, act_scale_ub: float | None) -> torch.Tensor:
    return kernels.quant_matmul(x, qweight, scale, weight_format=weight_format, zero=zero, group_size=group_size,
                                act_scale_ub=act_scale_ub)


@_quant_linear.register_fake
def _(x, qweight, scale, zero, weight_format, group_size, act_scale_ub):
    return x.new_empty(x.shape[0], qweight.shape[1])


@torch.library.custom_op("llama4_fast::fused_moe_quant", mutates_args=())
def _fused_moe_quant(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor, apply_router_weight_on_input: bool,
                     weight_format: str, gate_up_scale: torch.Tensor, down_scale: torch.Tensor,
                     gate_up_zero: torch.Tensor | None, down_zero: torch.Tensor | None, group_size: int,
                     act_scale_ub: float | None) -> torch.Tensor:
    return kernels.fused_moe(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids,
                             apply_router_weight_on_input=apply_router_weight_on_input, weight_format=weight_format,
                             gate_up_scale=gate_up_scale, down_scale=down_scale, gate_up_zero=gate_up_zero,
                             down_zero=down_zero, group_size=group_size, act_scale_ub=act_scale_ub)


@_fused_moe_quant.register_fake
def _(hidden_states, *args):
    return torch.empty_like(hidden_states)


# A custom-op schema cannot take "int or Tensor", so kv_start travels as both.
@torch.library.custom_op("llama4_fast::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int | None, scale: float | None,
               kv_start_int: int, kv_start_tensor: torch.Tensor | None,
               kv_len: torch.Tensor | None) -> torch.Tensor:
    kv_start = kv_start_int if kv_start_tensor is None else kv_start_tensor
    return kernels.chunked_attention(q, k, v, chunk_size=chunk_size, scale=scale, kv_start=kv_start, kv_len=kv_len)


@_attention.register_fake
def _(q, k, v, chunk_size, scale, kv_start_int, kv_start_tensor, kv_len):
    return torch.empty_like(q)


# Writes its outputs in place, so the wrapper below allocates them (outside the op, where
# torch.compile sees the allocation) and a pass-through tensor is never an output alias.
@torch.library.custom_op("llama4_fast::qk_prologue", mutates_args=("q_out", "k_out"))
def _qk_prologue(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor | None, k_out: torch.Tensor | None,
                 cos: torch.Tensor | None, sin: torch.Tensor | None, positions: torch.Tensor | None,
                 qk_norm_eps: float | None, floor_scale: float | None, attn_scale: float | None) -> None:
    temperature = None if floor_scale is None else (floor_scale, attn_scale)
    kernels.qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=qk_norm_eps, positions=positions,
                        temperature=temperature, q_out=q_out, k_out=k_out)


@_qk_prologue.register_fake
def _(q, k, q_out, k_out, cos, sin, positions, qk_norm_eps, floor_scale, attn_scale):
    return None


# -- training: forward twins that save for the backward, and the backward ops ---------------------

def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _route_backward(ctx, grad_weights, grad_ids):
    """d logits [T, E] from d weights [T, k]: sigmoid scoring touches only the chosen logits
    (w' = w (1 - w)); softmax (with or without renormalizing the k weights) couples the row."""
    logits, weights, ids = ctx.saved_tensors
    ids = ids.long()
    g = grad_weights.float()
    if ctx.scoring == "sigmoid":
        d = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, ids, g * weights * (1 - weights))
        return d.to(logits.dtype), None, None, None
    if ctx.renormalize:  # w_j = p_j / S with S the sum of the chosen p: dL/dp_j = (g_j - sum g w) / S
        probs_sel = torch.softmax(logits.float(), dim=-1).gather(1, ids)
        g = (g - (g * weights).sum(dim=1, keepdim=True)) / probs_sel.sum(dim=1, keepdim=True)
    p = torch.softmax(logits.float(), dim=-1)
    g_full = torch.zeros_like(p).scatter_(1, ids, g)
    d = p * (g_full - (g_full * p).sum(dim=1, keepdim=True))
    return d.to(logits.dtype), None, None, None


def _route_setup(ctx, inputs, output):
    logits, _, scoring, renormalize = inputs
    ctx.scoring, ctx.renormalize = scoring, renormalize
    ctx.save_for_backward(logits, *output)


_route.register_autograd(_route_backward, setup_context=_route_setup)


@torch.library.custom_op("llama4_fast::fused_moe_train", mutates_args=())
def _fused_moe_train(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor, apply_router_weight_on_input: bool,
                     gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, activation: str,
                     gate_up_interleaved: bool, swiglu_limit: float | None, swiglu_alpha: float | None,
                     skip_sentinel_ids: bool) -> tuple[torch.Tensor, torch.Tensor]:
    preact = hidden_states.new_empty(topk_ids.numel(), gate_up_proj.shape[2])
    out = kernels.fused_moe(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids,
                            apply_router_weight_on_input=apply_router_weight_on_input, preact=preact,
                            **_variant_kwargs(gate_up_bias, down_bias, activation, gate_up_interleaved, swiglu_limit,
                                              swiglu_alpha, skip_sentinel_ids))
    return out, preact


def _fused_moe_train_fake(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, *args):
    """(out, preact) of both training forwards: gate_up_proj's last dim is 2I in every format."""
    return torch.empty_like(hidden_states), hidden_states.new_empty(topk_ids.numel(), gate_up_proj.shape[2])


_fused_moe_train.register_fake(_fused_moe_train_fake)


@torch.library.custom_op("llama4_fast::fused_moe_train_quant", mutates_args=())
def _fused_moe_train_quant(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                           topk_weights: torch.Tensor, topk_ids: torch.Tensor, apply_router_weight_on_input: bool,
                           weight_format: str, gate_up_scale: torch.Tensor, down_scale: torch.Tensor,
                           gate_up_zero: torch.Tensor | None, down_zero: torch.Tensor | None, group_size: int,
                           act_scale_ub: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    preact = hidden_states.new_empty(topk_ids.numel(), gate_up_proj.shape[2])
    out = kernels.fused_moe(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids,
                            apply_router_weight_on_input=apply_router_weight_on_input, weight_format=weight_format,
                            gate_up_scale=gate_up_scale, down_scale=down_scale, gate_up_zero=gate_up_zero,
                            down_zero=down_zero, group_size=group_size, act_scale_ub=act_scale_ub, preact=preact)
    return out, preact


_fused_moe_train_quant.register_fake(_fused_moe_train_fake)


@torch.library.custom_op("llama4_fast::fused_moe_backward", mutates_args=())
def _fused_moe_backward(grad_out: torch.Tensor, hidden_states: torch.Tensor, gate_up_proj: torch.Tensor,
                        down_proj: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        preact: torch.Tensor, apply_router_weight_on_input: bool, weight_grads: bool,
                        gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, activation: str,
                        gate_up_interleaved: bool, swiglu_limit: float | None, swiglu_alpha: float | None,
                        skip_sentinel_ids: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor]:
    grads = kernels.moe.fused_moe_backward(
        grad_out.to(hidden_states.dtype), hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, preact,
        apply_router_weight_on_input=apply_router_weight_on_input, weight_grads=weight_grads,
        **_variant_kwargs(gate_up_bias, down_bias, activation, gate_up_interleaved, swiglu_limit, swiglu_alpha,
                          skip_sentinel_ids))
    dx, d13, d2, dw, d_b13, d_b2 = grads if len(grads) == 6 else (*grads, None, None)
    # an op cannot return None; an empty tensor says "no gradient"
    return dx, *(hidden_states.new_empty(0) if g is None else g for g in (d13, d2)), dw, \
        *(hidden_states.new_empty(0) if g is None else g for g in (d_b13, d_b2))


@_fused_moe_backward.register_fake
def _(grad_out, hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, preact, on_input, weight_grads,
      gate_up_bias, down_bias, *args):
    def like(t):
        return torch.empty_like(t) if weight_grads and t is not None else hidden_states.new_empty(0)

    return (torch.empty_like(hidden_states), like(gate_up_proj), like(down_proj), torch.empty_like(topk_weights),
            like(gate_up_bias), like(down_bias))


def _fused_moe_setup(ctx, inputs, output):
    """Dense experts: inputs are _fused_moe_train's (tensors, on_input, then the variant)."""
    hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, on_input, b13, b2 = inputs[:8]
    ctx.on_input = on_input
    ctx.quant = ()
    ctx.variant = inputs[8:]  # (activation, gate_up_interleaved, swiglu_limit, swiglu_alpha, skip_sentinel_ids)
    ctx.save_for_backward(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, output[1], b13, b2)


def _fused_moe_quant_setup(ctx, inputs, output):
    hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, on_input = inputs[:6]
    ctx.on_input = on_input
    ctx.quant = inputs[6:]  # (weight_format, scales, zeros, group_size, act_scale_ub)
    ctx.save_for_backward(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, output[1])


def _fused_moe_grads(ctx, grad_out, grad_preact):
    if ctx.quant:  # frozen quantized experts: dX and dw through the dequantized weights
        x, w13, w2, weights, ids, preact = ctx.saved_tensors
        fmt, s13, s2, z13, z2, group_size, ub = ctx.quant
        w13 = from_kernel_args(w13, fmt, s13, z13, group_size, ub).dequantize(x.dtype)
        w2 = from_kernel_args(w2, fmt, s2, z2, group_size, ub).dequantize(x.dtype)
        dx, _, _, dw, _, _ = _fused_moe_backward(grad_out, x, w13, w2, weights, ids, preact, ctx.on_input, False,
                                                 None, None, "silu", False, None, None, False)
        return (dx, None, None, dw, None, None) + (None,) * len(ctx.quant)
    x, w13, w2, weights, ids, preact, b13, b2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    weight_grads = need[1] or need[2] or need[6] or need[7]
    dx, d13, d2, dw, d_b13, d_b2 = _fused_moe_backward(grad_out, x, w13, w2, weights, ids, preact, ctx.on_input,
                                                       weight_grads, b13, b2, *ctx.variant)
    return (dx, d13 if need[1] else None, d2 if need[2] else None, dw, None, None,
            d_b13 if need[6] else None, d_b2 if need[7] else None) + (None,) * len(ctx.variant)


_fused_moe_train.register_autograd(_fused_moe_grads, setup_context=_fused_moe_setup)
_fused_moe_train_quant.register_autograd(_fused_moe_grads, setup_context=_fused_moe_quant_setup)


@torch.library.custom_op("llama4_fast::attention_train", mutates_args=())
def _attention_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int | None,
                     scale: float | None, kv_start_int: int,
                     kv_start_tensor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    kv_start = kv_start_int if kv_start_tensor is None else kv_start_tensor
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    out = kernels.chunked_attention(q, k, v, chunk_size=chunk_size, scale=scale, kv_start=kv_start, lse=lse)
    return out, lse


@_attention_train.register_fake
def _(q, k, v, chunk_size, scale, kv_start_int, kv_start_tensor):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("llama4_fast::attention_backward", mutates_args=())
def _attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, chunk_size: int | None, scale: float | None,
                        kv_start_int: int,
                        kv_start_tensor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kv_start = kv_start_int if kv_start_tensor is None else kv_start_tensor
    return kernels.chunked_attention_backward(grad_out, q, k, v, out, lse, chunk_size=chunk_size, scale=scale,
                                              kv_start=kv_start)


@_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, chunk_size, scale, kv_start_int, kv_start_tensor):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, chunk_size, scale, kv_start_int, kv_start_tensor = inputs
    ctx.args = (chunk_size, scale, kv_start_int)
    ctx.save_for_backward(q, k, v, *output, kv_start_tensor)


def _attention_grads(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_start_tensor = ctx.saved_tensors
    chunk_size, scale, kv_start_int = ctx.args
    dq, dk, dv = _attention_backward(grad_out, q, k, v, out, lse, chunk_size, scale, kv_start_int, kv_start_tensor)
    return dq, dk, dv, None, None, None, None


_attention_train.register_autograd(_attention_grads, setup_context=_attention_setup)


def _quant_linear_setup(ctx, inputs, output):
    x, qweight, scale, zero, weight_format, group_size, act_scale_ub = inputs
    ctx.format = (weight_format, group_size, act_scale_ub)
    ctx.save_for_backward(qweight, scale, zero)


def _quant_linear_grads(ctx, grad_y):
    """dX = dY @ W^T with W dequantized (the activation rounding of FP8 formats is passed
    straight through); the quantized weight itself is frozen."""
    qweight, scale, zero = ctx.saved_tensors
    fmt, group_size, ub = ctx.format
    w = from_kernel_args(qweight, fmt, scale, zero, group_size, ub).dequantize(torch.float32)
    dx = (grad_y.float() @ w.t()).to(grad_y.dtype)
    return dx, None, None, None, None, None, None


_quant_linear.register_autograd(_quant_linear_grads, setup_context=_quant_linear_setup)


# -- the backend's functions (registered below) ---------------------------------------------------

def route(router_logits, top_k, scoring="sigmoid", renormalize=False):
    return _route(router_logits, top_k, scoring, renormalize)


def fused_moe(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, *, apply_router_weight_on_input=True,
              gate_up_bias=None, down_bias=None, activation="silu", gate_up_interleaved=False, clamped_swiglu=None,
              skip_sentinel_ids=False):
    on_input = apply_router_weight_on_input
    if isinstance(gate_up_proj, QuantWeight):
        kw = expert_kernel_args(gate_up_proj, down_proj)
        args = (hidden_states, gate_up_proj.tensors()[0], down_proj.tensors()[0], topk_weights, topk_ids, on_input,
                kw["weight_format"], kw["gate_up_scale"], kw["down_scale"], kw["gate_up_zero"], kw["down_zero"],
                kw["group_size"], kw["act_scale_ub"])
        if _needs_grad(hidden_states, topk_weights):
            return _fused_moe_train_quant(*args)[0]
        return _fused_moe_quant(*args)
    limit, alpha = (None, None) if clamped_swiglu is None else clamped_swiglu
    args = (hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, on_input, gate_up_bias, down_bias,
            activation, gate_up_interleaved, limit, alpha, skip_sentinel_ids)
    if _needs_grad(hidden_states, gate_up_proj, down_proj, topk_weights, gate_up_bias, down_bias):
        return _fused_moe_train(*args)[0]
    return _fused_moe(*args)


def quant_linear(x, weight):
    kw = kernel_args(weight)
    return _quant_linear(x, kw["qweight"], kw["scale"], kw["zero"], kw["weight_format"], kw["group_size"],
                         kw["act_scale_ub"])


def attention(q, k, v, *, chunk_size=None, scale=None, kv_start=0, kv_len=None):
    if _needs_grad(q, k, v):
        if kv_len is not None:
            raise NotImplementedError("attention with kv_len (a static KV cache) has no backward; train without "
                                      "a static cache (transformers: use_cache=False or the dynamic cache)")
        kv_int, kv_tensor = (0, kv_start) if isinstance(kv_start, torch.Tensor) else (kv_start, None)
        return _attention_train(q, k, v, chunk_size, scale, kv_int, kv_tensor)[0]
    if isinstance(kv_start, torch.Tensor):
        return _attention(q, k, v, chunk_size, scale, 0, kv_start, kv_len)
    return _attention(q, k, v, chunk_size, scale, kv_start, None, kv_len)


class _QkPrologueGrad(torch.autograd.Function):
    """The prologue kernel forward; the backward differentiates the torch backend's chain of
    the same steps (recomputed from the saved q, k: a few elementwise ops per head), exact
    float math with no kernel of its own to keep in step."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, positions, qk_norm_eps, temperature):
        ctx.save_for_backward(q, k, cos, sin, positions)
        ctx.steps = (qk_norm_eps, temperature)
        q_out, k_out = _qk_prologue_into(q, k, cos, sin, positions, qk_norm_eps, temperature,
                                         torch.empty_like(q, memory_format=torch.contiguous_format),
                                         torch.empty_like(k, memory_format=torch.contiguous_format))
        return q_out, k_out

    @staticmethod
    def backward(ctx, d_q, d_k):
        from llama4_fast.backends import torch_ref

        q, k, cos, sin, positions = ctx.saved_tensors
        qk_norm_eps, temperature = ctx.steps
        leaves = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip((q, k, cos, sin), ctx.needs_input_grad[:4])]
        with torch.enable_grad():
            q_new, k_new = torch_ref.qk_prologue(leaves[0], leaves[1], cos=leaves[2], sin=leaves[3],
                                                 qk_norm_eps=qk_norm_eps, positions=positions, temperature=temperature)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            outs = [(o, d) for o, d in ((q_new, d_q), (k_new, d_k)) if o.requires_grad and d is not None]
            grads = iter(torch.autograd.grad([o for o, _ in outs], wanted, [d for _, d in outs], allow_unused=True))
        return (*(next(grads) if t is not None and t.requires_grad else None for t in leaves), None, None, None)


def _qk_prologue_into(q, k, cos, sin, positions, qk_norm_eps, temperature, q_buf, k_buf):
    floor_scale, attn_scale = (None, None) if temperature is None else temperature
    _qk_prologue(q, k, q_buf, k_buf, cos, sin, positions, qk_norm_eps, floor_scale, attn_scale)
    return (q if q_buf is None else q_buf), (k if k_buf is None else k_buf)


def qk_prologue(q, k, *, cos=None, sin=None, qk_norm_eps=None, positions=None, temperature=None,
                q_out=None, k_out=None):
    if _needs_grad(q, k, cos, sin):
        if q_out is not None or k_out is not None:
            raise ValueError("qk_prologue: q_out / k_out cannot be used while q, k, cos or sin require grad "
                             "(an output written in place has no gradient); leave them None in training")
        return _QkPrologueGrad.apply(q, k, cos, sin, positions, qk_norm_eps, temperature)
    q_buf, k_buf = kernels.prologue.plan_outputs(q, k, q_out, k_out, rope=cos is not None,
                                                 qk_norm=qk_norm_eps is not None, temperature=temperature is not None)
    if q_buf is None and k_buf is None:
        return q, k
    return _qk_prologue_into(q, k, cos, sin, positions, qk_norm_eps, temperature, q_buf, k_buf)


def _tensors(w) -> tuple[torch.Tensor, ...]:
    return w.tensors() if isinstance(w, QuantWeight) else (w,)


registry.register("route", "triton", route, priority=PRIORITY,
                  supports=lambda logits, *a, **kw: _supported(logits))
registry.register("fused_moe", "triton", fused_moe, priority=PRIORITY,
                  supports=lambda x, w13, w2, w, ids, gate_up_bias=None, down_bias=None, **kw: _supported(
                      x, *_tensors(w13), *_tensors(w2), w, ids,
                      *(b for b in (gate_up_bias, down_bias) if b is not None)))
registry.register("attention", "triton", attention, priority=PRIORITY,
                  supports=lambda q, k, v, **kw: _supported(q, k, v) and kernels.attention.supports_head_dim(q.shape[-1]))
registry.register("qk_prologue", "triton", qk_prologue, priority=PRIORITY,
                  supports=lambda q, k, **kw: _supported(q, k) and q.shape[-1] <= kernels.prologue.MAX_HEAD_DIM)
registry.register("quant_linear", "triton", quant_linear, priority=PRIORITY,
                  supports=lambda x, weight: _supported(x, *weight.tensors()))
