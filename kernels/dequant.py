"""Quantized weight tiles: load, dequantize and multiply, shared by every GEMM that reads them.

`quant_matmul.py` (dense linear layers) and `moe.py` (grouped expert GEMMs) call `dequant_dot`
once per K step and `rowwise_epilogue` once at the end, so the weight formats live in one place.
A weight is read as a logical [K, N] matrix (y = x @ W) through its strides, one expert's slice
in the grouped GEMM. The formats (WEIGHT_FORMAT, a constexpr; `FORMATS` maps names to codes):

FP8_ROWWISE  W = Wq * s[n]: Wq float8_e4m3fn [K, N]; s float32 [N] (per output channel) or one
             value read with stride 0 (per tensor). Activations arrive quantized per token,
             x = xq * a[m], so y = (xq @ Wq) * a[m] * s[n]: both scales in the epilogue.
FP8_BLOCK    W = Wq * s[k // 128, n // 128] (128x128 blocks; K and N need not be multiples of
             128) with activations in 1x128 groups, x = xq * a[m, k // 128]. Each K step lies
             inside one 128-block, so it adds dot(xq, Wq) * a * s to the fp32 accumulator.
INT4_SYM     W = (u - 8) * s[k // G, n]: u the unsigned nibble 0..15 (value -8..7 stored with
             an offset of 8), packed two per byte along K: byte [k // 2, n] holds row k = 2j in
             its low nibble and k = 2j + 1 in its high nibble. s [K / G, N] any float dtype.
INT4_ASYM    W = (u - z[k // G, n]) * s[k // G, n] with integer zero points z uint8 0..15
             (GPTQ-style, unpacked: one byte per group and column).

INT4 K steps stay inside one group (BLOCK_K divides G), so the nibbles become exact small
integers in the activation dtype and the group scale multiplies the step's fp32 product: one
multiply per output element per step instead of one per weight. A step reads its packed bytes
once and takes the low and high nibble planes against the even and odd activation columns (two
dots of depth BLOCK_K / 2 >= 16, hence G >= 32). Nibble -> float uses the
exponent trick: OR-ing u into the mantissa of 1024.0 (fp16), 128.0 (bf16) or 2^23 (fp32) gives
MAGIC + u exactly, and one subtraction of MAGIC + zero finishes it, no integer->float convert.

FP8 dots promote their fast Hopper accumulation into fp32 after each K step
(max_num_imprecise_acc=BLOCK_K, at most 128 products), as DeepGEMM promotes every 128.
"""

from __future__ import annotations

import triton
import triton.language as tl

