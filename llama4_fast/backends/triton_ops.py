"""The `triton` backend: the launchers in `llama4_fast.kernels`, wrapped as torch custom ops.

Custom ops with fake (meta) implementations let `torch.compile` trace through them and keep
them capturable in CUDA graphs. The backend supports CUDA tensors, and CPU tensors when
TRITON_INTERPRET=1 (how the kernels are tested without a GPU). The interpreter multiplies raw
bit patterns in bf16 `tl.dot` (triton issue 11584) and truncates fp32 -> bf16 casts, so there
it declines bf16 inputs and the registry falls through to the `torch` backend.
"""

from __future__ import annotations

import torch

from llama4_fast import kernels, registry
from llama4_fast.quant import QuantWeight, expert_kernel_args, kernel_args

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


@torch.library.custom_op("llama4_fast::fused_moe", mutates_args=())
def _fused_moe(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
               topk_weights: torch.Tensor, topk_ids: torch.Tensor,
               apply_router_weight_on_input: bool) -> torch.Tensor:
    return kernels.fused_moe(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids,
                             apply_router_weight_on_input=apply_router_weight_on_input)


@_fused_moe.register_fake
def _(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, apply_router_weight_on_input):
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


def route(router_logits, top_k, scoring="sigmoid", renormalize=False):
    return _route(router_logits, top_k, scoring, renormalize)


def fused_moe(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, *, apply_router_weight_on_input=True):
    if isinstance(gate_up_proj, QuantWeight):
        kw = expert_kernel_args(gate_up_proj, down_proj)
        return _fused_moe_quant(hidden_states, gate_up_proj.tensors()[0], down_proj.tensors()[0], topk_weights,
                                topk_ids, apply_router_weight_on_input, kw["weight_format"], kw["gate_up_scale"],
                                kw["down_scale"], kw["gate_up_zero"], kw["down_zero"], kw["group_size"],
                                kw["act_scale_ub"])
    return _fused_moe(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, apply_router_weight_on_input)


def quant_linear(x, weight):
    kw = kernel_args(weight)
    return _quant_linear(x, kw["qweight"], kw["scale"], kw["zero"], kw["weight_format"], kw["group_size"],
                         kw["act_scale_ub"])


def attention(q, k, v, *, chunk_size=None, scale=None, kv_start=0, kv_len=None):
    if isinstance(kv_start, torch.Tensor):
        return _attention(q, k, v, chunk_size, scale, 0, kv_start, kv_len)
    return _attention(q, k, v, chunk_size, scale, kv_start, None, kv_len)


def qk_prologue(q, k, *, cos=None, sin=None, qk_norm_eps=None, positions=None, temperature=None,
                q_out=None, k_out=None):
    q_buf, k_buf = kernels.prologue.plan_outputs(q, k, q_out, k_out, rope=cos is not None,
                                                 qk_norm=qk_norm_eps is not None, temperature=temperature is not None)
    if q_buf is not None or k_buf is not None:
        floor_scale, attn_scale = (None, None) if temperature is None else temperature
        _qk_prologue(q, k, q_buf, k_buf, cos, sin, positions, qk_norm_eps, floor_scale, attn_scale)
    return (q if q_buf is None else q_buf), (k if k_buf is None else k_buf)


def _tensors(w) -> tuple[torch.Tensor, ...]:
    return w.tensors() if isinstance(w, QuantWeight) else (w,)


registry.register("route", "triton", route, priority=PRIORITY,
                  supports=lambda logits, *a, **kw: _supported(logits))
registry.register("fused_moe", "triton", fused_moe, priority=PRIORITY,
                  supports=lambda x, w13, w2, w, ids, **kw: _supported(x, *_tensors(w13), *_tensors(w2), w, ids))
registry.register("attention", "triton", attention, priority=PRIORITY,
                  supports=lambda q, k, v, **kw: _supported(q, k, v) and kernels.attention.supports_head_dim(q.shape[-1]))
registry.register("qk_prologue", "triton", qk_prologue, priority=PRIORITY,
                  supports=lambda q, k, **kw: _supported(q, k) and q.shape[-1] <= kernels.prologue.MAX_HEAD_DIM)
registry.register("quant_linear", "triton", quant_linear, priority=PRIORITY,
                  supports=lambda x, weight: _supported(x, *weight.tensors()))
