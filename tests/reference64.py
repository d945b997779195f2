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


def moe64_grads(x, gate_up, down, weights, ids, grad_out, on_input=True):
    """Gradients of moe64's function, by torch.autograd in float64: (dx, d_gate_up, d_down,
    d_weights) for the loss sum(out * grad_out). Written per (token, slot) pair with the
    experts gathered, independently of the kernels' grouping."""
    x, gate_up, down, weights = (t.detach().double().cpu().requires_grad_() for t in (x, gate_up, down, weights))
    ids, grad_out = ids.cpu().long(), grad_out.detach().double().cpu()
    T, k = ids.shape
    inter = down.shape[1]
    valid = ((ids >= 0) & (ids < gate_up.shape[0])).reshape(-1)
    e = ids.reshape(-1).clamp(0, gate_up.shape[0] - 1)
    rows = torch.arange(T).repeat_interleave(k)
    w = weights.reshape(-1, 1)
    xi = x[rows] * w if on_input else x[rows]
    gu = torch.einsum("ph,phn->pn", xi, gate_up[e])
    y = torch.einsum("pi,pih->ph", torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], down[e])
    y = (y if on_input else w * y) * valid[:, None]
    out = torch.zeros(T, x.shape[1], dtype=torch.float64).index_add(0, rows, y)
    return torch.autograd.grad(out, (x, gate_up, down, weights), grad_out)


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
    """Dense masked softmax attention in float64 (on the CPU); K/V repeated per query head;
    rows with no visible key are zero."""
    B, Hq, Sq, D = q.shape
    group = Hq // k.shape[1]
    q, k, v = (t.detach().double().cpu() for t in (q, k, v))
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = D ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
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
    return q.detach().double().cpu() * scale[:, :, None, None]


# ----------------------------------------------------------------------------------------------
# Quantized formats, restated from their layouts (kernels/dequant.py) without llama4_fast.quant:
# the weights are read from the packed bytes and scales a format object holds (Fp8Weight:
# qweight, scale, granularity, act_scale_ub; Int4Weight: packed, scale, zero, group_size).
# ----------------------------------------------------------------------------------------------

E4M3_MAX = 448.0
FP8_BLOCK = 128  # fp8 "block": 128x128 weight blocks, 1x128 activation groups
MIN_FP8_SCALE = 1.0 / (E4M3_MAX * 512.0)  # the kernels' floor of an activation scale (all-zero rows)


def round_e4m3_64(v):
    """float64 v (|v| <= 448) to the nearest float8_e4m3fn value, ties to even: 3 mantissa bits
    for |v| >= 2^-6, steps of 2^-9 below it (subnormals). NaN stays NaN."""
    _, exp = torch.frexp(v.abs().clamp_min(2.0 ** -6))  # |v| in [2^(exp-1), 2^exp)
    quantum = torch.pow(2.0, exp.double() - 4)  # 2^(exp-1) / 2^3
    return torch.round(v / quantum) * quantum  # torch.round rounds half to even


def quantize_fp8_act64(x, group=None, scale_ub=None):
    """Dynamic FP8 activation quantization as the kernels do it, in their fp32 arithmetic:
    per row (group None) or per 1x128 group, scale = max(min(amax, scale_ub) / 448, MIN),
    q = round_e4m3(clamp(x / scale, +-448)). -> (q [M, K] float64, scale [M, groups] float64)."""
    xf = x.detach().float().cpu()
    M, K = xf.shape
    width = K if group is None else group
    starts = range(0, max(K, 1), max(width, 1))
    q = torch.zeros(M, K, dtype=torch.float64)
    scale = torch.empty(M, len(starts), dtype=torch.float64)
    for j, k0 in enumerate(starts):
        part = xf[:, k0:k0 + width]
        amax = part.abs().amax(dim=1) if part.shape[1] else torch.zeros(M)
        if scale_ub is not None:
            amax = amax.clamp(max=scale_ub)
        s = (amax / E4M3_MAX).clamp(min=MIN_FP8_SCALE)  # fp32, as the kernel
        scale[:, j] = s.double()
        q[:, k0:k0 + width] = round_e4m3_64((part / s[:, None]).clamp(-E4M3_MAX, E4M3_MAX).double())
    return q, scale


def _is_int4(weight):
    return hasattr(weight, "packed")


def activations64(x, weight):
    """float64 [M, K]: the activations the format's GEMM multiplies. FP8: x quantized per token
    (per 1x128 group for block scales), amax bounded by act_scale_ub, times its scale; INT4:
    x as is."""
    if _is_int4(weight):
        return x.detach().double().cpu()
    group = FP8_BLOCK if weight.granularity == "block" else None
    q, scale = quantize_fp8_act64(x, group, weight.act_scale_ub)
    return q * scale.repeat_interleave(q.shape[1] if group is None else group, dim=1)[:, :q.shape[1]]


