"""The `torch` backend: plain PyTorch reference implementations that run anywhere.

They define the semantics the Triton kernels must match (see `llama4_fast.ops` for the
contracts) and are reasonably fast on CPU: the MoE runs only the selected experts, attention
reads grouped K/V without repeating it and visits only the keys a query block can see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama4_fast import quant, registry

# Queries per block in the attention reference: bounds the [B, H, block, keys] score tensor.
_ATTN_QUERY_BLOCK = 512


def _top_k(scores, k):
    """torch.topk with the kernel's order on ties: the lower expert index first (a stable sort);
    NaN ranks highest, as in torch.topk."""
    values, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], ids[..., :k]


@registry.register("route", "torch")
def route(router_logits, top_k, scoring="sigmoid", renormalize=False):
    # Both scorings rank the logits, not the scores: softmax keeps their order, but not where
    # it turns a row with a NaN or +inf all NaN, or rounds distinct small probabilities to 0.
    logits, ids = _top_k(router_logits, top_k)
    if scoring == "sigmoid":
        weights = torch.sigmoid(logits.float())
    else:
        weights = torch.softmax(router_logits.float(), dim=-1).gather(-1, ids)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


def _glu(gate_up, activation="silu", gate_up_interleaved=False, clamped_swiglu=None):
    """The experts' gate on gate_up [rows, 2I]: act(gate) * up, or gpt-oss's clamped SwiGLU."""
    inter = gate_up.shape[1] // 2
    if gate_up_interleaved:
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    else:
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
    if clamped_swiglu is None:
        return _ACTIVATIONS[activation](gate) * up
    limit, alpha = clamped_swiglu
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@registry.register("fused_moe", "torch")
def fused_moe(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, *,
              apply_router_weight_on_input=True, gate_up_bias=None, down_bias=None, activation="silu",
              gate_up_interleaved=False, clamped_swiglu=None, skip_sentinel_ids=False):
    if isinstance(gate_up_proj, quant.QuantWeight):
        return quant.fused_moe_ref(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids,
                                   apply_router_weight_on_input)
    T, H = hidden_states.shape
    E, top_k = gate_up_proj.shape[0], topk_ids.shape[1]
    acc_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    out = torch.zeros(T, H, dtype=acc_dtype, device=hidden_states.device)
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=E).tolist()
    flat_weights = topk_weights.reshape(-1).to(acc_dtype)
    start = 0
    for expert, n in enumerate(counts[:E]):  # ids >= E (expert-parallel sentinels) sort last: skipped
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        rows = pairs // top_k
        x = hidden_states[rows]
        w = flat_weights[pairs, None]
        if apply_router_weight_on_input:
            x = (x.to(acc_dtype) * w).to(hidden_states.dtype)
        gate_up = x @ gate_up_proj[expert]
        if gate_up_bias is not None:
            gate_up = gate_up + gate_up_bias[expert]
        h = _glu(gate_up, activation, gate_up_interleaved, clamped_swiglu)
        y = h @ down_proj[expert]
        if down_bias is not None:
            y = y + down_bias[expert]
        y = y.to(acc_dtype)
        if not apply_router_weight_on_input:
            y = y * w
        out.index_add_(0, rows, y)
    return out.to(hidden_states.dtype)


@registry.register("quant_linear", "torch")
def quant_linear(x, weight):
    return quant.quant_linear_ref(x, weight)


def key_positions_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Boolean [..., Sq, Skv] mask from absolute positions q_pos [..., Sq] and k_pos [..., Skv]:
    causal, no negative (padding) keys, and same chunk when chunk_size is set."""
    q = q_pos[..., :, None]
    s = k_pos[..., None, :]
    visible = (s <= q) & (s >= 0)
    if chunk_size is not None:
        visible &= torch.div(s, chunk_size, rounding_mode="floor") == torch.div(q, chunk_size, rounding_mode="floor")
    return visible


