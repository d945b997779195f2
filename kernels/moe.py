"""Fused mixture-of-experts: the routed SwiGLU experts as two grouped GEMMs in Triton.

For hidden_states x [T, H], experts gate_up_proj [E, H, 2I] / down_proj [E, I, H]
(transformers' layout, read as-is) and top_k choices per token, call the P = T * top_k
(token, slot) pairs "pairs"; pair p = t * top_k + j. The work is:

1. Grouping. When every pair fits one row block (P <= BLOCK_M, with BLOCK_M raised to as many
   as DIRECT_MAX_PAIRS rows for it: decode), nothing is built:
   GEMM program m takes pair m's expert and serves every pair that chose it (programs whose
   expert an earlier pair already chose exit at once), so no expert is read twice and a
   top-1 decode step is the two GEMM launches (plus a combine where K is split, see 4).
   Otherwise `routing.dispatch_metadata` groups the pairs by expert on the device (see its
   docstring).
2. gate_up GEMM (GATED): one program owns (expert, row block, BLOCK_N columns). It gathers the
   x rows of its pairs straight from x (no permuted copy) and keeps two accumulators, gate
   columns [n, n + BLOCK_N) and up columns I + [n, n + BLOCK_N). The epilogue scales both by
   the router weight (w * (x @ B) is (x * w) @ B; scaling the A tile on load instead sends it
   through registers: 4.55 vs 3.67 ms with the 128-wide prefill tile at Scout T=8192 on an
   H100, benchmarks/results/tune_moe-*)
   and writes silu(gate) * up: h [P, I] in x's dtype.
3. down GEMM: h rows of the block's pairs @ down_proj[e]. With top_k == 1 it writes
   out[token] directly (no atomics); with top_k > 1 it writes fp32 partial rows [P, H] and a
   small combine kernel sums each token's k rows in a fixed order (deterministic).
4. Decode shapes have too few (expert, column block) tiles to keep every SM streaming
   weights (TP8's gate_up has 1024 columns: 16 tiles of 64), so either GEMM may split K
   across programs. A split GEMM stores fp32 partials and the combine kernel finishes it:
   sum of the splits, then SwiGLU (gate_up) or the sum over the k slots (down). Splitting is
   decided per call from the tile count and the SM count (gemm.split_k), never at prefill.

The experts of other transformers models (ExpertVariant, fused_moe's keyword options) are
constexpr switches of the same two GEMMs, off for Llama 4 (whose compiled kernels they leave as
they were): biases added to the fp32 accumulators in split 0 (gate_up's after the router weight
on the input, down's before the one on the output); the gate's activation (ACTIVATION: silu,
gelu, tanh GELU, or gpt-oss's clamped SwiGLU with runtime limit and alpha); interleaved gate/up
columns as a (column, up offset) pair: gate n and up N + n, or 2n and 2n + 1. A gate other than
SwiGLU takes no split K on gate_up (the combine kernel knows SwiGLU only). The backward follows
every switch: dA in gate_up_proj's column order, the bias gradients summed by the weight-gradient
kernel, and with a down bias dOut . b2 added to the router weight's gradient in the K loop.

Quantized experts (FP8 per-channel / per-tensor / 128x128 blocks, INT4 group-wise; layouts in
dequant.py) take the same two GEMMs with a constexpr WEIGHT_FORMAT: each K step calls
dequant.dequant_dot (FP8 rowwise scales in the epilogue), FP8 activations (x, then h) are
quantized per token on the device first, and the router weight still scales the fp32 result.
WEIGHT_FORMAT=DENSE keeps the 16-bit path's K loop and epilogue as they were (same PTX for
sm90, checked by compiling both versions).

Three Hopper options of the same kernels (MoeConfig.tma, .epilogue_block_n, .pdl; off unless a
config sets them, as no GPU has measured them yet): the weights (any format, as stored or
nn.Linear-style), and the down GEMM's A, read through tensor descriptors (TMA: no per-element
addresses in registers, deeper pipelines), with gate_up writing h in expert order (dispatch
slots) so that a row block's rows are consecutive; the epilogue stored in column pieces; and
programmatic dependent launches. TMA and the pieces together leave the table's 128 x 256 down
tile without the register spills it has otherwise (tests/test_sm90_compile.py).

Launch configs come from a per-shape H100 table (configs/moe_h100.json) keyed by tokens per
expert, else from a heuristic; each (bucket, dtype, flags) is one compiled variant, never an
autotune sweep (split counts are runtime arguments, not compile-time constants). Row offsets
into x, h, out and the partials, and each expert's base offset, are int64 (a 1M-token prefill
x 5120 overflows int32).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import checks
from .dequant import DENSE, FP8_BLOCK, FP8_BLOCK_SIZE, FP8_ROWWISE, INT4_ASYM, INT4_SYM, dequant_dot, rowwise_epilogue
from .device import supports_pdl, tensor_descriptor, weight_descriptor
from .gemm import COMBINE_BLOCK_N, GemmConfig, combine_splits_kernel, grouped_tile, num_sms, split_k, weight_tile
from .quant_matmul import block_k_args, format_code, quant_weight_args, quantize_fp8_activations
from .routing import dispatch_metadata

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "moe_h100.json"
# Up to this many (token, slot) pairs, fused_moe skips the dispatch metadata: one row block of
# up to 64 rows holds every pair, and each GEMM program indexes its expert directly.
DIRECT_MAX_PAIRS = 64


# Gate activations of the gate_up epilogue (constexpr ACTIVATION): h = act(gate) * up for the
# first three; CLAMPED_SWIGLU is gpt-oss's gate with runtime (limit, alpha):
# h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
SILU = tl.constexpr(0)
GELU = tl.constexpr(1)
GELU_TANH = tl.constexpr(2)
CLAMPED_SWIGLU = tl.constexpr(3)
ACTIVATIONS = {"silu": SILU.value, "gelu": GELU.value, "gelu_tanh": GELU_TANH.value}


@triton.jit
def _clamp_glu_inputs(g, u, limit):
    """gpt-oss's clamps, NaN kept (a NaN compares false, as torch.clamp propagates it)."""
    g = tl.where(g > limit, limit, g)
    u = tl.where(u > limit, limit, tl.where(u < -limit, -limit, u))
    return g, u


@triton.jit
def _glu(g, u, limit, alpha, ACTIVATION: tl.constexpr):
    """h = act(g) * u (fp32), or gpt-oss's clamped SwiGLU (see ACTIVATIONS above)."""
    if ACTIVATION == SILU:
        h = g * tl.sigmoid(g) * u
    elif ACTIVATION == GELU:
        h = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)) * u
    elif ACTIVATION == GELU_TANH:  # tanh(z) = 2 sigmoid(2z) - 1
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g)) - 1.0
        h = 0.5 * g * (1.0 + t) * u
    else:
        g, u = _clamp_glu_inputs(g, u, limit)
        h = (u + 1.0) * (g * tl.sigmoid(alpha * g))
    return h


@triton.jit
def _glu_backward(g, u, d_out_h, limit, alpha, ACTIVATION: tl.constexpr):
    """(h, dL/dg, dL/du) of h = _glu(g, u) for dL/dh = d_out_h, elementwise in fp32."""
    if ACTIVATION == SILU:
        sig = tl.sigmoid(g)
        silu = g * sig
        h = silu * u
        d_g = d_out_h * u * sig * (1.0 + g * (1.0 - sig))  # silu'(g) = sig (1 + g (1 - sig))
        d_u = d_out_h * silu
    elif ACTIVATION == GELU:  # gelu'(g) = Phi(g) + g phi(g)
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        h = act * u
        d_g = d_out_h * u * (cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g))
        d_u = d_out_h * act
    elif ACTIVATION == GELU_TANH:  # d/dg 0.5 g (1 + t(z)) = 0.5 (1 + t) + 0.5 g (1 - t^2) z'
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g)) - 1.0
        act = 0.5 * g * (1.0 + t)
        h = act * u
        d_act = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        d_g = d_out_h * u * d_act
        d_u = d_out_h * act
    else:  # clamps pass the gradient where min <= x <= max (torch.clamp's rule), none for NaN
        gc, uc = _clamp_glu_inputs(g, u, limit)
        sig = tl.sigmoid(alpha * gc)
        glu = gc * sig
        h = (uc + 1.0) * glu
        d_g = tl.where(g <= limit, d_out_h * (uc + 1.0) * sig * (1.0 + alpha * gc * (1.0 - sig)), 0.0)
        d_u = tl.where((u >= -limit) & (u <= limit), d_out_h * glu, 0.0)
    return h, d_g, d_u


