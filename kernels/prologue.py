"""Llama 4's query/key prologue in one Triton launch: RoPE, L2 qk-norm, NoPE temperature.

Public entry points
-------------------
``qk_prologue(q, k, *, cos=None, sin=None, qk_norm_eps=None, positions=None, temperature=None,
q_out=None, k_out=None) -> (q', k')``
    q [B, S, Hq, D], k [B, S, Hkv, D]: float16 / bfloat16 / float32, one dtype, any strides
    (views of the projection outputs). Semantics are those of ``llama4_fast.ops.qk_prologue``,
    applied in this order, all in fp32 and cast back once:

    1. RoPE (cos, sin [B or 1, S, D/2] float32 given): interleaved pairs
       ``(x[2i], x[2i+1]) -> (x[2i] c - x[2i+1] s, x[2i] s + x[2i+1] c)`` of q and k;
    2. qk-norm (qk_norm_eps given): ``x * rsqrt(mean(x^2) + eps)`` over D, of q and k;
    3. temperature ((floor_scale, attn_scale) given, with positions [S] or [B, S] int32/int64):
       q times ``log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1``; k untouched.

    q' is written whenever any step is set or q_out is given; k' whenever RoPE or qk-norm is
    set or k_out is given. A written result goes to q_out / k_out (any strides, e.g. a view
    of the KV cache) or to a new contiguous [B, S, H, D] tensor; a tensor that is not written
    is returned as it came. In place is allowed (q_out=q, k_out=k: each program reads its tile
    before it writes the same elements, and no other program touches them); any other overlap
    of an output with an input or with the other output is refused (ValueError).
    NaN / inf follow the fp32 math of the steps (no max/min/clamp anywhere): RoPE spreads a
    non-finite value to its pair; qk-norm makes a head row holding a NaN all NaN, and one
    holding an inf NaN there and 0 elsewhere (x * rsqrt(inf)), as ``ops.rms_norm``.
``plan_outputs(q, k, q_out, k_out, *, rope, qk_norm, temperature) -> (q_out, k_out)``
    That rule alone: the buffers a launch writes (allocated when not given), None for a
    tensor passed through. The triton backend allocates with it outside its custom op.

Design
------
One kernel, ``_qk_prologue``, with constexpr switches ROPE / QK_NORM / TEMPERATURE. Grid
``(B * S, q_blocks + k_blocks)``: a program owns one token and a block of BLOCK_H heads of
either q (the first q_blocks programs of axis 1) or k, as a [BLOCK_H, BLOCK_D] tile. Per
token it loads the D/2 angles (or the position) once and reuses them across its heads.

* The whole chain is one read and one write of q and k; the torch chain (rope then rms_norm
  of each) reads and writes each twice in its dtype, with about 30 elementwise kernels and
  their fp32 temporaries in between.
* RoPE angles come from the caller's precomputed cos/sin tables rather than from positions
  and inv_freq in-kernel. Bytes: the tables add 4 * D bytes per token (512 at D=128) against
  2 * (Hq + Hkv) * D * 2 = 24.6 KB of q/k traffic per token for Llama 4 in bf16 (2%, and
  shared by every head). Accuracy: the tables are exactly what the reference rotates by, while
  fp32 sin/cos in the kernel would differ from torch's wherever the GPU's approximate
  transcendental or argument reduction differs (angles reach 1e6 rad at 1M tokens).
  Work: the model and transformers already build the tables once per forward for all layers.
  Positions are then needed only for the temperature (one scalar a token).
* Interleaved pairs: the tile is loaded as whole rows (coalesced, vectorised) and split into
  (even, odd) halves in registers with reshape + split, then re-joined for the store.
* The temperature quotient uses IEEE division (``div_rn``): Triton's ``/`` on fp32 lowers to
  the approximate ``div.full.f32`` (triton 3.9, sm_90), and the floor of an exact multiple
  (pos + 1 = m * floor_scale) must not fall to the integer below.
* Addressing: token and head offsets are int64 (1M tokens x 40 heads x 128 overflows int32).
* Compiled ahead of time for sm_90a with triton 3.6 and 3.9 (no GPU at hand; unit strides
  and 16-divisible pointers as the launcher specialises them), every switch combination in
  fp16/bf16/fp32 at D = 64, 80, 128: at most 32 registers, no spills, no shared memory (the
  pair split stays in registers), 128-bit global loads, ``div.rn`` in the temperature path.
  Not yet timed on a GPU; the tile (~1024 elements, 4 warps) is a first guess.
* Not fused into attention: K must be written roped into the KV cache anyway, so only the Q
  side could move into the attention prologue; benchmarks/qk_prologue.py measures the whole
  prologue, and the Q side alone, against the attention call it precedes: the Q side's time is
  the most that fusion could save. Until it runs on an H100, the separate kernel stands.

Under the Triton interpreter (CPU tensors with TRITON_INTERPRET=1) fp16/fp32 run; bf16 is
refused there because the interpreter truncates fp32 -> bf16 casts instead of rounding to
nearest (checked with triton 3.9), so it would disagree with the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import checks

# Tile of one program: BLOCK_H heads x BLOCK_D columns, about this many elements (8 heads at
# D = 128: Llama 4's 40 query heads are 5 blocks and its 8 KV heads one, no idle rows).
_TILE_ELEMENTS = 1024
MAX_HEAD_DIM = 4096  # one program holds whole head rows; larger heads are untested
_MAX_GRID_Y = 65535


@triton.jit
def _transform_heads(X, Out, b, s, h0, n_heads,
                     stride_xb, stride_xs, stride_xh, stride_xd,
                     stride_ob, stride_os, stride_oh, stride_od,
                     cos, sin, eps, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     ROPE: tl.constexpr, QK_NORM: tl.constexpr, TEMPERATURE: tl.constexpr):
    """Load heads [h0, h0 + BLOCK_H) of token (b, s), transform them in fp32, store them."""
    offs_h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (offs_h < n_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x_ptrs = (X + b * stride_xb + s * stride_xs
              + offs_h[:, None] * stride_xh + offs_d[None, :] * stride_xd)
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        # Columns (2i, 2i+1) are a pair: view the row as [D/2, 2] and split the last axis.
        even, odd = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_D // 2, 2)))
        c = cos[None, :]
        sn = sin[None, :]
        x = tl.reshape(tl.join(even * c - odd * sn, even * sn + odd * c), (BLOCK_H, BLOCK_D))
    if QK_NORM:
        # Masked columns are 0 (RoPE of zeros is zero too), so the sum covers the real D only.
        mean_sq = tl.sum(x * x, axis=1) / HEAD_DIM
        x = x * tl.rsqrt(mean_sq + eps)[:, None]
    if TEMPERATURE:
        x = x * scale
    out_ptrs = (Out + b * stride_ob + s * stride_os
                + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od)
    tl.store(out_ptrs, x.to(Out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seq_len"])  # decode (S = 1) and prefill share one compile
def _qk_prologue(
    Q, K, QOut, KOut, Cos, Sin, Pos,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_qob, stride_qos, stride_qoh, stride_qod,
    stride_kob, stride_kos, stride_koh, stride_kod,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    stride_pb, stride_ps,
    seq_len, heads_q, heads_k, q_blocks, eps, floor_scale, attn_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr,         # rotate q and k by cos/sin
    QK_NORM: tl.constexpr,      # weight-free RMS (L2) norm of q and k after RoPE
    TEMPERATURE: tl.constexpr,  # scale q by its position's temperature (NoPE layers)
):
    """Grid: (B * S tokens, q_blocks + k_blocks head blocks). Stride-0 batch strides broadcast
    a [1, S, ...] table or an [S] positions vector over the batch."""
    token = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = token // seq_len
    s = token % seq_len

    if ROPE:
        offs_p = tl.arange(0, BLOCK_D // 2).to(tl.int64)
        p_ok = offs_p < HEAD_DIM // 2
        cos = tl.load(Cos + b * stride_cb + s * stride_cs + offs_p * stride_cd, mask=p_ok, other=0.0)
        sin = tl.load(Sin + b * stride_sb + s * stride_ss + offs_p * stride_sd, mask=p_ok, other=0.0)
    else:
        cos = 0.0
        sin = 0.0

    if blk < q_blocks:
        if TEMPERATURE:
            # The reference's fp32 formula step by step: float(pos) + 1, IEEE divide, floor;
            # then log1p(n) as log(1 + n): n is an integer, so 1 + n is exact below 2**24.
            pos = tl.load(Pos + b * stride_pb + s * stride_ps).to(tl.float32)
            steps = tl.floor(tl.math.div_rn(pos + 1.0, floor_scale))
            scale = tl.log(1.0 + steps) * attn_scale + 1.0
        else:
            scale = 1.0
        _transform_heads(Q, QOut, b, s, blk * BLOCK_H, heads_q,
                         stride_qb, stride_qs, stride_qh, stride_qd,
                         stride_qob, stride_qos, stride_qoh, stride_qod,
                         cos, sin, eps, scale, HEAD_DIM, BLOCK_H, BLOCK_D, ROPE, QK_NORM, TEMPERATURE)
    else:
        _transform_heads(K, KOut, b, s, (blk - q_blocks) * BLOCK_H, heads_k,
                         stride_kb, stride_ks, stride_kh, stride_kd,
                         stride_kob, stride_kos, stride_koh, stride_kod,
                         cos, sin, eps, 1.0, HEAD_DIM, BLOCK_H, BLOCK_D, ROPE, QK_NORM, False)


def plan_outputs(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor | None, k_out: torch.Tensor | None, *,
                 rope: bool, qk_norm: bool, temperature: bool):
    """-> (q buffer, k buffer) a launch writes: the given out, else a new contiguous tensor
    when the tensor is transformed, else None (passed through unchanged). Temperature scales
    only q."""
    if q_out is None and (rope or qk_norm or temperature):
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k_out is None and (rope or qk_norm):
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    return q_out, k_out


def _batch_stride(t: torch.Tensor | None, dims: int) -> tuple:
    """Strides of a [B or 1, ...] table (or an [S] vector when dims says it is 1-D), with the
    batch stride 0 where the batch is broadcast."""
    if t is None:
        return (0,) * dims
    if t.dim() == dims - 1:  # positions [S]
        return (0, *t.stride())
    return (0 if t.shape[0] == 1 else t.stride(0), *t.stride()[1:])


def qk_prologue(q: torch.Tensor, k: torch.Tensor, *, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None, qk_norm_eps: float | None = None,
                positions: torch.Tensor | None = None, temperature: tuple[float, float] | None = None,
                q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None):
    """RoPE, qk-norm and the NoPE temperature of q and k in one launch (see the module doc).

    Args:
        q: [B, S, Hq, D], k: [B, S, Hkv, D]; float16/bfloat16/float32, same dtype and device,
            any strides.
        cos, sin: [B or 1, S, D/2] float32, any strides (e.g. the real / imaginary views of a
            complex freqs_cis), or both None (no RoPE). D must be even with RoPE.
        qk_norm_eps: eps of the weight-free L2 norm, or None (no norm).
        positions: [S] or [B, S] int32/int64 absolute positions; only with temperature.
        temperature: (floor_scale, attn_scale) of the NoPE layers, or None.
        q_out, k_out: optional outputs like q / k, any strides; q itself / k itself (in place)
            or memory no input and not the other output uses.

    Returns:
        (q', k') as described in the module doc. No host sync: everything stays on the
        device, so the call can be captured in a CUDA graph.
    """
    checks.qk_prologue_args(q, k, cos, sin, qk_norm_eps, positions, temperature, q_out, k_out)
    checks.kernel_device("q", q, "qk_prologue", "it truncates fp32 -> bf16 casts instead of rounding to nearest")
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is not supported (at most {MAX_HEAD_DIM})")
    rope, qk_norm, temp = cos is not None, qk_norm_eps is not None, temperature is not None
    q_buf, k_buf = plan_outputs(q, k, q_out, k_out, rope=rope, qk_norm=qk_norm, temperature=temp)

    block_d = max(2, triton.next_power_of_2(D))
    block_h = max(1, min(triton.next_power_of_2(max(Hq, Hkv, 1)), _TILE_ELEMENTS // block_d))
    q_blocks = triton.cdiv(Hq, block_h) if q_buf is not None else 0
    k_blocks = triton.cdiv(Hkv, block_h) if k_buf is not None else 0
    if q_blocks + k_blocks > _MAX_GRID_Y:
        raise ValueError(f"{Hq} query + {Hkv} key heads need {q_blocks + k_blocks} head blocks, "
                         f"over the grid limit {_MAX_GRID_Y}")
    if B * S and q_blocks + k_blocks:
        # Unused pointers (a tensor not written, a step switched off) point at q: never read.
        floor_scale, attn_scale = temperature if temp else (1.0, 0.0)
        _qk_prologue[(B * S, q_blocks + k_blocks)](
            q, k, q if q_buf is None else q_buf, q if k_buf is None else k_buf,
            cos if rope else q, sin if rope else q, positions if temp else q,
            *q.stride(), *k.stride(),
            *(q.stride() if q_buf is None else q_buf.stride()),
            *(k.stride() if k_buf is None else k_buf.stride()),
            *_batch_stride(cos, 3), *_batch_stride(sin, 3), *_batch_stride(positions, 2),
            S, Hq, Hkv, q_blocks, float(qk_norm_eps or 0.0), float(floor_scale), float(attn_scale),
            HEAD_DIM=D, BLOCK_H=block_h, BLOCK_D=block_d, ROPE=rope, QK_NORM=qk_norm, TEMPERATURE=temp,
            num_warps=max(1, min(8, block_h * block_d // 256)),
        )
    return (q if q_buf is None else q_buf), (k if k_buf is None else k_buf)
