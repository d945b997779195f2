"""Float64 references, written as plainly as possible (dense masks, per-pair loops).

They restate the Llama 4 math of DESIGN.md independently of the code under test; every
backend and kernel is compared against these.
"""

import math

import torch


def route64(logits, top_k, scoring="sigmoid", renormalize=False):
    """-> (weights [T,k] float64, ids [T,k] int64), ids in descending logit order, ties to the
    lower expert index."""
    x = logits.detach().double().cpu()
    ids = torch.argsort(x, dim=-1, descending=True, stable=True)[:, :top_k]
    if scoring == "sigmoid":
        w = torch.sigmoid(torch.gather(x, 1, ids))
    else:
        w = torch.gather(torch.softmax(x, dim=-1), 1, ids)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
    return w, ids


def moe64(x, gate_up, down, weights, ids, on_input=True):
    """sum_j expert_{ids[t,j]}(x_t * w) (or w * expert(x_t)) per token, in float64; ids
    outside [0, E) contribute nothing (as the CUDA kernel skips them)."""
    x, gate_up, down, weights = (t.detach().double().cpu() for t in (x, gate_up, down, weights))
    ids = ids.cpu()
    inter = down.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), weights[t, j]
            if not 0 <= e < gate_up.shape[0]:
                continue
            xi = x[t] * w if on_input else x[t]
            gu = xi @ gate_up[e]
            y = (torch.nn.functional.silu(gu[:inter]) * gu[inter:]) @ down[e]
            out[t] += y if on_input else w * y
    return out


def visible64(B, Sq, Skv, chunk_size=None, kv_start=0):
    """bool [B, Sq, Skv]: may query i of sequence b attend key j (DESIGN.md positions)."""
    starts = kv_start.tolist() if isinstance(kv_start, torch.Tensor) else [kv_start] * B
    mask = torch.zeros(B, Sq, Skv, dtype=torch.bool)
    for b in range(B):
        for i in range(Sq):
            p = starts[b] + Skv - Sq + i
            for j in range(Skv):
                s = starts[b] + j
                ok = 0 <= s <= p
                if chunk_size is not None:
                    ok = ok and s // chunk_size == p // chunk_size
                mask[b, i, j] = ok
    return mask


def attention64(q, k, v, chunk_size=None, scale=None, kv_start=0):
    """Dense masked softmax attention in float64; K/V repeated per query head; rows with no
    visible key are zero."""
    B, Hq, Sq, D = q.shape
    group = Hq // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scale = D ** -0.5 if scale is None else scale
    scores = q.double() @ k.transpose(-1, -2) * scale
    mask = visible64(B, Sq, k.shape[2], chunk_size, kv_start)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def rms_norm64(x, weight, eps):
    x = x.double()
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


def rope64(x, positions, inv_freq):
    """Interleaved-pair rotation as a complex product: x [B, S, H, D], positions [S] or [B, S]."""
    angles = positions.double().reshape(-1, positions.shape[-1], 1) * inv_freq.double()  # [B or 1, S, D/2]
    rot = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2)


def temperature64(q, positions, floor_scale, attn_scale):
    """NoPE query scaling, q [B, S, H, D] times log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1
    per position ([S] or [B, S]), with the floor taken exactly (Python integers / fractions)."""
    from fractions import Fraction

    pos = positions.reshape(-1, positions.shape[-1])
    steps = [[math.floor(Fraction(int(p) + 1) / Fraction(floor_scale)) for p in row] for row in pos.tolist()]
    scale = torch.log1p(torch.tensor(steps, dtype=torch.float64)) * attn_scale + 1.0
    return q.double() * scale[:, :, None, None]