@triton.jit
def _swiglu_backward(d_h, router_w, pairs, offs_n, mask, N, da_ptrs, stride_dan,
                     preact_ptr, stride_pm, stride_pn, h_ptr, stride_hm, stride_hn, dw_ptrs, row_mask,
                     ON_INPUT: tl.constexpr, up_shift, bias_g, bias_u, d_w_bias, glu_limit, glu_alpha,
                     ACTIVATION: tl.constexpr):
    """Epilogue of the backward's first GEMM, d_h = dOut[token] @ down_proj[e]^T ([BLOCK_M,
    BLOCK_N] fp32, columns offs_n of I = N), for rows `pairs` with router weights router_w.

    With a_g, a_u the saved pre-activations (x @ gate, x @ up) and w the router weight, the
    forward computed g = w a_g, u = w a_u (on input; else g = a_g + b_g, u = a_u + b_u with the
    gate_up bias when there is one, and the output row was scaled by w), h = glu(g, u) (_glu).
    It writes, in one pass over the tile:
      dA = [dL/da_g | dL/da_u] into da's gate and up columns (da_ptrs, da_ptrs + up_shift
      columns: n and N + n, or 2n and 2n + 1 for interleaved weights), what dX and dgate_up
      multiply,
      h (times w when the weight was on the output) for the down weight's gradient,
      this column block's share of dL/dw (summed over blocks by the caller: no atomics); with a
      down bias b2 the output was w (h @ down + b2), and d_w_bias holds dOut . b2 (block 0 only).
    """
    p_ptrs = preact_ptr + pairs[:, None] * stride_pm + offs_n[None, :] * stride_pn
    a_g = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    a_u = tl.load(p_ptrs + N * stride_pn, mask=mask, other=0.0).to(tl.float32)
    w = router_w[:, None]
    if ON_INPUT:
        g = a_g * w
        u = a_u * w
        d_out_h = d_h
    else:
        g = a_g
        u = a_u
        if bias_g is not None:
            g = g + bias_g[None, :]
            u = u + bias_u[None, :]
        d_out_h = d_h * w
    h, d_g, d_u = _glu_backward(g, u, d_out_h, glu_limit, glu_alpha, ACTIVATION)
    if ON_INPUT:  # g = w a_g: dL/dw collects a_g dL/dg, and dL/da_g = w dL/dg
        d_w = tl.sum(d_g * a_g + d_u * a_u, axis=1)
        d_g = d_g * w
        d_u = d_u * w
    else:  # out = w (h @ down): dL/dw = dOut . (h @ down) = (dOut @ down^T) . h
        d_w = tl.sum(d_h * h, axis=1)
        if d_w_bias is not None:
            d_w += d_w_bias
        h = h * w
    tl.store(da_ptrs, d_g.to(da_ptrs.dtype.element_ty), mask=mask)
    tl.store(da_ptrs + up_shift * stride_dan, d_u.to(da_ptrs.dtype.element_ty), mask=mask)
    tl.store(h_ptr + pairs[:, None] * stride_hm + offs_n[None, :] * stride_hn,
             h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptrs, d_w, mask=row_mask)