@registry.register("attention", "torch")
def attention(q, k, v, *, chunk_size=None, scale=None, kv_start=0, kv_len=None):
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    starts = kv_start.long().view(B, 1) if isinstance(kv_start, torch.Tensor) else \
        torch.full((B, 1), kv_start, dtype=torch.long, device=q.device)
    if kv_len is not None:  # keys past kv_len[b] do not exist; read on the device, no sync
        return _attention_with_lengths(q, k, v, chunk_size, scale, starts, kv_len.long().view(B, 1))
    first_query = Skv - Sq
    # [B, Hkv, group, Sq, D]: query heads of one KV head are adjacent, so no K/V copy is needed.
    qg = q.reshape(B, Hkv, group, Sq, D)
    out = torch.empty(B, Hkv, group, Sq, D, dtype=q.dtype, device=q.device)
    for i0 in range(0, Sq, _ATTN_QUERY_BLOCK):
        i1 = min(i0 + _ATTN_QUERY_BLOCK, Sq)
        hi = first_query + i1  # causal: no query of the block sees a key past this index
        # A chunked query sees at most chunk_size - 1 keys before itself, whatever its start.
        lo = 0 if chunk_size is None else max(0, first_query + i0 - chunk_size + 1)
        q_pos = starts + first_query + torch.arange(i0, i1, device=q.device)
        k_pos = starts + torch.arange(lo, hi, device=q.device)
        visible = key_positions_visible(q_pos, k_pos, chunk_size)[:, None, None]  # [B,1,1,bq,bk]
        scores = torch.matmul(qg[:, :, :, i0:i1].float(), k[:, :, None, lo:hi].float().transpose(-1, -2))
        scores = scores * scale
        probs = _masked_softmax(scores, visible)
        out[:, :, :, i0:i1] = _weighted_values(probs, v[:, :, None, lo:hi], visible).to(q.dtype)
    return out.reshape(B, Hq, Sq, D)


def _masked_softmax(scores, visible):
    """softmax over the visible scores. A row that sees no key gets a uniform softmax of zeros
    instead of 0/0, which _weighted_values then zeroes: the same forward, and a backward
    without the NaN that softmax's gradient of an all -inf row would spread (training with
    left padding). A row whose visible scores are all -inf is still NaN, as softmax says."""
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores.masked_fill(~visible.any(-1, keepdim=True), 0.0), dim=-1)


def _weighted_values(probs, values, visible):
    """probs @ values with softmax's NaN/inf kept, except where masking says otherwise: a row
    that sees no key is zeros (its softmax is 0/0), and a key that no row sees (padding, past
    kv_len, outside every row's chunk) is zeroed first, so a NaN in its v (0 x NaN) never
    matters. visible [B, 1, 1, q, keys] broadcasts against probs [B, Hkv, group, q, keys]."""
    values = values.float().masked_fill(~visible.any(-2)[..., None], 0.0)
    return torch.matmul(probs, values).masked_fill(~visible.any(-1, keepdim=True), 0.0)


def _attention_with_lengths(q, k, v, chunk_size, scale, starts, kv_len):
    """attention over the first kv_len[b] keys of each sequence, queries the last Sq of them."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    keys = torch.arange(Skv, device=q.device)
    q_idx = kv_len - Sq + torch.arange(Sq, device=q.device)  # [B, Sq] key index of each query
    visible = key_positions_visible(starts + q_idx, starts + keys, chunk_size) & (keys < kv_len)[:, None, :]
    qg = q.reshape(B, Hkv, Hq // Hkv, Sq, D).float()
    scores = torch.matmul(qg, k[:, :, None].float().transpose(-1, -2)) * scale
    probs = _masked_softmax(scores, visible[:, None, None])
    # Slots past kv_len are seen by no row: 0 * (whatever a stale cache slot holds) is not NaN.
    out = _weighted_values(probs, v[:, :, None], visible[:, None, None])
    return out.to(q.dtype).reshape(B, Hq, Sq, D)


@registry.register("rms_norm", "torch")
def rms_norm(x, weight, eps):
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


@registry.register("rope", "torch")
def rope(x, cos, sin):
    # A pair (even, odd) times cos + i sin, as one complex multiply: two ops instead of eight.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    turn = torch.complex(cos, sin)[:, :, None, :]
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)


@registry.register("qk_prologue", "torch")
def qk_prologue(q, k, *, cos=None, sin=None, qk_norm_eps=None, positions=None, temperature=None,
                q_out=None, k_out=None):
    """The separate ops chained as the model runs them (each rounds to the input dtype)."""
    q_new = k_new = None
    if cos is not None:
        q_new, k_new = rope(q, cos, sin), rope(k, cos, sin)
    if qk_norm_eps is not None:
        q_new = rms_norm(q if q_new is None else q_new, None, qk_norm_eps)
        k_new = rms_norm(k if k_new is None else k_new, None, qk_norm_eps)
    if temperature is not None:
        floor_scale, attn_scale = temperature
        pos = positions.float()
        scale = torch.log1p(torch.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0
        x = q if q_new is None else q_new
        q_new = (x * scale.view(-1, x.shape[1], 1, 1)).to(x.dtype)  # [S] or [B, S] -> broadcast
    results = []
    for x, new, out in ((q, q_new, q_out), (k, k_new, k_out)):
        if out is not None:
            results.append(out.copy_(x if new is None else new))
        else:
            results.append(x if new is None else new.contiguous())
    return tuple(results)