DENSE = tl.constexpr(0)
FP8_ROWWISE = tl.constexpr(1)
FP8_BLOCK = tl.constexpr(2)
INT4_SYM = tl.constexpr(3)
INT4_ASYM = tl.constexpr(4)
FORMATS = {"fp8_rowwise": 1, "fp8_block": 2, "int4_sym": 3, "int4_asym": 4}
FP8_BLOCK_SIZE = tl.constexpr(128)  # FP8_BLOCK weight blocks are 128x128, activation groups 1x128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@triton.jit
def _nibble_values(u, zero, DTYPE: tl.constexpr):
    """u - zero in DTYPE, exactly, for nibbles u (any integer tile, 0..15) and integer zero
    points (broadcastable): MAGIC + u by bit pattern, minus MAGIC + zero."""
    if DTYPE == tl.float16:
        magic_plus_u = (u.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)  # 1024 + u
        return magic_plus_u - (zero + 1024).to(tl.float16)
    elif DTYPE == tl.bfloat16:
        magic_plus_u = (u.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)  # 128 + u
        return magic_plus_u - (zero + 128).to(tl.bfloat16)
    else:
        magic_plus_u = (u.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + u
        return magic_plus_u - (zero + 8388608).to(tl.float32)


@triton.jit
def dequant_dot(acc, a, a_group_scale,
                w_ptr, stride_wk, stride_wn, s_ptr, stride_sk, stride_sn, z_ptr, stride_zk, stride_zn,
                k0, cols, col_mask, K,
                WEIGHT_FORMAT: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr, w_tile=None):
    """acc [BLOCK_M, BLOCK_N] fp32 += a [BLOCK_M, BLOCK_K] @ W[k0:k0 + BLOCK_K, cols], scaled
    as the format says (FP8_ROWWISE leaves its scales to `rowwise_epilogue`).

    a: the activation tile (float8_e4m3fn for the FP8 formats, else the model dtype, zeros
    where masked); a_group_scale [BLOCK_M] fp32: FP8_BLOCK's activation scale of this K group
    (ignored by the other formats). w_ptr/s_ptr/z_ptr and strides: the quantized weight, its
    scales and zero points (z only for INT4_ASYM) as laid out in the module docstring; cols
    [BLOCK_N] global column indices (the up half of gate_up passes n + I), col_mask their mask.
    w_tile: the step's weight tile already loaded (through a TMA descriptor, zeros past K and
    N): [BLOCK_K, BLOCK_N] e4m3, or the INT4 formats' packed [BLOCK_K / 2, BLOCK_N] bytes; None
    loads it from w_ptr.
    """
    kk = k0 + tl.arange(0, BLOCK_K)
    mask = (kk < K)[:, None] & col_mask[None, :]
    if WEIGHT_FORMAT == FP8_ROWWISE:
        if w_tile is None:
            w = tl.load(w_ptr + kk[:, None] * stride_wk + cols[None, :] * stride_wn, mask=mask, other=0.0)
        else:
            w = w_tile
        acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)
    elif WEIGHT_FORMAT == FP8_BLOCK:
        if w_tile is None:
            w = tl.load(w_ptr + kk[:, None] * stride_wk + cols[None, :] * stride_wn, mask=mask, other=0.0)
        else:
            w = w_tile
        s = tl.load(s_ptr + (k0 // FP8_BLOCK_SIZE) * stride_sk + (cols // FP8_BLOCK_SIZE) * stride_sn,
                    mask=col_mask, other=0.0)
        part = tl.dot(a, w, max_num_imprecise_acc=BLOCK_K)
        acc += part * a_group_scale[:, None] * s[None, :]
    else:
        # Each packed byte is loaded once: [BLOCK_K / 2, BLOCK_N] bytes whose low nibbles are
        # the even rows k of the step and high nibbles the odd ones. The two nibble planes
        # multiply the even and the odd columns of the activation tile: two dots of half the
        # depth, the same work as one, without moving any weight between rows.
        if w_tile is None:
            jj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + jj[:, None] * stride_wk + cols[None, :] * stride_wn,
                             mask=(jj < K // 2)[:, None] & col_mask[None, :], other=0)
        else:
            packed = w_tile
        a_even, a_odd = tl.split(tl.reshape(a, (a.shape[0], BLOCK_K // 2, 2)))
        group = k0 // GROUP_K  # BLOCK_K divides GROUP_K: the whole step is one group
        if WEIGHT_FORMAT == INT4_ASYM:
            zero = tl.load(z_ptr + group * stride_zk + cols * stride_zn, mask=col_mask, other=0).to(tl.int32)
        else:
            zero = tl.full(cols.shape, 8, tl.int32)
        part = tl.dot(a_even, _nibble_values(packed & 0xF, zero[None, :], a.dtype), input_precision=DOT_PRECISION)
        part = tl.dot(a_odd, _nibble_values(packed >> 4, zero[None, :], a.dtype), part,
                      input_precision=DOT_PRECISION)
        s = tl.load(s_ptr + group * stride_sk + cols * stride_sn, mask=col_mask, other=0.0).to(tl.float32)
        acc += part * s[None, :]
    return acc


@triton.jit
def rowwise_epilogue(acc, a_scale, s_ptr, stride_sn, cols, col_mask, WEIGHT_FORMAT: tl.constexpr):
    """FP8_ROWWISE: acc * a_scale[m] (per-token activation scale, [BLOCK_M] fp32) * s[n];
    other formats: acc unchanged."""
    if WEIGHT_FORMAT == FP8_ROWWISE:
        s = tl.load(s_ptr + cols * stride_sn, mask=col_mask, other=0.0)
        acc = acc * a_scale[:, None] * s[None, :]
    return acc


@triton.jit
def _round_to_e4m3(v):
    """v (fp32, |v| <= 448, or NaN) rounded to the nearest e4m3 value (ties to even), still in
    fp32, so the cast to float8_e4m3fn that follows is exact; NaN stays NaN. Done by hand because
    Triton's interpreter drops the carry when rounding crosses a power of two (127.9 -> 64); on
    the GPU the cast alone would round the same way. Normal range (|v| >= 2^-6): keep 3 mantissa
    bits by adding half an ulp (plus the kept lowest bit, for ties to even) and truncating;
    subnormals: steps of 2^-9, rounded with the 1.5 * 2^23 add-subtract trick."""
    bits = v.to(tl.uint32, bitcast=True)
    lowest_kept = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lowest_kept) & 0xFFF00000).to(tl.float32, bitcast=True)
    sub = ((v * 512.0 + 12582912.0) - 12582912.0) / 512.0
    rounded = tl.where(tl.abs(v) >= 0.015625, normal, sub)
    # NaN stays NaN, with its three top mantissa bits set: e4m3's only NaN is S.1111.111, and the
    # interpreter's cast keeps the top mantissa bits (the usual quiet NaN 0x7FC00000 would turn
    # into 384); the GPU's cast keeps any NaN.
    return tl.where(v != v, (bits | 0x7FF00000).to(tl.float32, bitcast=True), rounded)


@triton.jit
def fp8_quantize_rows_kernel(x_ptr, stride_xm, stride_xk, q_ptr, stride_qm, stride_qk, s_ptr, stride_sm,
                             stride_sg, K, group_k, scale_ub,
                             HAS_UB: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """Program (m, g) quantizes x[m, g * group_k : (g + 1) * group_k] to float8_e4m3fn with one
    scale: amax (clamped to scale_ub when HAS_UB) / 448, at least MIN_SCALE; q = x / scale
    saturated to +-448. Per token: group_k = K and one group.

    NaN and inf follow that float math, as the torch twin (quant.quantize_fp8_activations_ref)
    does: a NaN in the group makes its scale NaN and every q NaN; an inf (without HAS_UB) makes
    the scale inf, q NaN where x is infinite and 0 elsewhere; so either dequantizes to NaN and
    a GEMM row that reads the group is NaN. With HAS_UB an inf is an outlier like any other:
    the scale stays scale_ub / 448 and q saturates to +-448 (finite), as the bound intends.
    Every max/min/clamp below propagates NaN: Triton's default (like the GPU's max.f32) drops it."""
    m = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    k_lo = g * group_k
    k_hi = tl.minimum(K, k_lo + group_k)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK):
        kk = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + m * stride_xm + kk * stride_xk, mask=kk < k_hi, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    # tl.max has no NaN-propagating mode: a NaN lane is looked for separately.
    row_max = tl.where(tl.max((amax != amax).to(tl.int32), axis=0) > 0, float("nan"), tl.max(amax, axis=0))
    if HAS_UB:
        row_max = tl.minimum(row_max, scale_ub, propagate_nan=tl.PropagateNan.ALL)
    scale = tl.maximum(row_max / 448.0, MIN_SCALE, propagate_nan=tl.PropagateNan.ALL)
    for k0 in range(k_lo, k_hi, BLOCK):
        kk = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + m * stride_xm + kk * stride_xk, mask=kk < k_hi, other=0.0).to(tl.float32)
        q = _round_to_e4m3(tl.clamp(x / scale, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL))
        tl.store(q_ptr + m * stride_qm + kk * stride_qk, q.to(q_ptr.dtype.element_ty), mask=kk < k_hi)
    tl.store(s_ptr + m * stride_sm + g * stride_sg, scale)