# Arguments that change with the batch are not specialized (on ==1 or %16), so a new batch size
# does not compile a new variant.
@triton.jit(do_not_specialize=["num_pairs", "num_pid_m", "num_splits"])
def _moe_gemm_kernel(
    # A [rows, K]: x (gate_up) or h (down)
    a_ptr, stride_am, stride_ak,
    # B: expert weights [E, K, N_total] (gate_up_proj: N_total = 2N; down_proj: N_total = N)
    b_ptr, stride_be, stride_bk, stride_bn,
    # quantized B only (WEIGHT_FORMAT != DENSE): scales [E, K groups, N_total groups], INT4 zero
    # points [E, K groups, N_total], FP8 activation scales of A's rows [rows, K groups] (dequant.py)
    bs_ptr, stride_bse, stride_bsk, stride_bsn, bz_ptr, stride_bze, stride_bzk, stride_bzn,
    as_ptr, stride_asm, stride_ask,
    # C rows are pair indices: h [P, N], fp32 partials [splits, P, N or 2N], or out [T, N] (top-1);
    # SWIGLU_BWD: dA [P, 2N], the gradient of the gate/up pre-activations, in gate_up_proj's
    # column order (GATE_UP_INTERLEAVED)
    c_ptr, stride_cm, stride_cn, c_split_stride,
    # routing: flat topk_ids / topk_weights [P], and the dispatch metadata (unused when DIRECT)
    topk_ids_ptr, topk_weights_ptr, sorted_pairs_ptr, expert_offsets_ptr, block_offsets_ptr,
    num_pairs, num_experts, num_pid_m, N, K, num_splits,
    A_ROW_DIV: tl.constexpr,   # A row of pair p is p // A_ROW_DIV (top_k for x, 1 for h)
    DIRECT: tl.constexpr,      # all pairs in one row block; program m serves pair m's expert
    GATED: tl.constexpr,       # gate_up: two accumulators, gate and up columns of B
    SCALE_C: tl.constexpr,     # router weight multiplies the GEMM result rows (epilogue)
    C_PARTIAL: tl.constexpr,   # store fp32 partials (split K or top_k > 1) instead of final rows
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_B: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr = DENSE,  # dequant.py's formats; DENSE: B in A's dtype
    GROUP_K: tl.constexpr = 128,          # K rows per scale group of a quantized B
    # training (fused_moe_backward): the gate/up pre-activations [P, 2N] before the router
    # weight, written by the forward (GATED, STORE_PREACT) and read by the SwiGLU backward
    preact_ptr=None, stride_pm=0, stride_pn=0,
    # SWIGLU_BWD only: h [P, N] recomputed for the down weight gradient, and the router-weight
    # gradient's partial sums [P, column blocks] (fp32)
    h_ptr=None, stride_hm=0, stride_hn=0, dw_ptr=None, stride_dwm=0,
    STORE_PREACT: tl.constexpr = False,
    SWIGLU_BWD: tl.constexpr = False,  # the epilogue of dH = dOut @ down^T (see _swiglu_backward)
    ON_INPUT: tl.constexpr = True,     # SWIGLU_BWD: the router weight was applied on the input
    # transformers' other expert layouts and gates; the defaults are Llama 4's (no code for them)
    # bias [E, N_total] added to the fp32 result, in split 0 only: gate_up's after the router
    # weight on the input, down's before the router weight on the output. SWIGLU_BWD: the
    # gate_up bias of the pre-activations, and a_bias [E, K] the down bias (dL/dw += dOut . b2).
    bias_ptr=None, stride_biase=0, stride_biasn=0, a_bias_ptr=None, stride_abe=0, stride_abk=0,
    glu_limit=None, glu_alpha=None,  # CLAMPED_SWIGLU's limit and alpha
    GATE_UP_INTERLEAVED: tl.constexpr = False,  # GATED or SWIGLU_BWD: gate column n of gate_up_proj
    # (B, dA, the bias) is 2n and up 2n + 1, instead of n and N + n
    ACTIVATION: tl.constexpr = SILU,  # the gate's activation (_glu)
    # Hopper's tensor-memory accelerator (TMA), MoeConfig.tma; off: pointer loads. b_desc: a
    # tensor descriptor over B as stored (device.weight_descriptor, gemm.weight_tile), logical
    # [E, K, N_total] tiles [BLOCK_K, BLOCK_N] (packed INT4: K / 2 rows, BLOCK_K / 2 a step;
    # dense GATED with GATE_UP_INTERLEAVED: 2 BLOCK_N, gate and up columns in one tile); a_desc:
    # one over A [rows, K] with blocks [BLOCK_M, BLOCK_K], for an A whose rows of a block are
    # consecutive (A_BY_SLOT, or DIRECT with A_ROW_DIV == 1)
    b_desc=None, a_desc=None,
    B_TRANSPOSED: tl.constexpr = False,  # b_desc is over B's [E, N_total, K] transpose (K contiguous)
    # the rows of A (A_BY_SLOT) or C (C_BY_SLOT) are dispatch slots, the pairs in expert order,
    # instead of pair indices: gate_up writes h so that each row block of the down GEMM reads
    # consecutive rows (slot = pair when DIRECT)
    A_BY_SLOT: tl.constexpr = False, C_BY_SLOT: tl.constexpr = False,
    EPILOGUE_SPLIT: tl.constexpr = 1,
    PDL: tl.constexpr = False,  # launched as a programmatic dependent launch (MoeConfig.pdl)
):
    if PDL:  # this grid may start while the previous kernel finishes: wait for its writes
        tl.extra.cuda.gdc_wait()
    # -- which tile: grouped ordering, so the CTAs resident at once share B column blocks
    # (several row blocks of one expert) and A row blocks (several column blocks).
    pid_s = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)

    # -- which pairs (rows) and which expert.
    offs_r = tl.arange(0, BLOCK_M)
    if DIRECT:
        ids = tl.load(topk_ids_ptr + offs_r, mask=offs_r < num_pairs, other=-1)
        expert = tl.load(topk_ids_ptr + pid_m)
        if tl.sum(((ids == expert) & (offs_r < pid_m)).to(tl.int32), axis=0) > 0:
            return  # an earlier pair chose this expert; its program serves this pair too
        pairs = offs_r
        slots = offs_r
        first_row = 0
        row_mask = (ids == expert) & (offs_r < num_pairs)
    else:
        num_blocks = tl.load(block_offsets_ptr + num_experts + 1)
        if pid_m >= num_blocks:
            return  # beyond the valid blocks of this routing (the grid is a static bound)
        b = tl.arange(0, BLOCK_B)
        ends = tl.load(block_offsets_ptr + 1 + b, mask=b < num_experts + 1, other=num_pid_m)
        expert = tl.sum((ends <= pid_m).to(tl.int32), axis=0)  # bucket num_experts: bad ids
        first_slot = tl.load(expert_offsets_ptr + expert)
        first_row = first_slot + (pid_m - tl.load(block_offsets_ptr + expert)) * BLOCK_M
        slots = first_row + offs_r
        row_mask = slots < tl.load(expert_offsets_ptr + expert + 1)
        pairs = tl.load(sorted_pairs_ptr + slots, mask=row_mask, other=0)
    # An out-of-range id contributes nothing: its rows run no K steps and store zeros.
    valid_expert = (expert >= 0) & (expert < num_experts)
    pairs = pairs.to(tl.int64)
    if A_BY_SLOT:
        a_rows = slots.to(tl.int64)
    else:
        a_rows = pairs // A_ROW_DIV
    if C_BY_SLOT:
        c_rows = slots.to(tl.int64)
    else:
        c_rows = pairs
    if SCALE_C or SWIGLU_BWD:
        router_w = tl.load(topk_weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)

    # -- this split's K range (whole K tiles).
    k_tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), num_splits)
    k_lo = pid_s * k_tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + k_tiles_per_split * BLOCK_K)
    k_hi = tl.where(valid_expert, k_hi, k_lo)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # gate_up_proj's gate columns (of B when GATED; of dA when SWIGLU_BWD) and how far the up
    # column of each lies
    if GATE_UP_INTERLEAVED:
        gate_cols = 2 * offs_n
        up_shift = 1
    else:
        gate_cols = offs_n
        up_shift = N
    if GATED:
        b_cols = gate_cols
    else:
        b_cols = offs_n
    a_rows_ptrs = a_ptr + a_rows[:, None] * stride_am
    b_base = b_ptr + expert.to(tl.int64) * stride_be  # only dereferenced for a valid expert
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if a_bias_ptr is not None:  # SWIGLU_BWD with a down bias: dOut . b2[e] per row, block 0
        d_w_bias = tl.zeros((BLOCK_M,), dtype=tl.float32)
        ab_base = a_bias_ptr + expert.to(tl.int64) * stride_abe
    else:
        d_w_bias = None
    if WEIGHT_FORMAT != DENSE:
        bs_base = bs_ptr + expert.to(tl.int64) * stride_bse
        bz_base = bz_ptr + expert.to(tl.int64) * stride_bze
        a_group_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)  # read by FP8_BLOCK only
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        if a_desc is not None:  # rows past the block's own (another expert's, or zeros past the
            a = a_desc.load([first_row, k0])  # end) only reach masked output rows
        else:
            a = tl.load(a_rows_ptrs + kk[None, :] * stride_ak, mask=row_mask[:, None] & (kk < K)[None, :], other=0.0)
        if WEIGHT_FORMAT == DENSE and b_desc is not None and GATED and GATE_UP_INTERLEAVED:
            # gate and up columns in one [BLOCK_K, 2 BLOCK_N] block
            b_pair = weight_tile(b_desc, expert, k0, 2 * pid_n * BLOCK_N, BLOCK_K, 2 * BLOCK_N, B_TRANSPOSED)
            b_gate, b_up = b_pair.reshape(BLOCK_K, BLOCK_N, 2).split()
            acc = tl.dot(a, b_gate, acc, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        elif WEIGHT_FORMAT == DENSE and b_desc is not None:
            # gate columns past N read up columns: masked output columns only
            b_tile = weight_tile(b_desc, expert, k0, pid_n * BLOCK_N, BLOCK_K, BLOCK_N, B_TRANSPOSED)
            acc = tl.dot(a, b_tile, acc, input_precision=DOT_PRECISION)
            if GATED:
                b_up = weight_tile(b_desc, expert, k0, N + pid_n * BLOCK_N, BLOCK_K, BLOCK_N, B_TRANSPOSED)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        elif WEIGHT_FORMAT == DENSE:
            b_ptrs = b_base + kk[:, None] * stride_bk + b_cols[None, :] * stride_bn
            b_mask = (kk < K)[:, None] & n_mask[None, :]
            acc = tl.dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), acc, input_precision=DOT_PRECISION)
            if GATED:
                b_up = tl.load(b_ptrs + up_shift * stride_bn, mask=b_mask, other=0.0)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        else:
            if WEIGHT_FORMAT == FP8_BLOCK:
                a_group_scale = tl.load(as_ptr + a_rows * stride_asm + (k0 // FP8_BLOCK_SIZE) * stride_ask,
                                        mask=row_mask, other=0.0)
            if b_desc is None:  # dequant_dot loads the weight tiles
                w_gate = None
                w_up = None
            else:  # the step's stored rows: k0 (FP8), or k0 / 2 packed INT4 rows
                if WEIGHT_FORMAT == INT4_SYM or WEIGHT_FORMAT == INT4_ASYM:
                    w_rows = k0 // 2
                    W_TILE_K: tl.constexpr = BLOCK_K // 2
                else:
                    w_rows = k0
                    W_TILE_K: tl.constexpr = BLOCK_K
                w_gate = weight_tile(b_desc, expert, w_rows, pid_n * BLOCK_N, W_TILE_K, BLOCK_N, B_TRANSPOSED)
                if GATED:
                    w_up = weight_tile(b_desc, expert, w_rows, N + pid_n * BLOCK_N, W_TILE_K, BLOCK_N, B_TRANSPOSED)
            acc = dequant_dot(acc, a, a_group_scale, b_base, stride_bk, stride_bn, bs_base, stride_bsk, stride_bsn,
                              bz_base, stride_bzk, stride_bzn, k0, offs_n, n_mask, K,
                              WEIGHT_FORMAT, GROUP_K, BLOCK_K, DOT_PRECISION, w_gate)
            if GATED:  # the up columns are N + n of the same expert matrix
                acc_up = dequant_dot(acc_up, a, a_group_scale, b_base, stride_bk, stride_bn, bs_base, stride_bsk,
                                     stride_bsn, bz_base, stride_bzk, stride_bzn, k0, offs_n + N, n_mask, K,
                                     WEIGHT_FORMAT, GROUP_K, BLOCK_K, DOT_PRECISION, w_up)
        if a_bias_ptr is not None:
            a_bias = tl.load(ab_base + kk * stride_abk, mask=kk < K, other=0.0).to(tl.float32)
            a_bias = tl.where(pid_n == 0, a_bias, 0.0)
            d_w_bias += tl.sum(a.to(tl.float32) * a_bias[None, :], axis=1)
    if PDL:  # the next kernel may launch and set up while this epilogue runs
        tl.extra.cuda.gdc_launch_dependents()

    # -- epilogue: rows go back to their pair (or, top-1, token) row, or h to its slot (C_BY_SLOT).
    if SWIGLU_BWD:  # dA's gate columns follow gate_up_proj's
        c_cols = gate_cols
    else:
        c_cols = offs_n
    c_rows_ptr = c_ptr + pid_s.to(tl.int64) * c_split_stride + c_rows * stride_cm
    c_ptrs = c_rows_ptr[:, None] + c_cols[None, :] * stride_cn
    c_mask = row_mask[:, None] & n_mask[None, :]
    if WEIGHT_FORMAT == FP8_ROWWISE:  # per-token activation scale x per-channel weight scale
        a_scale = tl.load(as_ptr + a_rows * stride_asm, mask=row_mask, other=0.0)
        acc = rowwise_epilogue(acc, a_scale, bs_base, stride_bsn, offs_n, n_mask, WEIGHT_FORMAT)
        if GATED:
            acc_up = rowwise_epilogue(acc_up, a_scale, bs_base, stride_bsn, offs_n + N, n_mask, WEIGHT_FORMAT)
    if STORE_PREACT:  # before the router weight: the backward needs x_e @ gate_up unscaled
        p_ptrs = preact_ptr + pairs[:, None] * stride_pm + offs_n[None, :] * stride_pn
        tl.store(p_ptrs, acc.to(preact_ptr.dtype.element_ty), mask=c_mask)
        tl.store(p_ptrs + N * stride_pn, acc_up.to(preact_ptr.dtype.element_ty), mask=c_mask)
    if bias_ptr is not None:  # an invalid expert's rows stay zero; added once over the splits
        use_bias = valid_expert & (pid_s == 0)
        bias_base = bias_ptr + tl.where(valid_expert, expert, 0).to(tl.int64) * stride_biase
        bias = tl.load(bias_base + gate_cols * stride_biasn, mask=n_mask, other=0.0).to(tl.float32)
        bias = tl.where(use_bias, bias, 0.0)
        if GATED or SWIGLU_BWD:
            bias_up = tl.load(bias_base + (gate_cols + up_shift) * stride_biasn, mask=n_mask, other=0.0)
            bias_up = tl.where(use_bias, bias_up.to(tl.float32), 0.0)
        else:
            bias_up = None
    else:
        bias = None
        bias_up = None
    if SWIGLU_BWD:
        _swiglu_backward(acc, router_w, pairs, offs_n, c_mask, N, c_ptrs, stride_cn,
                         preact_ptr, stride_pm, stride_pn, h_ptr, stride_hm, stride_hn,
                         dw_ptr + pairs * stride_dwm + pid_n, row_mask, ON_INPUT,
                         up_shift, bias, bias_up, d_w_bias, glu_limit, glu_alpha, ACTIVATION)
        return
    if bias is not None and not GATED:  # down: the bias is inside the router weight on the output
        acc += bias[None, :]
    if SCALE_C:  # the router weight on the GEMM result rows: w * (a @ B) == (w * a) @ B
        acc = acc * router_w[:, None]
        if GATED:
            acc_up = acc_up * router_w[:, None]
    if GATED:
        if bias is not None:  # gate_up: the bias is outside the router weight on the input
            acc += bias[None, :]
            acc_up += bias_up[None, :]
        if C_PARTIAL:
            _store_tile(c_ptrs, c_mask, acc, c_rows_ptr, offs_n, row_mask, N, stride_cn, EPILOGUE_SPLIT)
            _store_tile(c_ptrs + N * stride_cn, c_mask, acc_up, c_rows_ptr + N * stride_cn, offs_n, row_mask, N,
                        stride_cn, EPILOGUE_SPLIT)
        else:
            h = _glu(acc, acc_up, glu_limit, glu_alpha, ACTIVATION)
            _store_tile(c_ptrs, c_mask, h, c_rows_ptr, offs_n, row_mask, N, stride_cn, EPILOGUE_SPLIT)
    else:
        _store_tile(c_ptrs, c_mask, acc, c_rows_ptr, offs_n, row_mask, N, stride_cn, EPILOGUE_SPLIT)


@triton.jit
def _store_tile(c_ptrs, c_mask, acc, rows_ptr, offs_n, row_mask, N, stride_cn, SPLIT: tl.constexpr):
    """Store acc [BLOCK_M, BLOCK_N] in C's dtype: whole (SPLIT = 1) at c_ptrs, or in SPLIT = 2
    or 4 column pieces at rows_ptr [BLOCK_M] + column * stride_cn, so that one piece's
    addresses are live at a time (a 128 x 256 tile's 64-bit addresses alone would take 256
    registers a thread next to its 128 accumulators)."""
    if SPLIT == 1:
        tl.store(c_ptrs, acc.to(c_ptrs.dtype.element_ty), mask=c_mask)
    else:
        a0, a1 = acc.reshape(acc.shape[0], 2, acc.shape[1] // 2).permute(0, 2, 1).split()
        n0, n1 = offs_n.reshape(2, offs_n.shape[0] // 2).permute(1, 0).split()
        if SPLIT == 2:
            _store_piece(rows_ptr, n0, a0, row_mask, N, stride_cn)
            _store_piece(rows_ptr, n1, a1, row_mask, N, stride_cn)
        else:
            a00, a01 = a0.reshape(a0.shape[0], 2, a0.shape[1] // 2).permute(0, 2, 1).split()
            a10, a11 = a1.reshape(a1.shape[0], 2, a1.shape[1] // 2).permute(0, 2, 1).split()
            n00, n01 = n0.reshape(2, n0.shape[0] // 2).permute(1, 0).split()
            n10, n11 = n1.reshape(2, n1.shape[0] // 2).permute(1, 0).split()
            _store_piece(rows_ptr, n00, a00, row_mask, N, stride_cn)
            _store_piece(rows_ptr, n01, a01, row_mask, N, stride_cn)
            _store_piece(rows_ptr, n10, a10, row_mask, N, stride_cn)
            _store_piece(rows_ptr, n11, a11, row_mask, N, stride_cn)


@triton.jit
def _store_piece(rows_ptr, cols, acc, row_mask, N, stride_cn):
    tl.store(rows_ptr[:, None] + cols[None, :] * stride_cn, acc.to(rows_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (cols < N)[None, :])


@triton.jit
def _moe_wgrad_kernel(
    # A rows [*, KO] (x or h) and B rows [*, NO] (dA or dOut), gathered by pair
    a_ptr, stride_am, stride_ak, b_ptr, stride_bm, stride_bn,
    # C: the weight gradient [E, KO, NO]
    c_ptr, stride_ce, stride_ck, stride_cn,
    sorted_pairs_ptr, expert_offsets_ptr, KO, NO,
    A_ROW_DIV: tl.constexpr, B_ROW_DIV: tl.constexpr,  # row of pair p: p // DIV (top_k for token rows)
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    # the bias gradient db[e] [E, NO] = sum over e's pairs p of rw[p] B[p], rw the router
    # weights [P] when given, else 1 (written by the programs of the first K tile)
    bias_grad_ptr=None, stride_dbe=0, stride_dbn=0, row_w_ptr=None,
):
    """dW[e] = sum over expert e's pairs p of A[p]^T B[p]: a grouped GEMM whose reduction runs
    over each expert's rows (the dispatch metadata lists them). One program owns a [BLOCK_K,
    BLOCK_N] tile of one expert's gradient and reduces all of that expert's pairs in fp32, so
    the sum has a fixed order (deterministic, no atomics) and an expert with no pairs gets an
    exact zero gradient. Grid: (tiles of [KO, NO], E); bucket E (skipped ids) is never read."""
    expert = tl.program_id(1)
    pid_k, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(KO, BLOCK_K), tl.cdiv(NO, BLOCK_N), GROUP_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = offs_k < KO
    n_mask = offs_n < NO
    start = tl.load(expert_offsets_ptr + expert)
    end = tl.load(expert_offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    if bias_grad_ptr is not None:
        bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_P):
        slots = s0 + tl.arange(0, BLOCK_P)
        row_mask = slots < end
        pairs = tl.load(sorted_pairs_ptr + slots, mask=row_mask, other=0).to(tl.int64)
        a = tl.load(a_ptr + (pairs // A_ROW_DIV)[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + (pairs // B_ROW_DIV)[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                    mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
        if bias_grad_ptr is not None:
            b_rows = b.to(tl.float32)
            if row_w_ptr is not None:
                b_rows = b_rows * tl.load(row_w_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)[:, None]
            bias_acc += tl.sum(b_rows, axis=0)
    if bias_grad_ptr is not None:
        if pid_k == 0:
            tl.store(bias_grad_ptr + expert.to(tl.int64) * stride_dbe + offs_n * stride_dbn,
                     bias_acc.to(bias_grad_ptr.dtype.element_ty), mask=n_mask)
    c_ptrs = (c_ptr + expert.to(tl.int64) * stride_ce + offs_k[:, None].to(tl.int64) * stride_ck
              + offs_n[None, :] * stride_cn)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# launch configs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoeConfig:
    """block_m (rows per block) is shared: both GEMMs walk the same dispatch metadata.

    Three Hopper options, off unless a table bucket sets them (not measured on a GPU yet;
    benchmarks/tune_moe.py --hopper compares them with the plain kernels):
    tma: load through the tensor memory accelerator (tensor descriptors) where the device, the
    triton and the operands allow it (`device.tensor_descriptor`): both GEMMs' weights (dense,
    FP8 or packed INT4), and the down GEMM's A, for which the gate_up GEMM then writes h in
    expert order.
    epilogue_block_n: each GEMM stores its tile in column pieces this wide (at most 4 pieces),
    not whole: fewer live registers in the epilogue of a wide tile (None: whole tiles).
    pdl: launch each of fused_moe's GEMM and combine kernels as a programmatic dependent launch
    where the device allows it (`device.supports_pdl`), which waits for the previous kernel's
    writes in the kernel instead of between launches: the next kernel's launch and setup overlap
    the previous one's tail (decode's fixed costs)."""
    block_m: int
    gate_up: GemmConfig
    down: GemmConfig
    tma: bool = False
    epilogue_block_n: int | None = None
    pdl: bool = False

    def epilogue_split(self, g: GemmConfig) -> int:
        """The kernel's EPILOGUE_SPLIT (1, 2 or 4 column pieces) for GEMM g."""
        if self.epilogue_block_n is None:
            return 1
        return min(4, max(1, g.block_n // self.epilogue_block_n))

    def direct(self, num_pairs: int) -> bool:
        """True when all (token, slot) pairs fit one row block: no dispatch metadata is built
        and each GEMM program indexes its expert from topk_ids directly (decode)."""
        return num_pairs <= self.block_m


def _gemm_from_json(d: dict, where: str) -> GemmConfig:
    cfg = GemmConfig(block_n=checks.power_of_two(f"{where}.block_n", d["block_n"]),
                     block_k=checks.power_of_two(f"{where}.block_k", d["block_k"]),
                     group_m=int(d["group_m"]), num_warps=checks.power_of_two(f"{where}.num_warps", d["num_warps"], 1),
                     num_stages=int(d["num_stages"]))
    if cfg.group_m < 1 or cfg.num_stages < 1:
        raise ValueError(f"{where}: group_m and num_stages must be >= 1")
    return cfg


@functools.lru_cache(maxsize=None)
def config_table() -> dict[tuple[int, int, int], list[tuple[float, MoeConfig]]]:
    """The H100 table from configs/moe_h100.json: (E, H, I) -> [(max tokens per expert,
    config)] in increasing order, the last bucket open-ended (inf)."""
    raw = json.loads(CONFIG_FILE.read_text())
    table = {}
    for key, buckets in raw.items():
        if key.startswith("_"):
            continue
        fields = dict(part.split("=") for part in key.split(","))
        shape = (int(fields["E"]), int(fields["H"]), int(fields["I"]))
        rows = []
        for i, b in enumerate(buckets):
            where = f"{CONFIG_FILE.name}[{key}][{i}]"
            bound = b["max_tokens_per_expert"]
            cfg = MoeConfig(checks.power_of_two(f"{where}.block_m", b["block_m"]),
                            _gemm_from_json(b["gate_up"], where + ".gate_up"), _gemm_from_json(b["down"], where + ".down"),
                            b.get("tma", False), b.get("epilogue_block_n"), b.get("pdl", False))
            hopper_args(cfg, where)
            rows.append((float("inf") if bound is None else float(bound), cfg))
        if [r[0] for r in rows] != sorted(r[0] for r in rows) or rows[-1][0] != float("inf"):
            raise ValueError(f"{CONFIG_FILE.name}[{key}]: buckets must increase and end open (null)")
        table[shape] = rows
    return table


def _heuristic_gemm(block_m: int, n: int, k: int, gated: bool, elem_size: int) -> GemmConfig:
    """Tiles for shapes outside the table: no larger than the problem; a 128-wide N tile only
    for the single-accumulator GEMM in 16-bit once row blocks are big (the gated GEMM's two
    accumulators already make a 64-wide tile 128 columns); shared memory per stage in budget."""
    wide = block_m >= 64 and not gated and elem_size == 2
    block_n = min(128 if wide else 64, max(16, triton.next_power_of_2(n)))
    block_k = min(128 if block_m <= 32 else 64, max(16, triton.next_power_of_2(k)))
    if elem_size > 2:
        block_k = max(16, block_k // 2)
    b_tiles = 2 if gated else 1
    num_warps = 8 if block_m * block_n * b_tiles * elem_size >= 128 * 128 * 2 else 4
    per_stage = (block_m * block_k + b_tiles * block_k * block_n) * elem_size
    num_stages = max(2, min(4, (160 * 1024) // per_stage))
    return GemmConfig(block_n, block_k, 8 if block_m >= 64 else 1, num_warps, num_stages)


def _heuristic_config(tokens_per_expert: float, H: int, I: int, elem_size: int) -> MoeConfig:
    t = tokens_per_expert
    block_m = 16 if t <= 8 else 32 if t <= 24 else 64 if t <= 48 else 128
    return MoeConfig(block_m, _heuristic_gemm(block_m, I, H, True, elem_size),
                     _heuristic_gemm(block_m, H, I, False, elem_size))


@functools.lru_cache(maxsize=4096)  # a decode loop asks for the same config every step: ~25 us saved
def select_config(num_tokens: int, top_k: int, E: int, H: int, I: int, dtype: torch.dtype, *,
                  num_sms: int, use_table: bool) -> MoeConfig:
    """The launch config of one call: the table bucket (or heuristic) for tokens per expert
    T * top_k / E, with split_k filled in for num_sms parallel workers."""
    pairs = num_tokens * top_k
    tpe = pairs / E
    rows = config_table().get((E, H, I)) if use_table and dtype in (torch.float16, torch.bfloat16) else None
    if rows is not None:
        cfg = next(c for bound, c in rows if tpe <= bound)
    else:
        cfg = _heuristic_config(tpe, H, I, dtype.itemsize)
    if cfg.block_m < pairs <= DIRECT_MAX_PAIRS:  # decode: one row block for all, no metadata
        cfg = replace(cfg, block_m=triton.next_power_of_2(pairs))
    # Row blocks that will really run: at most one per expert when pairs are few (decode),
    # about pairs / block_m when many.
    row_blocks = max(min(pairs, E), triton.cdiv(pairs, cfg.block_m))
    return replace(cfg, gate_up=replace(cfg.gate_up, split_k=split_k(cfg.gate_up, row_blocks, I, H, num_sms)),
                   down=replace(cfg.down, split_k=split_k(cfg.down, row_blocks, H, I, num_sms)))


@functools.lru_cache(maxsize=None)
def _use_table(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertQuant:
    """Quantized expert weights for `fused_moe` (formats: dequant.py), validated.

    code: dequant.py's WEIGHT_FORMAT; gate_up_scale / down_scale viewed as [E, K groups, N
    groups] (broadcast dimensions with stride 0); zeros only for INT4_ASYM; group_k the K rows
    per scale (int4 group size, 128 for fp8_block; FP8 per-channel weights have no K groups);
    act_scale_ub bounds FP8 activation amaxes."""
    code: int
    gate_up_scale: torch.Tensor
    down_scale: torch.Tensor
    gate_up_zero: torch.Tensor | None
    down_zero: torch.Tensor | None
    group_k: int
    act_scale_ub: float | None

    @property
    def fp8(self) -> bool:
        return self.code not in (INT4_SYM.value, INT4_ASYM.value)

    def quantize_activations(self, a: torch.Tensor):
        """(A operand, its scales [rows, K groups]) for a GEMM: FP8 formats quantize a per row
        (per 1x128 group for fp8_block); INT4 leaves a as is (scales: a placeholder)."""
        if not self.fp8:
            return a, a
        q, s = quantize_fp8_activations(a, group_size=128 if self.code == FP8_BLOCK.value else None,
                                        scale_ub=self.act_scale_ub)
        return q, (s if s.dim() == 2 else s[:, None])


def quant_experts_args(hidden_states, gate_up_proj, down_proj, weight_format, gate_up_scale, down_scale,
                       gate_up_zero, down_zero, group_size, act_scale_ub) -> ExpertQuant:
    """Validate quantized experts (logical gate_up [E, H, 2I], down [E, I, H]; INT4 packed along
    K: [E, H / 2, 2I] and [E, I / 2, H]) and return them as an ExpertQuant."""
    checks.tensor("hidden_states", hidden_states, ndim=2, dtypes=checks.FLOAT_DTYPES)
    checks.tensor("gate_up_proj", gate_up_proj, ndim=3)
    checks.tensor("down_proj", down_proj, ndim=3)
    code = format_code(weight_format, gate_up_zero)
    if (gate_up_zero is None) != (down_zero is None):
        raise ValueError("gate_up_zero and down_zero must both be given (int4 asymmetric) or both None")
    int4 = code in (INT4_SYM.value, INT4_ASYM.value)
    H = hidden_states.shape[1]
    E, two_i = gate_up_proj.shape[0], gate_up_proj.shape[2]
    if two_i % 2:
        raise ValueError(f"gate_up_proj's last dimension (2I) must be even, got {two_i}")
    inter = two_i // 2
    s13 = quant_weight_args("gate_up_proj", code, gate_up_proj, gate_up_scale, gate_up_zero, group_size,
                            H, two_i, (E,))
    s2 = quant_weight_args("down_proj", code, down_proj, down_scale, down_zero, group_size, inter, H, (E,))
    tensors = dict(hidden_states=hidden_states, gate_up_proj=gate_up_proj, down_proj=down_proj,
                   gate_up_scale=gate_up_scale, down_scale=down_scale)
    if gate_up_zero is not None:
        tensors.update(gate_up_zero=gate_up_zero, down_zero=down_zero)
    checks.same_device(**tensors)
    return ExpertQuant(code, s13, s2, gate_up_zero, down_zero, group_size if int4 else 128,
                       checks.scale_bound("act_scale_ub", act_scale_ub))


@dataclass(frozen=True)
class ExpertVariant:
    """How a transformers experts module departs from Llama 4's SwiGLU experts (validated by
    checks.moe_variant_args); the default is Llama 4's, which launches no code for any of it.

    gate_up_bias [E, 2I] (gate_up_proj's column order) / down_bias [E, H]; activation: ACTIVATIONS'
    code, or CLAMPED_SWIGLU with (limit, alpha); interleaved: gate column n of gate_up_proj is 2n
    and up 2n + 1 (else n and I + n)."""
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    activation: int = SILU.value
    interleaved: bool = False
    limit: float | None = None
    alpha: float | None = None

    def gate_up_kwargs(self) -> dict:
        """_moe_gemm_kernel arguments of the gate_up GEMM (GATED) and of the SwiGLU backward."""
        kw = {}
        if self.gate_up_bias is not None:
            b = self.gate_up_bias
            kw.update(bias_ptr=b, stride_biase=b.stride(0), stride_biasn=b.stride(1))
        if self.interleaved:
            kw.update(GATE_UP_INTERLEAVED=True)
        if self.activation != SILU.value:
            kw.update(ACTIVATION=self.activation)
        if self.activation == CLAMPED_SWIGLU.value:
            kw.update(glu_limit=float(self.limit), glu_alpha=float(self.alpha))
        return kw

    def down_kwargs(self) -> dict:
        """_moe_gemm_kernel arguments of the down GEMM."""
        b = self.down_bias
        return {} if b is None else dict(bias_ptr=b, stride_biase=b.stride(0), stride_biasn=b.stride(1))


def expert_variant(gate_up_bias=None, down_bias=None, activation: str = "silu", gate_up_interleaved: bool = False,
                   clamped_swiglu: tuple[float, float] | None = None) -> ExpertVariant:
    """The ExpertVariant of fused_moe's keyword arguments (already validated)."""
    code = CLAMPED_SWIGLU.value if clamped_swiglu is not None else ACTIVATIONS[activation]
    limit, alpha = clamped_swiglu if clamped_swiglu is not None else (None, None)
    return ExpertVariant(gate_up_bias, down_bias, code, gate_up_interleaved, limit, alpha)


def fused_moe(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              apply_router_weight_on_input: bool = True, out: torch.Tensor | None = None,
              weight_format: str | None = None, gate_up_scale: torch.Tensor | None = None,
              down_scale: torch.Tensor | None = None, gate_up_zero: torch.Tensor | None = None,
              down_zero: torch.Tensor | None = None, group_size: int = 128,
              act_scale_ub: float | None = None, config: MoeConfig | None = None,
              preact: torch.Tensor | None = None, gate_up_bias: torch.Tensor | None = None,
              down_bias: torch.Tensor | None = None, activation: str = "silu", gate_up_interleaved: bool = False,
              clamped_swiglu: tuple[float, float] | None = None, skip_sentinel_ids: bool = False) -> torch.Tensor:
    """Routed SwiGLU experts, computing only the chosen (token, expert) pairs.

    hidden_states: [T, H] float16/bfloat16/float32, any strides.
    gate_up_proj:  [E, H, 2I], same dtype; columns [:I] are the gate, [I:] the up projection
                   (transformers' Llama4TextExperts layout, read in place; contiguous last
                   dimension is fastest).
    down_proj:     [E, I, H], same dtype.
    topk_weights:  [T, k] float (any float dtype; used in fp32).
    topk_ids:      [T, k] int32/int64 expert ids. On CUDA, ids outside [0, E) are skipped
                   (contribute nothing); on CPU they raise, except ids >= E with
                   skip_sentinel_ids=True (expert-parallel sentinels: skipped on every device).
    apply_router_weight_on_input: Llama 4's convention, the expert input is x * w (applied as
                   w * (x @ gate_up) on the fp32 accumulators: the same product, one rounding
                   fewer); otherwise the expert output is scaled by w.
    out:           optional [T, H] tensor with hidden_states' dtype and device, any strides,
                   that receives the result (every element is written).
    weight_format: None (the weights are in hidden_states' dtype), or quantized experts in the
                   layouts of kernels/dequant.py, each expert a logical [K, N] matrix:
                   "fp8_rowwise" / "fp8_block": gate_up_proj / down_proj float8_e4m3fn
                   [E, H, 2I] / [E, I, H] with float32 scales [E, N] (per channel), [E, 1] (per
                   tensor) or [E, cdiv(K, 128), cdiv(N, 128)] (fp8_block); the activations (x,
                   and the SwiGLU output before the down GEMM) are quantized per token (per
                   1x128 group for fp8_block), their amax clamped to act_scale_ub when set.
                   "int4": uint8 [E, H / 2, 2I] / [E, I / 2, H] packed along K, scales
                   [E, K / group_size, N], zero points likewise (uint8) or None (symmetric).
                   The router weight multiplies the fp32 GEMM result, after any scales.
    config:        optional MoeConfig replacing `launch_config`'s choice, split_k included
                   (tests force tile sizes with it: K steps inside one scale group, the
                   direct or the sorted path); validated by `config_args`.
    preact:        optional [T * k, 2I] tensor in hidden_states' dtype that receives, for pair
                   p = t * k + j, x[t] @ gate_up_proj[topk_ids[t, j]] before the router weight
                   and any bias, gate columns first whatever the weights' order (what
                   `fused_moe_backward` needs; training). Rows of skipped ids get zeros.

    transformers' other experts (the defaults are Llama 4's; dense weights only, not with
    weight_format):
    gate_up_bias:  [E, 2I] (gate_up_proj's column order) added to x @ gate_up_proj[e], and
    down_bias:     [E, H] added to h @ down_proj[e]; both only with the router weight on the output.
    activation:    "silu" (SwiGLU), "gelu" (erf) or "gelu_tanh": h = act(gate) * up.
    gate_up_interleaved: gate column n of gate_up_proj is 2n and up 2n + 1 (gpt-oss), instead of
                   n and I + n. Transposed (nn.Linear-style) weights need no option: pass the
                   [E, H, 2I] / [E, I, H] views (.transpose(1, 2)), read through their strides.
    clamped_swiglu: (limit, alpha): gpt-oss's gate, h = (clamp(up, -limit, limit) + 1) * g *
                   sigmoid(alpha * g) with g = min(gate, limit) (NaN kept), in place of act(gate) * up.

    Returns [T, H] in hidden_states' dtype: sum over the k choices of
    down(silu(x_w @ gate) * (x_w @ up)), accumulated in fp32. The shared expert is not included.
    """
    variant = ExpertVariant()
    if weight_format is None:
        checks.moe_args(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, skip_sentinel_ids)
        checks.moe_variant_args(hidden_states, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
                                gate_up_interleaved, clamped_swiglu, apply_router_weight_on_input)
        variant = expert_variant(gate_up_bias, down_bias, activation, gate_up_interleaved, clamped_swiglu)
        quant = None
    else:
        if (gate_up_bias, down_bias, activation, gate_up_interleaved, clamped_swiglu) != (None, None, "silu", False,
                                                                                           None):
            raise ValueError("quantized experts (weight_format) take Llama 4's SwiGLU experts only: no biases, "
                             "activation, gate_up_interleaved or clamped_swiglu")
        quant = quant_experts_args(hidden_states, gate_up_proj, down_proj, weight_format, gate_up_scale, down_scale,
                                   gate_up_zero, down_zero, group_size, act_scale_ub)
        checks.routing_args(hidden_states, topk_weights, topk_ids, gate_up_proj.shape[0], skip_sentinel_ids)
    checks.kernel_device("hidden_states", hidden_states, "fused_moe", checks.INTERPRETER_BF16_DOT)
    if config is not None:
        config_args(config, quant)
    if out is None:
        out = torch.empty_like(hidden_states, memory_format=torch.contiguous_format)
    else:
        checks.out_like(out, hidden_states, "hidden_states")
        checks.disjoint("out", out, hidden_states=hidden_states, gate_up_proj=gate_up_proj, down_proj=down_proj,
                        topk_weights=topk_weights, topk_ids=topk_ids, gate_up_bias=gate_up_bias,
                        down_bias=down_bias)
    if preact is not None:
        P, two_i = topk_ids.numel(), gate_up_proj.shape[2]
        checks.out_like(preact, hidden_states, "hidden_states", name="preact", shape=(P, two_i))
        checks.disjoint("preact", preact, output=out, hidden_states=hidden_states, gate_up_proj=gate_up_proj,
                        down_proj=down_proj, topk_weights=topk_weights, topk_ids=topk_ids)
    if hidden_states.shape[0] == 0:
        return out
    cfg = config or launch_config(hidden_states, gate_up_proj, down_proj, topk_ids.shape[1], quant)
    # The pre-activations come from one K pass (no split partials), and the split combine only
    # knows SwiGLU.
    if preact is not None or variant.activation != SILU.value:
        cfg = replace(cfg, gate_up=replace(cfg.gate_up, split_k=1))
    return _launch(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids,
                   apply_router_weight_on_input, out, cfg, quant, preact, variant)


def launch_config(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                  top_k: int, quant: ExpertQuant | None = None) -> MoeConfig:
    """The MoeConfig that `fused_moe` uses for these inputs (same shapes as fused_moe): the
    H100 table on sm90 for 16-bit dtypes, else the heuristic; split_k for this device.
    Quantized experts take the heuristic with K steps inside one scale group."""
    T, H = hidden_states.shape
    E, two_i = gate_up_proj.shape[0], gate_up_proj.shape[2]
    dev = hidden_states.device
    if quant is None:
        return select_config(T, top_k, E, H, two_i // 2, hidden_states.dtype,
                             num_sms=num_sms(dev), use_table=_use_table(dev))
    cfg = select_config(T, top_k, E, H, two_i // 2, hidden_states.dtype, num_sms=num_sms(dev), use_table=False)
    # K steps inside one scale group; INT4 steps at least 32 deep (two nibble-plane dots of 16)
    least = 32 if quant.code in (INT4_SYM.value, INT4_ASYM.value) else 16
    return replace(cfg, gate_up=replace(cfg.gate_up, block_k=max(least, min(cfg.gate_up.block_k, quant.group_k))),
                   down=replace(cfg.down, block_k=max(least, min(cfg.down.block_k, quant.group_k))))


def hopper_args(cfg: MoeConfig, where: str = "config"):
    """Check a MoeConfig's Hopper options: tma and pdl bools, epilogue_block_n None or a power
    of two."""
    for field in ("tma", "pdl"):
        checks.flag(f"{where}.{field}", getattr(cfg, field))
    if cfg.epilogue_block_n is not None:
        checks.power_of_two(f"{where}.epilogue_block_n", cfg.epilogue_block_n, 1)


def config_args(cfg, quant: ExpertQuant | None = None):
    """Check a caller's MoeConfig (fused_moe's `config=`): tiles powers of two >= 16 (tl.dot's
    least shape), positive counts, and for quantized experts K steps inside one scale group."""
    if not isinstance(cfg, MoeConfig) or not all(isinstance(g, GemmConfig) for g in (cfg.gate_up, cfg.down)):
        raise TypeError(f"config must be a MoeConfig of two GemmConfigs, got {cfg!r}")
    checks.power_of_two("config.block_m", cfg.block_m)
    hopper_args(cfg)
    for name, g in (("gate_up", cfg.gate_up), ("down", cfg.down)):
        checks.power_of_two(f"config.{name}.block_n", g.block_n)
        checks.power_of_two(f"config.{name}.block_k", g.block_k)
        checks.power_of_two(f"config.{name}.num_warps", g.num_warps, 1)
        for field in ("group_m", "num_stages", "split_k"):
            checks.positive_int(f"config.{name}.{field}", getattr(g, field))
        if quant is not None:
            block_k_args(f"config.{name}.block_k", g.block_k, quant.code, quant.group_k)


def _launch(x, w13, w2, topk_weights, topk_ids, on_input: bool, out: torch.Tensor, cfg: MoeConfig,
            quant: ExpertQuant | None = None, preact: torch.Tensor | None = None,
            variant: ExpertVariant = ExpertVariant()):
    """Run fused_moe with an explicit config (validated inputs, T > 0)."""
    T, H = x.shape
    E, I = w13.shape[0], w13.shape[2] // 2
    top_k = topk_ids.shape[1]
    P = T * top_k
    ids = topk_ids.contiguous().view(-1)
    weights = topk_weights.contiguous().view(-1)
    direct = cfg.direct(P)
    if direct:
        sorted_pairs = expert_offsets = block_offsets = ids  # placeholders, never read
        num_pid_m = P
    else:
        meta = dispatch_metadata(topk_ids, E, cfg.block_m)
        sorted_pairs, expert_offsets, block_offsets = meta.sorted_pairs, meta.expert_offsets, meta.block_offsets
        num_pid_m = meta.max_blocks
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 in: true fp32 products, not tf32
    # BLOCK_B spans the E + 1 block offsets a program searches; one size for every E < 256
    # keeps Scout and Maverick on the same compiled kernels.
    common = dict(DIRECT=direct, DOT_PRECISION=precision, BLOCK_M=cfg.block_m,
                  BLOCK_B=max(256, triton.next_power_of_2(E + 1)))
    routing_args = (ids, weights, sorted_pairs, expert_offsets, block_offsets, P, E, num_pid_m)

    def quant_args(a, scale, zero):
        """Kernel arguments of a quantized GEMM: B's scales and zero points, A's scales (and
        the A operand itself, FP8-quantized where the format says)."""
        if quant is None:  # unused pointers and strides: the dense path never reads them
            return a, (a, 0, 0, 0, a, 0, 0, 0, a, 0, 0), {}
        a, a_scale = quant.quantize_activations(a)
        z = scale if zero is None else zero
        return a, (scale, *scale.stride(), z, *z.stride(), a_scale, *a_scale.stride()), \
            dict(WEIGHT_FORMAT=quant.code, GROUP_K=quant.group_k)

    # MoeConfig's Hopper options. tma: descriptors for the weights (interleaved gate/up columns
    # as one block twice as wide), and h in expert order so that each row block of the down
    # GEMM reads consecutive rows through one (in DIRECT, slot = pair already); each where
    # device.tensor_descriptor can (else pointer loads). pdl: where device.supports_pdl.
    g, d = cfg.gate_up, cfg.down
    h = torch.empty(P, I, dtype=x.dtype, device=x.device)
    pdl = dict(PDL=True, launch_pdl=True) if cfg.pdl and supports_pdl(x.device) else {}
    hopper1 = dict(EPILOGUE_SPLIT=cfg.epilogue_split(g), **pdl)
    hopper2 = dict(EPILOGUE_SPLIT=cfg.epilogue_split(d), **pdl)
    if cfg.tma:  # INT4 weights: packed rows, half as many per K step
        pack = 2 if quant is not None and not quant.fp8 else 1
        desc1, transposed1 = weight_descriptor(w13, g.block_k // pack, g.block_n * (2 if variant.interleaved else 1))
        desc2, transposed2 = weight_descriptor(w2, d.block_k // pack, d.block_n)
        hopper1.update(b_desc=desc1, B_TRANSPOSED=transposed1, C_BY_SLOT=True)
        hopper2.update(b_desc=desc2, B_TRANSPOSED=transposed2, A_BY_SLOT=True)

    # gate_up: x [T, H] @ w13[e] -> h [P, I]; split K: fp32 gate/up partials, then combine
    y1 = h if g.split_k == 1 else torch.empty(g.split_k, P, 2 * I, dtype=torch.float32, device=x.device)
    a1, q1, f1 = quant_args(x, *((quant.gate_up_scale, quant.gate_up_zero) if quant else (None, None)))
    if preact is not None:
        f1.update(preact_ptr=preact, stride_pm=preact.stride(0), stride_pn=preact.stride(1), STORE_PREACT=True)
    f1.update(variant.gate_up_kwargs(), **hopper1)
    grid = (num_pid_m * triton.cdiv(I, g.block_n), g.split_k)
    _moe_gemm_kernel[grid](
        a1, a1.stride(0), a1.stride(1),
        w13, w13.stride(0), w13.stride(1), w13.stride(2), *q1,
        y1, y1.stride(-2), y1.stride(-1), y1.stride(0) if g.split_k > 1 else 0,
        *routing_args, I, H, g.split_k,
        A_ROW_DIV=top_k, GATED=True, SCALE_C=on_input, C_PARTIAL=g.split_k > 1,
        BLOCK_N=g.block_n, BLOCK_K=g.block_k, GROUP_M=g.group_m,
        num_warps=g.num_warps, num_stages=g.num_stages, **common, **f1)
    if g.split_k > 1:
        combine_splits_kernel[(P, triton.cdiv(I, COMBINE_BLOCK_N))](
            y1, h, h.stride(0), h.stride(1), I, y1.stride(0), g.split_k,
            ROWS=1, SWIGLU=True, BLOCK_N=COMBINE_BLOCK_N, num_warps=4, **pdl)

    # down: h [P, I] @ w2[e] -> out[token] (top-1), or fp32 partials [S2, P, H] + combine
    partial = top_k > 1 or d.split_k > 1
    y2 = torch.empty(d.split_k, P, H, dtype=torch.float32, device=x.device) if partial else out
    a2, q2, f2 = quant_args(h, *((quant.down_scale, quant.down_zero) if quant else (None, None)))
    if cfg.tma:  # h, or its FP8 quantization, in expert order
        hopper2.update(a_desc=tensor_descriptor(a2, [cfg.block_m, d.block_k]))
    f2.update(variant.down_kwargs(), **hopper2)
    grid = (num_pid_m * triton.cdiv(H, d.block_n), d.split_k)
    _moe_gemm_kernel[grid](
        a2, a2.stride(0), a2.stride(1),
        w2, w2.stride(0), w2.stride(1), w2.stride(2), *q2,
        y2, y2.stride(-2), y2.stride(-1), y2.stride(0) if partial else 0,
        *routing_args, H, I, d.split_k,
        A_ROW_DIV=1, GATED=False, SCALE_C=not on_input, C_PARTIAL=partial,
        BLOCK_N=d.block_n, BLOCK_K=d.block_k, GROUP_M=d.group_m,
        num_warps=d.num_warps, num_stages=d.num_stages, **common, **f2)
    if partial:
        combine_splits_kernel[(T, triton.cdiv(H, COMBINE_BLOCK_N))](
            y2, out, out.stride(0), out.stride(1), H, y2.stride(0), d.split_k,
            ROWS=top_k, SWIGLU=False, BLOCK_N=COMBINE_BLOCK_N, num_warps=4, **pdl)
    return out


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------

def _wgrad_config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_P, BLOCK_K, BLOCK_N, num_warps, num_stages) of the weight-gradient GEMM. 16-bit:
    128 x 128 output tiles reducing 64 rows a step (a Hopper-sized tile; not measured on a GPU
    yet). float32 runs the exact dot, whose operands live in registers: small tiles."""
    if dtype == torch.float32:
        return 32, 32, 32, 4, 2
    return 64, 128, 128, 8, 3


def _weight_grad(a, a_row_div: int, b, b_row_div: int, meta, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 row_weights: torch.Tensor | None = None):
    """[E, KO, NO] like `weight` (its strides) = per expert, the sum over its pairs p of
    a[p // a_row_div]^T b[p // b_row_div]; with `bias` [E, NO], also its gradient like it: the
    sum of b's rows, each times row_weights[p] when given. -> (weight gradient, bias gradient)."""
    KO, NO = a.shape[1], b.shape[1]
    num_experts = weight.shape[0]
    c = torch.empty_like(weight)
    bias_kw = {}
    d_bias = None
    if bias is not None:
        d_bias = torch.empty_like(bias)
        bias_kw = dict(bias_grad_ptr=d_bias, stride_dbe=d_bias.stride(0), stride_dbn=d_bias.stride(1),
                       row_w_ptr=row_weights)
    block_p, block_k, block_n, warps, stages = _wgrad_config(a.dtype)
    grid = (triton.cdiv(KO, block_k) * triton.cdiv(NO, block_n), num_experts)
    _moe_wgrad_kernel[grid](
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), c, *c.stride(),
        meta.sorted_pairs, meta.expert_offsets, KO, NO,
        A_ROW_DIV=a_row_div, B_ROW_DIV=b_row_div,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_N=block_n, GROUP_M=8, num_warps=warps, num_stages=stages, **bias_kw)
    return c, d_bias


def fused_moe_backward(grad_out: torch.Tensor, hidden_states: torch.Tensor, gate_up_proj: torch.Tensor,
                       down_proj: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       preact: torch.Tensor, *, apply_router_weight_on_input: bool = True,
                       weight_grads: bool = True, gate_up_bias: torch.Tensor | None = None,
                       down_bias: torch.Tensor | None = None, activation: str = "silu",
                       gate_up_interleaved: bool = False, clamped_swiglu: tuple[float, float] | None = None,
                       skip_sentinel_ids: bool = False):
    """Gradients of `fused_moe` (16-bit or fp32 weights; quantized experts are dequantized by
    the caller, and their weights are frozen: weight_grads=False).

    grad_out [T, H] (any strides, e.g. an expanded scalar gradient); hidden_states, gate_up_proj,
    down_proj, topk_weights, topk_ids and the keyword options as given to the forward; preact
    [T * k, 2I] what the forward wrote into its `preact` argument.

    Returns (d_hidden_states [T, H], d_gate_up_proj [E, H, 2I] or None, d_down_proj [E, I, H] or
    None, d_topk_weights [T, k]), each in its input's dtype and the weight gradients with their
    weight's strides, every element written (an expert with no tokens gets zeros); when a bias
    is given, (d_gate_up_bias, d_down_bias) follow (None for an absent bias or without
    weight_grads). Four kernels, all over the forward's dispatch metadata:

    1. dH = dOut[token] @ down_proj[e]^T (the forward's GEMM with B read transposed through its
       strides), whose epilogue runs the gate's backward (_glu_backward) from the saved
       pre-activations and writes dA [P, 2I] (in gate_up_proj's column order), h [P, I] and the
       router-weight gradient's column-block partials (with a down bias, dOut . b2 joins them);
    2. dX = sum over a token's pairs of dA @ gate_up_proj[e]^T (the forward's down GEMM shape:
       direct rows for top-1, fp32 partials and the fixed-order combine for top-k);
    3. d_gate_up_proj[e] = x_e^T dA_e and 4. d_down_proj[e] = h_e^T dOut_e: `_moe_wgrad_kernel`,
       which also sums the bias gradients: d_gate_up_bias[e] = sum of dA_e's rows, d_down_bias[e]
       = sum of w_p dOut[token_p] over e's pairs.
    Deterministic: every sum has a fixed order, nothing is accumulated with atomics.
    """
    checks.moe_args(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, skip_sentinel_ids)
    checks.moe_variant_args(hidden_states, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
                            gate_up_interleaved, clamped_swiglu, apply_router_weight_on_input)
    variant = expert_variant(gate_up_bias, down_bias, activation, gate_up_interleaved, clamped_swiglu)
    has_bias = gate_up_bias is not None or down_bias is not None
    T, H = hidden_states.shape
    E, two_i = gate_up_proj.shape[0], gate_up_proj.shape[2]
    I = two_i // 2
    top_k = topk_ids.shape[1]
    P = T * top_k
    checks.tensor("grad_out", grad_out, ndim=2, dtypes=(hidden_states.dtype,))
    checks.tensor("preact", preact, ndim=2, dtypes=(hidden_states.dtype,))
    if tuple(grad_out.shape) != (T, H):
        raise ValueError(f"grad_out must be [T={T}, H={H}], got {tuple(grad_out.shape)}")
    if tuple(preact.shape) != (P, two_i):
        raise ValueError(f"preact must be [T * top_k={P}, 2I={two_i}], got {tuple(preact.shape)}")
    checks.same_device(hidden_states=hidden_states, grad_out=grad_out, preact=preact)
    checks.kernel_device("hidden_states", hidden_states, "fused_moe_backward", checks.INTERPRETER_BF16_DOT)
    x = hidden_states
    dev = x.device
    d_x = torch.empty(T, H, dtype=x.dtype, device=dev)
    d_w = torch.zeros(T, top_k, dtype=topk_weights.dtype, device=dev)

    def result(d13, d2, d_b13=None, d_b2=None):
        return (d_x, d13, d2, d_w) + ((d_b13, d_b2) if has_bias else ())

    if T == 0:
        zeros = [torch.zeros_like(t) if weight_grads and t is not None else None
                 for t in (gate_up_proj, down_proj, gate_up_bias, down_bias)]
        return result(*zeros)

    # The forward's tiles for these shapes (block_m, both GEMMs' N/K tiles); no split K: the
    # SwiGLU backward needs the whole K sum, and training batches fill the GPU anyway.
    cfg = select_config(T, top_k, E, H, I, x.dtype, num_sms=num_sms(dev), use_table=False)
    cfg = replace(cfg, block_m=max(16, min(cfg.block_m, 128)))
    meta = dispatch_metadata(topk_ids, E, cfg.block_m)
    ids = topk_ids.contiguous().view(-1)
    weights = topk_weights.contiguous().view(-1)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    common = dict(DIRECT=False, DOT_PRECISION=precision, BLOCK_M=cfg.block_m,
                  BLOCK_B=max(256, triton.next_power_of_2(E + 1)))
    routing_args = (ids, weights, meta.sorted_pairs, meta.expert_offsets, meta.block_offsets, P, E, meta.max_blocks)
    unused_quant = (x, 0, 0, 0, x, 0, 0, 0, x, 0, 0)

    # 1. dH = dOut @ down^T [P, I] -> dA [P, 2I], h [P, I], router-weight partials
    g = cfg.gate_up
    d_a = torch.empty(P, two_i, dtype=x.dtype, device=dev)
    h = torch.empty(P, I, dtype=x.dtype, device=dev)
    n_blocks = triton.cdiv(I, g.block_n)
    d_w_parts = torch.empty(P, n_blocks, dtype=torch.float32, device=dev)
    _moe_gemm_kernel[(meta.max_blocks * n_blocks, 1)](
        grad_out, grad_out.stride(0), grad_out.stride(1),
        down_proj, down_proj.stride(0), down_proj.stride(2), down_proj.stride(1), *unused_quant,
        d_a, d_a.stride(0), d_a.stride(1), 0,
        *routing_args, I, H, 1,
        A_ROW_DIV=top_k, GATED=False, SCALE_C=False, C_PARTIAL=False,
        BLOCK_N=g.block_n, BLOCK_K=g.block_k, GROUP_M=g.group_m, num_warps=g.num_warps, num_stages=g.num_stages,
        preact_ptr=preact, stride_pm=preact.stride(0), stride_pn=preact.stride(1),
        h_ptr=h, stride_hm=h.stride(0), stride_hn=h.stride(1), dw_ptr=d_w_parts, stride_dwm=d_w_parts.stride(0),
        SWIGLU_BWD=True, ON_INPUT=apply_router_weight_on_input, **common, **variant.gate_up_kwargs(),
        **({} if down_bias is None else dict(a_bias_ptr=down_bias, stride_abe=down_bias.stride(0),
                                             stride_abk=down_bias.stride(1))))
    d_w.copy_(d_w_parts.sum(dim=1).view(T, top_k))

    # 2. dX = sum over a token's pairs of dA @ gate_up^T: the forward's down GEMM, K = 2I
    d = cfg.down
    partial = top_k > 1
    y = torch.empty(P, H, dtype=torch.float32, device=dev) if partial else d_x
    _moe_gemm_kernel[(meta.max_blocks * triton.cdiv(H, d.block_n), 1)](
        d_a, d_a.stride(0), d_a.stride(1),
        gate_up_proj, gate_up_proj.stride(0), gate_up_proj.stride(2), gate_up_proj.stride(1), *unused_quant,
        y, y.stride(0), y.stride(1), 0,
        *routing_args, H, two_i, 1,
        A_ROW_DIV=1, GATED=False, SCALE_C=False, C_PARTIAL=partial,
        BLOCK_N=d.block_n, BLOCK_K=d.block_k, GROUP_M=d.group_m, num_warps=d.num_warps, num_stages=d.num_stages,
        **common)
    if partial:
        combine_splits_kernel[(T, triton.cdiv(H, COMBINE_BLOCK_N))](
            y, d_x, d_x.stride(0), d_x.stride(1), H, y.stride(0), 1,
            ROWS=top_k, SWIGLU=False, BLOCK_N=COMBINE_BLOCK_N, num_warps=4)
    if not weight_grads:
        return result(None, None)

    # 3-4. the weight (and bias) gradients, reduced over each expert's pairs
    d13, d_b13 = _weight_grad(x, top_k, d_a, 1, meta, gate_up_proj, gate_up_bias)
    d2, d_b2 = _weight_grad(h, 1, grad_out, top_k, meta, down_proj, down_bias, row_weights=weights)
    return result(d13, d2, d_b13, d_b2)