def dequantize64(weight):
    """float64 [*lead, K, N] that a format object stands for.
    INT4: byte [k // 2, n] holds row 2j in its low nibble and 2j + 1 in its high one; W = (u - z)
    * s with z = 8 (symmetric) or the zero point of the group. FP8: e4m3 values times the scale
    of the column (channel), of the whole tensor, or of the 128x128 block."""
    if _is_int4(weight):
        packed = weight.packed.cpu()
        *lead, half_k, N = packed.shape
        u = torch.empty(*lead, 2 * half_k, N, dtype=torch.float64)
        u[..., 0::2, :] = (packed & 0xF).double()
        u[..., 1::2, :] = (packed >> 4).double()
        g = weight.group_size
        s = weight.scale.cpu().double().repeat_interleave(g, dim=-2)
        z = 8.0 if weight.zero is None else weight.zero.cpu().double().repeat_interleave(g, dim=-2)
        return (u - z) * s
    w = weight.qweight.cpu().double()
    *lead, K, N = w.shape
    s = weight.scale.cpu().double()
    if weight.granularity == "channel":
        return w * s.unsqueeze(-2)
    if weight.granularity == "tensor":
        return w * s.reshape(*lead, 1, 1)
    blocks = s.repeat_interleave(FP8_BLOCK, dim=-2).repeat_interleave(FP8_BLOCK, dim=-1)
    return w * blocks[..., :K, :N]


def quant_matmul64(x, weight):
    """y [M, N] float64 = activations64(x) @ dequantize64(W)."""
    return activations64(x, weight) @ dequantize64(weight)


def quant_moe64(x, gate_up, down, weights, ids, on_input=True):
    """moe64 for quantized experts (format objects [E, K, N]): per (token, choice) pair,
    gu = act(x_t) @ W13 (times the router weight on input), h = silu(gate) * up rounded to x's
    dtype (the kernels store h there), y = act(h) @ W2 (times the weight otherwise)."""
    w13, w2 = dequantize64(gate_up), dequantize64(down)
    inter = w13.shape[-1] // 2
    weights, ids = weights.detach().double().cpu(), ids.cpu()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), weights[t, j]
            gu = activations64(x[t:t + 1], gate_up) @ w13[e]
            if on_input:
                gu = gu * w
            h = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)
            y = (activations64(h, down) @ w2[e])[0]
            out[t] += y if on_input else w * y
    return out


def glu64(gate, up, activation="silu", clamped_swiglu=None):
    """The experts' gate in float64: act(gate) * up, or gpt-oss's clamped SwiGLU (limit, alpha)."""
    F = torch.nn.functional
    if clamped_swiglu is not None:
        limit, alpha = clamped_swiglu
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1.0) * gate * torch.sigmoid(alpha * gate)
    acts = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}
    return acts[activation](gate) * up


def experts64(x, gate_up, down, weights, ids, *, on_input=True, gate_up_bias=None, down_bias=None,
              activation="silu", interleaved=False, clamped_swiglu=None, grad_out=None):
    """transformers' experts in float64, per (token, slot) pair: z = x_w @ gate_up[e] (+ bias),
    gate/up columns [:I] / [I:] (or even / odd when interleaved), y = glu64(gate, up) @ down[e]
    (+ bias), the router weight w on the input (x_w = x * w) or the output (w * y); ids outside
    [0, E) contribute nothing. Returns out [T, H]; with grad_out, the autograd gradients of
    sum(out * grad_out) instead: (dx, d_gate_up, d_down, d_weights, d_gate_up_bias,
    d_down_bias), None for an absent bias."""
    leaves = [None if t is None else t.detach().double().cpu().requires_grad_(grad_out is not None)
              for t in (x, gate_up, down, weights, gate_up_bias, down_bias)]
    x, gate_up, down, weights, b13, b2 = leaves
    ids = ids.cpu().long()
    T, k = ids.shape
    E, inter = gate_up.shape[0], down.shape[1]
    valid = ((ids >= 0) & (ids < E)).reshape(-1)
    e = ids.reshape(-1).clamp(0, E - 1)
    rows = torch.arange(T).repeat_interleave(k)
    w = weights.reshape(-1, 1)
    xi = x[rows] * w if on_input else x[rows]
    z = torch.einsum("ph,phn->pn", xi, gate_up[e])
    if b13 is not None:
        z = z + b13[e]
    gate, up = (z[:, 0::2], z[:, 1::2]) if interleaved else (z[:, :inter], z[:, inter:])
    y = torch.einsum("pi,pih->ph", glu64(gate, up, activation, clamped_swiglu), down[e])
    if b2 is not None:
        y = y + b2[e]
    y = (y if on_input else w * y) * valid[:, None]
    out = torch.zeros(T, x.shape[1], dtype=torch.float64).index_add(0, rows, y)
    if grad_out is None:
        return out.detach()
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, grad_out.detach().double().cpu()))
    return tuple(None if t is None else next(grads) for t in leaves)
