"""The `triton` backend: the launchers in `llama4_fast.kernels`, wrapped as torch custom ops.

Custom ops with fake (meta) implementations let `torch.compile` trace through them and keep
them capturable in CUDA graphs. The backend supports CUDA tensors, and CPU tensors when
TRITON_INTERPRET=1 (how the kernels are tested without a GPU). The interpreter multiplies raw
bit patterns in bf16 `tl.dot` (triton issue 11584), so there it declines bf16 inputs and the
registry falls through to the `torch` backend.
"""

from __future__ import annotations

import torch

from llama4_fast import kernels, registry
from llama4_fast.quant import Int4Weight

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


def _weight_args(w) -> tuple:
    """A quant format object as the kernels' plain arguments: (qweight, scale, zero, format,
    group_size, act_scale_ub)."""
    if isinstance(w, Int4Weight):
        return w.packed, w.scale, w.zero, "int4", w.group_size, None
    return w.qweight, w.scale, None, w.kernel_format, 128, w.act_scale_ub


# A custom-op schema cannot take "int or Tensor", so kv_start travels as both.
@torch.library.custom_op("llama4_fast::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int | None, scale: float | None,
               kv_start_int: int, kv_start_tensor: torch.Tensor | None) -> torch.Tensor:
    kv_start = kv_start_int if kv_start_tensor is None else kv_start_tensor
    return kernels.chunked_attention(q, k, v, chunk_size=chunk_size, scale=scale, kv_start=kv_start)


@_attention.register_fake
def _(q, k, v, chunk_size, scale, kv_start_int, kv_start_tensor):
    return torch.empty_like(q)


def route(router_logits, top_k, scoring="sigmoid", renormalize=False):
    return _route(router_logits, top_k, scoring, renormalize)


def fused_moe(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, *, apply_router_weight_on_input=True):
    return _fused_moe(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, apply_router_weight_on_input)


def quant_linear(x, weight):
    return _quant_linear(x, *_weight_args(weight))


def attention(q, k, v, *, chunk_size=None, scale=None, kv_start=0):
    if isinstance(kv_start, torch.Tensor):
        return _attention(q, k, v, chunk_size, scale, 0, kv_start)
    return _attention(q, k, v, chunk_size, scale, kv_start, None)


registry.register("route", "triton", route, priority=PRIORITY,
                  supports=lambda logits, *a, **kw: _supported(logits))
registry.register("fused_moe", "triton", fused_moe, priority=PRIORITY,
                  supports=lambda x, w13, w2, w, ids, **kw: _supported(x, w13, w2, w, ids))
registry.register("attention", "triton", attention, priority=PRIORITY,
                  supports=lambda q, k, v, **kw: _supported(q, k, v) and kernels.attention.supports_head_dim(q.shape[-1]))
registry.register("quant_linear", "triton", quant_linear, priority=PRIORITY,
                  supports=lambda x, weight: _supported(x, *weight.tensors()))
