"""Chunked causal flash attention (Llama 4) in Triton: prefill and decode in one kernel.

Public entry points
-------------------
``chunked_attention(q, k, v, *, chunk_size=None, scale=None, kv_start=0, kv_len=None, out=None, lse=None)``
    q [B, Hq, Sq, D]; k, v [B, Hkv, Skv, D]; float16 / bfloat16 / float32, one dtype for all.
    Returns [B, Hq, Sq, D] in q's dtype (written into ``out`` when given). Any strides are
    accepted (transformers hands over [B, S, H, D] storage transposed to [B, H, S, D]), so
    no copy is made. Semantics are those of ``llama4_fast.ops.attention``: key j sits at
    position ``kv_start + j`` (kv_start an int or an int32/int64 tensor [B]); the queries are
    the last Sq positions; a query at position p sees keys at positions s with
    ``0 <= s <= p`` and, when chunk_size=C, ``s // C == p // C``. Query h reads KV head
    ``h // (Hq // Hkv)`` (GQA, K/V never repeated). A query that sees no key (a padding row
    at a negative position) returns zeros. scale defaults to D ** -0.5. ``kv_len`` (an int
    tensor [B]) makes only the first kv_len[b] keys of sequence b exist: a static KV-cache
    buffer is passed whole and the valid length stays on the device (CUDA-graph decode).
    ``lse`` (a float32 [B, Hq, Sq] tensor) also receives each row's base-2 log-sum-exp.
``chunked_attention_backward(do, q, k, v, out, lse, *, chunk_size=None, scale=None, kv_start=0)``
    Returns (dq, dk, dv) shaped and typed as q, k, v: the gradients of chunked_attention (no
    kv_len) from dO, the forward's out and its lse.
``supports_head_dim(d) -> bool``
    Any head dim 1..256; non-powers of two run in a padded tile with masked loads.
``forward_variant(*, tma=False, block_n=None)``
    Context manager: inside it, 16-bit prefill launches load K/V tiles through TMA tensor
    descriptors (where ``device.tma_unavailable`` finds no obstacle) and / or take ``block_n``-key
    tiles. Unmeasured variants, off by default, for a GPU benchmark to compare.

Design
------
One kernel, ``_attn_fwd``, handles both phases. A program owns BLOCK_M query *rows* of one
(batch, head group) and walks the key tiles those rows can see:

* Rows. Row r of a head group stands for query ``r // PACK`` of query head
  ``group_start + r % PACK``. Prefill uses PACK = 1 (a row is a query, the usual
  FlashAttention-2 tiling, one program per query head). Decode (Sq <= DECODE_MAX_Q) packs the
  whole GQA group (PACK = Hq // Hkv = 5 for Llama 4) into the rows, so each K/V tile is loaded
  once per KV head instead of once per query head, and the 5 x Sq rows fill an MMA tile.
* Loop bounds. With ``off = Skv - Sq`` a row with query index i sees key indices
  ``[lo(i), i + off]`` where lo(i) is the start of its chunk (or of the first non-negative
  position), in key-index space. Both ends grow with i, so the block's key range is
  ``[lo(first row), last row + off]``: key tiles wholly before the first row's chunk or past
  the diagonal are never loaded (FlashAttention-3 treats Llama 4's chunking the same way).
  Keys every row sees are ``[lo(last row), first row + off]``; tiles inside that interval run
  without any mask (the bulk of the work), and only the tiles straddling the chunk start /
  padding (phase 1) or the diagonal / the sequence end (phase 3) build the boolean mask.
  Tiles are anchored at the block's first key, so every phase boundary is a tile boundary.
* Split-KV (flash-decoding). When (batch x heads x query blocks) programs cannot fill the GPU,
  the key range of each block is cut into ``num_splits`` contiguous runs of tiles along grid
  axis 2. Each split writes its normalised partial output and log-sum-exp (base 2) to an fp32
  workspace; ``_merge_splits`` combines them with the usual max-shifted weights. Splits that
  get no tiles (a short chunk, left padding) write lse = -inf and weigh nothing.
* Softmax. Online softmax in fp32 with exp2 and ``scale * log2(e)`` folded into one multiply.
  Masked entries are -inf; a row whose running max is still -inf uses 0 as its shift, so
  exp2(-inf) = 0 and it accumulates nothing. A row that sees no key returns zeros.
* NaN and inf. A query row is NaN (or inf) when softmax math makes it so: a NaN / inf in its
  q, a NaN score, a +inf score, a non-finite v of a key it sees; a row whose every visible
  score is -inf (infinite q or k) is 0/0 = NaN. -inf scores among finite ones weigh 0. k is
  masked before the softmax, so a non-finite k never reaches a query that does not see the
  key. Deliberate difference from the per-row math: a non-finite v of a key a query does NOT
  see still reaches it when the key lies in a key tile its row block reads (p = 0, and
  0 x NaN = NaN in the tile's dot): a future key of the same block, or a key of the previous
  chunk at a chunk boundary. A block reads only keys some row of it sees, so keys at negative
  positions, past kv_len or before the block's first chunk never matter, and rows that see no
  key stay zeros. The torch backend has the same property for its 512-query blocks.
* Addressing. Batch/head/row offsets are int64 (a 1M-token prefill has 1M x 40 heads x 128
  = 5.2e9 query elements); offsets inside one tile stay int32, and K/V tiles advance a scalar
  base pointer, so the per-element address math is loop-invariant int32.

Backward
--------
FlashAttention-2's split into three kernels, with P rebuilt from the forward's log-sum-exp
instead of stored (O(S) memory, not O(S^2)):

* LSE in base 2. The forward's running max and sum are already in log2 units (exp2 with the
  scale folded in), so ``m + log2(l)`` is what it has at hand, and the backward's
  ``P = 2^(s * scale * log2(e) - lse)`` is one multiply, one subtract and one exp2. A row that
  sees no key stores -inf, and every kernel selects it to p = 0. Asked for lse, the forward
  runs unsplit: splitting serves decode, training prefill fills the GPU without it.
* ``_attn_bwd_preprocess``: delta = rowsum(dO * O), the softmax backward's row term, once per
  row instead of once per key tile of every dK/dV program.
* ``_attn_bwd_dkdv`` owns a key block and walks the queries, ``_attn_bwd_dq`` owns a query
  block and walks the keys: each gradient has one writer and is accumulated in registers, so
  there are no atomics and the result is deterministic. GQA works the same way: the dK/dV
  program of a KV head loops over its whole query-head group, so K/V are neither repeated
  nor their gradients reduced afterwards.
* Bounds. dQ walks exactly the forward's key tiles (``_block_key_range``, the same phases).
  dK/dV's queries mirror them: a key is seen from its own position to the end of its chunk,
  so a key block needs queries from its first (non-padding) key's position to the end of the
  chunk holding its last key; with C = 8192 a block reads one chunk of queries, not the rest
  of the sequence. Its tiles are all masked, in one flat (head, query tile) loop: on sm_90 a
  nested loop or a separate unmasked loop makes ptxas spill the two fp32 accumulators, and
  the mask costs two integer compares per element, against four dots.

Launch configs come from a fixed table (``_launch_config``) chosen for H100 and checked with
ptxas for sm_90, head dims 16..256: the 16-bit configs do not spill on triton 3.6 or 3.9 (the
fp32 path keeps an 8-byte stack on 3.6). There is no autotuning, so a first call compiles one
kernel variant (plus the merge kernel when it splits). ``forward_variant`` swaps in the
unmeasured TMA / 128-key-tile variants of the 16-bit prefill config, as the same kernel
(``KV_TMA`` constexpr): with TMA, the copy engine zero-fills what the pointer masks zero, and
masked tiles zero the values past the block's last key, so the results match. The
backward's table (``_bwd_launch_config``) is taken from the Triton tutorial and only checked
for spills, not measured.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import checks
from .device import sm_count, tensor_descriptor, tma_unavailable

# Decode path threshold: up to this many new tokens per sequence the GQA group is packed into
# the query rows (Llama 4: 5 heads x 16 queries = 80 rows, one block), so each K/V tile is read
# once per KV head. Past it, one head per program with up to 128 queries a block (the prefill
# layout) reads K/V once per query head but keeps the MMA full, and the work is compute-bound.
DECODE_MAX_Q = 16
# Split-KV only when the programs fall short of the GPU's program slots (_PROGRAMS_PER_SM per
# SM: the decode config's ~176 registers x 128 threads fit twice), and never into runs shorter
# than _MIN_KEYS_PER_SPLIT keys (the partial write + merge then outweigh the extra parallelism).
_PROGRAMS_PER_SM = 2
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64
# Without a GPU (interpreter), plan splits as if for a small device so the split path is used.
_INTERPRETER_SMS = 16
_MAX_GRID_Y = 65535
_LOG2E = 1.4426950408889634


def supports_head_dim(d: int) -> bool:
    """Head dims the kernel runs: 1..256 (padded to a power-of-two tile of at least 16)."""
    return isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 256


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_2d(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a [rows, cols] tile, masking only the dimensions that may run out of bounds
    (out-of-bounds elements read as 0, so they add nothing to a dot product)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _row_offsets(rows, b, hp, stride_b, stride_h, stride_m, PACK: tl.constexpr):
    """int64 element offsets of the [BLOCK_M] rows of head group `hp` in batch `b`:
    row r is query r // PACK of head hp * PACK + r % PACK."""
    qi = rows // PACK
    head = hp * PACK + rows % PACK
    return b.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h + qi.to(tl.int64) * stride_m


@triton.jit
def _first_visible_key(own_key, kv_start, chunk_size, CHUNKED: tl.constexpr):
    """Key index of the first key visible to the query at key index `own_key` (position
    kv_start + own_key): its chunk's start, and never a negative (padding) position.
    Works on scalars and vectors; may be negative (clamp it when looping)."""
    if CHUNKED:
        # Clamped so the (truncating) integer division floors; a query at a negative position
        # sees nothing whatever this returns, since its own key is already padding.
        pos = tl.maximum(kv_start + own_key, 0)
        first_pos = (pos // chunk_size) * chunk_size
    else:
        first_pos = tl.zeros_like(own_key)
    return first_pos - kv_start


@triton.jit
def _block_key_range(first_hi, last_hi, kv_start, chunk_size, BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr):
    """Key tiles a block of query rows reads, given the own key index of its first and last
    real rows: all of [lo, hi), of which the whole tiles in [mid_lo, mid_hi) (tiles anchored at
    lo) need no mask; mid_lo = mid_hi = hi when every tile is masked."""
    lo = tl.maximum(_first_visible_key(first_hi, kv_start, chunk_size, CHUNKED), 0)
    hi = last_hi + 1
    # Keys every row sees: [full_lo, full_hi). Phase 2 runs over the whole tiles inside it.
    full_lo = tl.maximum(_first_visible_key(last_hi, kv_start, chunk_size, CHUNKED), lo)
    full_hi = first_hi + 1
    if full_hi > full_lo:
        mid_lo = lo + tl.cdiv(full_lo - lo, BLOCK_N) * BLOCK_N
        mid_hi = mid_lo + (tl.maximum(full_hi - mid_lo, 0) // BLOCK_N) * BLOCK_N
        mid_lo = tl.minimum(mid_lo, hi)
        mid_hi = tl.minimum(mid_hi, hi)
    else:
        mid_lo = hi
        mid_hi = hi
    return lo, hi, mid_lo, mid_hi


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn, b, kv_head,
                  start, end, offs_n, d_ok, row_lo, row_hi, key_end, qk_scale,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, MASK_D: tl.constexpr,
                  KV_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over key tiles [start, end) step BLOCK_N.

    Pointer loads (KV_TMA False): k_base / v_base point at key 0 of this (batch b, KV head);
    k_offs / v_offs are the int32 offsets inside one [BLOCK_N, BLOCK_D] tile. TMA loads
    (KV_TMA): k_base / v_base are [B, Hkv, Skv, D] tensor descriptors with [1, 1, BLOCK_N,
    BLOCK_D] blocks, addressed by (b, kv_head, key, 0); the copy engine fills keys past Skv and
    columns past D with zeros, as the pointer path's masks do. MASKED tiles apply the per-row
    visible interval [row_lo, row_hi] (key indices) and read no key at or past key_end (the
    block's key range end, so no key that no row of the block sees; TMA loads the whole tile,
    so its v rows there are zeroed: a NaN in them would otherwise reach the rows through
    p = 0); unmasked tiles trust the caller that every row sees every key of the tile.
    """
    if not KV_TMA:
        k_ptr = k_base + start.to(tl.int64) * stride_kn
        v_ptr = v_base + start.to(tl.int64) * stride_vn
    for n0 in range(start, end, BLOCK_N):
        if MASKED:
            keys = n0 + offs_n
        if KV_TMA:
            # Keys past key_end need no zeroing here: their scores are masked to -inf below.
            k = k_base.load([b, kv_head, n0, 0]).reshape(BLOCK_N, BLOCK_D)
        elif MASKED:
            k = _load_2d(k_ptr + k_offs, keys < key_end, d_ok, True, MASK_D)
        else:  # the whole tile is in bounds (row_ok is unused)
            k = _load_2d(k_ptr + k_offs, offs_n, d_ok, False, MASK_D)
        # [BLOCK_M, BLOCK_N] scores in fp32, already in log2 units.
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        if MASKED:
            visible = (keys[None, :] >= row_lo[:, None]) & (keys[None, :] <= row_hi[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        # tl.max and tl.maximum drop NaN: a NaN score still turns its p (below) and the row NaN.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row whose scores so far are all -inf (no key seen yet, or -inf scores from infinite
        # q / k, in any tile) keeps m = -inf; shift it by 0 instead so that exp2(-inf - -inf)
        # never produces NaN: such keys weigh 0, as in softmax.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_TMA:
            v = v_base.load([b, kv_head, n0, 0]).reshape(BLOCK_N, BLOCK_D)
            if MASKED:
                v = tl.where((keys < key_end)[:, None], v, 0.0)
        elif MASKED:
            v = _load_2d(v_ptr + v_offs, keys < key_end, d_ok, True, MASK_D)
        else:
            v = _load_2d(v_ptr + v_offs, offs_n, d_ok, False, MASK_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
        if not KV_TMA:
            k_ptr += BLOCK_N * stride_kn
            v_ptr += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["kv_start_int", "seq_q", "seq_kv"])
def _attn_fwd(
    Q, K, V, Out, PartialO, PartialLSE, KVStart, KVLen,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    kv_start_int, seq_q, seq_kv, head_groups, chunk_size, qk_scale,
    GROUP: tl.constexpr,          # query heads per KV head (Hq // Hkv)
    PACK: tl.constexpr,           # query heads packed into one program's rows: 1 or GROUP
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,        # next power of two >= max(HEAD_DIM, 16)
    CHUNKED: tl.constexpr,        # chunk_size is set (Llama 4 RoPE layers)
    KV_START_TENSOR: tl.constexpr,  # kv_start is a [B] tensor (else the scalar kv_start_int)
    KV_LEN_TENSOR: tl.constexpr,  # sequence b has KVLen[b] <= seq_kv keys (else seq_kv)
    SPLIT: tl.constexpr,          # write partials for _merge_splits instead of Out
    STORE_LSE: tl.constexpr,      # (not SPLIT) also write each row's log2-sum-exp2 to PartialLSE
    KV_TMA: tl.constexpr,         # K, V are [B, Hkv, Skv, D] tensor descriptors (TMA), not pointers
    INPUT_PRECISION: tl.constexpr,
):
    """Grid: (row blocks, B * head_groups, num_splits). Row blocks run in reverse so that the
    longest causal blocks start first and the short ones fill the tail of the wave. With KV_TMA
    the K/V strides are unused (the descriptors hold them)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    b = pid_bh // head_groups
    hp = pid_bh % head_groups
    kv_head = (hp * PACK) // GROUP  # PACK divides GROUP: all packed heads share one KV head

    if KV_START_TENSOR:
        kv_start = tl.load(KVStart + b).to(tl.int32)
    else:
        kv_start = kv_start_int
    if KV_LEN_TENSOR:
        seq_kv = tl.load(KVLen + b).to(tl.int32)
    off = seq_kv - seq_q  # key index of query 0's own position
    total_rows = seq_q * PACK

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < total_rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D  # padded head dim: mask the extra columns

    # Per-row visible key interval [row_lo, row_hi] (key indices), for the masked tiles.
    row_hi = rows // PACK + off
    row_lo = _first_visible_key(row_hi, kv_start, chunk_size, CHUNKED)

    # Block key range from its first and last real rows; both interval ends grow with the row.
    first_hi = (pid_m * BLOCK_M) // PACK + off
    last_hi = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, total_rows) - 1) // PACK + off
    lo, hi, mid_lo, mid_hi = _block_key_range(first_hi, last_hi, kv_start, chunk_size, BLOCK_N, CHUNKED)
    # This split's run of tiles; empty when the block has fewer tiles than splits.
    tiles_per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), num_splits)
    s_lo = lo + split * tiles_per_split * BLOCK_N
    s_hi = tl.minimum(s_lo + tiles_per_split * BLOCK_N, hi)

    q_rows = _row_offsets(rows, b, hp, stride_qb, stride_qh, stride_qm, PACK)
    q = _load_2d(Q + q_rows[:, None] + offs_d[None, :] * stride_qd, row_ok, d_ok, True, MASK_D)

    if KV_TMA:  # tiles are addressed by coordinates (b, kv_head, key, 0)
        k_base = K
        v_base = V
    else:
        k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Phase 1: tiles before the keys every row sees (chunk start / padding straddles).
    p1_hi = tl.minimum(mid_lo, s_hi)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn, b, kv_head,
        s_lo, p1_hi, offs_n, d_ok, row_lo, row_hi, hi, qk_scale,
        BLOCK_N, BLOCK_D, True, MASK_D, KV_TMA, INPUT_PRECISION)
    # Phase 2: the unmasked bulk.
    p2_lo = tl.maximum(mid_lo, s_lo)
    p2_hi = tl.minimum(mid_hi, s_hi)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn, b, kv_head,
        p2_lo, p2_hi, offs_n, d_ok, row_lo, row_hi, hi, qk_scale,
        BLOCK_N, BLOCK_D, False, MASK_D, KV_TMA, INPUT_PRECISION)
    # Phase 3: the diagonal and the sequence end.
    p3_lo = tl.maximum(mid_hi, s_lo)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn, b, kv_head,
        p3_lo, s_hi, offs_n, d_ok, row_lo, row_hi, hi, qk_scale,
        BLOCK_N, BLOCK_D, True, MASK_D, KV_TMA, INPUT_PRECISION)

    # Rows that see no key of this split's range come out as zeros (weight nothing in the merge),
    # whatever the tiles held (0 x NaN in v is NaN). A row that does see keys divides by l > 0,
    # or by l = 0 when every score it saw was -inf (only from infinite q or k): NaN, as softmax.
    sees = tl.maximum(row_lo, s_lo) <= tl.minimum(row_hi, s_hi - 1)
    l_rows = tl.where(sees, l_i, 1.0)  # rows that see nothing: 0 / 1, not 0 / 0
    o = tl.where(sees[:, None], acc / l_rows[:, None], 0.0)
    if SPLIT:
        # Workspace [B * head_groups, num_splits, rows_padded, BLOCK_D], fully written.
        rows_padded = tl.num_programs(0) * BLOCK_M
        ws_row = (pid_bh.to(tl.int64) * num_splits + split) * rows_padded + rows
        tl.store(PartialO + ws_row[:, None] * BLOCK_D + offs_d[None, :], o)
        tl.store(PartialLSE + ws_row, tl.where(sees, m_i + tl.log2(l_rows), float("-inf")))
    else:
        o_rows = _row_offsets(rows, b, hp, stride_ob, stride_oh, stride_om, PACK)
        o_ptrs = Out + o_rows[:, None] + offs_d[None, :] * stride_od
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        if STORE_LSE:  # PartialLSE is then the caller's [B, Hq, Sq] contiguous float32 lse
            lse_rows = _row_offsets(rows, b, hp, seq_q.to(tl.int64) * (head_groups * PACK), seq_q, 1, PACK)
            tl.store(PartialLSE + lse_rows, tl.where(sees, m_i + tl.log2(l_rows), float("-inf")), mask=row_ok)


@triton.jit
def _merge_splits(
    PartialO, PartialLSE, Out,
    stride_ob, stride_oh, stride_om, stride_od,
    head_groups, num_splits, rows_padded,
    PACK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr,         # next power of two >= num_splits
    BLOCK_D: tl.constexpr,
):
    """Combine the split partials of one row: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)
    with M = max_s lse_s. Grid: (rows, B * head_groups); the workspace rows are those of
    _attn_fwd, padded to rows_padded. All splits of the row are loaded in one [SPLITS, D] tile,
    so the merge pays one memory latency, not one per split (decode at batch 1 has few rows
    and up to 64 splits).

    A split with lse = -inf counted no key: it saw none (o = 0) or only -inf scores (o = 0/0 =
    NaN). It weighs exactly nothing, NaN included; only when no split counted a key is the row
    sum(o) * 0: zeros for a row that sees no key, NaN (as softmax) for one whose every visible
    score is -inf."""
    row = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // head_groups
    hp = pid_bh % head_groups
    s = tl.arange(0, SPLITS)
    s_ok = s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    ws_row = (pid_bh.to(tl.int64) * num_splits + s) * rows_padded + row
    lse = tl.load(PartialLSE + ws_row, mask=s_ok, other=float("-inf"))
    o = tl.load(PartialO + ws_row[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # a row no split saw: all weights 0
    w_sum = tl.sum(w, 0)
    counted = tl.sum(tl.where((lse == float("-inf"))[:, None], 0.0, w[:, None] * o), 0)
    out = tl.where(w_sum > 0.0, counted / tl.where(w_sum > 0.0, w_sum, 1.0), tl.sum(o, 0) * 0.0)
    o_row = b.to(tl.int64) * stride_ob + (hp * PACK + row % PACK).to(tl.int64) * stride_oh \
        + (row // PACK).to(tl.int64) * stride_om
    tl.store(Out + o_row + offs_d * stride_od, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


# --------------------------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_kv_start(KVStart, b, kv_start_int, KV_START_TENSOR: tl.constexpr):
    """Position of key 0 of sequence b: KVStart[b] (a [B] tensor), else the scalar."""
    if KV_START_TENSOR:
        return tl.load(KVStart + b).to(tl.int32)
    else:
        return kv_start_int


@triton.jit
def _chunk_end(key, kv_start, chunk_size, seq_kv, CHUNKED: tl.constexpr):
    """One past the last key index of the chunk holding key index `key` (at a position >= 0),
    clipped to seq_kv: only queries whose own key index is below it can see the key."""
    if CHUNKED:
        pos = tl.maximum(kv_start + key, 0)
        # key + (C - pos % C) can pass 2**31 for a huge C: clip before adding
        end = key + tl.minimum(chunk_size - pos % chunk_size, seq_kv - key)
    else:
        end = seq_kv + 0 * key
    return end


@triton.jit
def _attn_bwd_preprocess(
    O, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    heads, seq_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32 (= sum_j P_ij dP_ij, the
    softmax backward's row term). Grid: (row blocks, B * Hq); Delta is [B, Hq, Sq] contiguous."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    o_rows = _row_offsets(rows, b, h, stride_ob, stride_oh, stride_om, 1)
    do_rows = _row_offsets(rows, b, h, stride_dob, stride_doh, stride_dom, 1)
    o = _load_2d(O + o_rows[:, None] + offs_d[None, :] * stride_od, row_ok, d_ok, True, MASK_D)
    do = _load_2d(DO + do_rows[:, None] + offs_d[None, :] * stride_dod, row_ok, d_ok, True, MASK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_q + rows, delta, mask=row_ok)


@triton.jit(do_not_specialize=["kv_start_int", "seq_q", "seq_kv"])
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, Delta, DK, DV, KVStart,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    kv_start_int, seq_q, seq_kv, kv_heads, chunk_size, qk_scale, scale,
    GROUP: tl.constexpr,          # query heads per KV head, all summed here
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,        # query tile
    BLOCK_N: tl.constexpr,        # keys owned by one program
    BLOCK_D: tl.constexpr,
    CHUNKED: tl.constexpr,
    KV_START_TENSOR: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dK, dV of BLOCK_N keys of one (batch, KV head), P^T rebuilt from the saved log2-sum-exp2:

        P^T = 2^(K Q^T * qk_scale - lse),  dV = sum_h P^T dO,  dK = scale * sum_h (P^T * (V dO^T - delta)) Q

    summed over the GROUP query heads h of the KV head in registers: K/V are never repeated and
    no atomics run. Grid: (key blocks, B * Hkv). The queries that can see the block run from
    the own position of its first (non-padding) key to the end of the chunk holding its last
    key; one loop walks those query tiles for every head of the group."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads
    kv_start = _load_kv_start(KVStart, b, kv_start_int, KV_START_TENSOR)
    off = seq_kv - seq_q  # key index of query 0's own position

    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < seq_kv
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D

    # Key j reaches the queries whose own key index lies in [j, key_end[j]): up to the end of
    # its chunk (never past seq_kv, so queries past seq_q drop out too); none for padding keys.
    key_end = tl.where(kv_start + keys >= 0, _chunk_end(keys, kv_start, chunk_size, seq_kv, CHUNKED), keys)
    # Queries (by index) that see some key of the block: [q_lo, q_hi).
    n_first = tl.maximum(pid_n * BLOCK_N, -kv_start)  # first key at a position >= 0
    n_last = tl.minimum(pid_n * BLOCK_N + BLOCK_N, seq_kv) - 1
    q_lo = tl.maximum(n_first - off, 0)
    q_hi = _chunk_end(n_last, kv_start, chunk_size, seq_kv, CHUNKED) - off
    m_tiles = tl.where(n_first <= n_last, tl.cdiv(tl.maximum(q_hi - q_lo, 0), BLOCK_M), 0)

    k_rows = b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + keys.to(tl.int64) * stride_kn
    v_rows = b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + keys.to(tl.int64) * stride_vn
    k = _load_2d(K + k_rows[:, None] + offs_d[None, :] * stride_kd, key_ok, d_ok, True, MASK_D)
    v = _load_2d(V + v_rows[:, None] + offs_d[None, :] * stride_vd, key_ok, d_ok, True, MASK_D)
    q_offs = offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_offs = offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # One flat loop over (head, query tile), every tile masked: ptxas (sm_90) spills the
    # accumulators when a head loop nests the query loop, or when the tiles every query sees
    # get an unmasked loop of their own (the dQ kernel's phases); the mask is two compares.
    for t in range(0, GROUP * m_tiles):
        head = kv_head * GROUP + t // m_tiles
        m0 = q_lo + (t % m_tiles) * BLOCK_M
        rows = m0 + offs_m
        row_ok = rows < seq_q
        q_row0 = b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qm
        do_row0 = b.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh + m0.to(tl.int64) * stride_dom
        lse_row0 = (b.to(tl.int64) * (kv_heads * GROUP) + head) * seq_q + m0  # LSE and Delta: [B, Hq, Sq]
        q = _load_2d(Q + q_row0 + q_offs, row_ok, d_ok, True, MASK_D)
        do = _load_2d(DO + do_row0 + do_offs, row_ok, d_ok, True, MASK_D)
        lse = tl.load(LSE + lse_row0 + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + lse_row0 + offs_m, mask=row_ok, other=0.0)
        # [BLOCK_N, BLOCK_M]: keys along the rows, so dK and dV need no transposed result.
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale - lse[None, :])
        own = rows + off
        visible = (own[None, :] >= keys[:, None]) & (own[None, :] < key_end[:, None])
        p_t = tl.where(visible, p_t, 0.0)  # also turns 2^(s + inf) of a row with lse = -inf into 0
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = tl.where(visible, p_t * (dp_t - delta[None, :]), 0.0)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)

    out_ok = key_ok[:, None] & d_ok[None, :]
    dk_rows = b.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh + keys.to(tl.int64) * stride_dkn
    dv_rows = b.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh + keys.to(tl.int64) * stride_dvn
    tl.store(DK + dk_rows[:, None] + offs_d[None, :] * stride_dkd, (dk * scale).to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + dv_rows[:, None] + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, k_offs, v_offs, stride_kn, stride_vn,
              start, end, offs_n, d_ok, row_lo, row_hi, key_end, qk_scale,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, MASK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Add to dq [BLOCK_M, BLOCK_D] (fp32) the key tiles [start, end), as _attend_tiles walks them:

        P = 2^(Q K^T * qk_scale - lse),  dS = P * (dO V^T - delta),  dQ += dS K

    (dQ still lacks the softmax scale). Masking as in _attend_tiles."""
    for n0 in range(start, end, BLOCK_N):
        if MASKED:
            keys = n0 + offs_n
            k = _load_2d(k_ptr + k_offs, keys < key_end, d_ok, True, MASK_D)
            v = _load_2d(v_ptr + v_offs, keys < key_end, d_ok, True, MASK_D)
        else:
            k = _load_2d(k_ptr + k_offs, offs_n, d_ok, False, MASK_D)
            v = _load_2d(v_ptr + v_offs, offs_n, d_ok, False, MASK_D)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        if MASKED:  # a select: a NaN dp of a key the row does not see never reaches dq
            visible = (keys[None, :] >= row_lo[:, None]) & (keys[None, :] <= row_hi[:, None])
            ds = tl.where(visible, ds, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
        k_ptr += BLOCK_N * stride_kn
        v_ptr += BLOCK_N * stride_vn
    return dq


@triton.jit(do_not_specialize=["kv_start_int", "seq_q", "seq_kv"])
def _attn_bwd_dq(
    Q, K, V, DO, LSE, Delta, DQ, KVStart,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    kv_start_int, seq_q, seq_kv, heads, chunk_size, qk_scale, scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,        # queries owned by one program
    BLOCK_N: tl.constexpr,        # key tile
    BLOCK_D: tl.constexpr,
    CHUNKED: tl.constexpr,
    KV_START_TENSOR: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dQ = scale * dS K of BLOCK_M queries of one (batch, query head), over the key tiles the
    forward's prefill layout reads (same bounds and phases). Grid: (query blocks, B * Hq),
    blocks in reverse as in _attn_fwd."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    kv_head = h // GROUP
    kv_start = _load_kv_start(KVStart, b, kv_start_int, KV_START_TENSOR)
    off = seq_kv - seq_q

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D

    row_hi = rows + off
    row_lo = _first_visible_key(row_hi, kv_start, chunk_size, CHUNKED)
    first_hi = pid_m * BLOCK_M + off
    last_hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, seq_q) - 1 + off
    lo, hi, mid_lo, mid_hi = _block_key_range(first_hi, last_hi, kv_start, chunk_size, BLOCK_N, CHUNKED)

    q_rows = _row_offsets(rows, b, h, stride_qb, stride_qh, stride_qm, 1)
    do_rows = _row_offsets(rows, b, h, stride_dob, stride_doh, stride_dom, 1)
    q = _load_2d(Q + q_rows[:, None] + offs_d[None, :] * stride_qd, row_ok, d_ok, True, MASK_D)
    do = _load_2d(DO + do_rows[:, None] + offs_d[None, :] * stride_dod, row_ok, d_ok, True, MASK_D)
    # Rows past Sq, and rows that see no key (lse = -inf), get lse = +inf: p = 0, never inf.
    lse = tl.load(LSE + pid_bh.to(tl.int64) * seq_q + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * seq_q + rows, mask=row_ok, other=0.0)

    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p1_hi = tl.minimum(mid_lo, hi)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base + lo.to(tl.int64) * stride_kn, v_base + lo.to(tl.int64) * stride_vn,
                   k_offs, v_offs, stride_kn, stride_vn, lo, p1_hi, offs_n, d_ok, row_lo, row_hi, hi, qk_scale,
                   BLOCK_N, True, MASK_D, INPUT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base + mid_lo.to(tl.int64) * stride_kn,
                   v_base + mid_lo.to(tl.int64) * stride_vn, k_offs, v_offs, stride_kn, stride_vn, mid_lo, mid_hi,
                   offs_n, d_ok, row_lo, row_hi, hi, qk_scale, BLOCK_N, False, MASK_D, INPUT_PRECISION)
    p3_lo = tl.maximum(mid_hi, lo)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base + p3_lo.to(tl.int64) * stride_kn,
                   v_base + p3_lo.to(tl.int64) * stride_vn, k_offs, v_offs, stride_kn, stride_vn, p3_lo, hi,
                   offs_n, d_ok, row_lo, row_hi, hi, qk_scale, BLOCK_N, True, MASK_D, INPUT_PRECISION)

    dq_rows = _row_offsets(rows, b, h, stride_dqb, stride_dqh, stride_dqm, 1)
    tl.store(DQ + dq_rows[:, None] + offs_d[None, :] * stride_dqd, (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # forward only: K/V tiles through TMA tensor descriptors (forward_variant)


# The forward variant a measurement asked for (forward_variant); None: the table's configs.
_VARIANT: dict | None = None


@contextlib.contextmanager
def forward_variant(*, tma: bool = False, block_n: int | None = None):
    """Inside the block, chunked_attention's 16-bit prefill launches (float16/bfloat16,
    Sq > DECODE_MAX_Q; decode and float32 keep the table) run this variant of the table's
    config; nested blocks replace outer ones, and the table is back on exit:

    tma: load K and V tiles through TMA (one host-side ``TensorDescriptor`` over [B, Hkv, Skv,
        D] each, [1, 1, BLOCK_N, BLOCK_D] blocks) where ``device.tma_unavailable`` finds no
        obstacle (a GPU before Hopper, a triton without host descriptors, a layout the copy
        engine cannot address); elsewhere the pointer loads run and a warning says why.
    block_n: keys per tile, a power of two 16..128, for padded head dims up to 128 (the table
        keeps D = 256's 32-key tiles: wider ones do not fit shared memory). Past 64 keys the
        launch takes 2 stages: at D = 128, 3 stages of 128-key K and V tiles plus the query
        tile need 224 KiB of the 227 KiB shared memory.

    Neither is measured on a GPU: the table (pointer loads, 64-key tiles at D <= 128) stays the
    default until a run decides; benchmarks/attention.py times the variants beside it.
    """
    global _VARIANT
    if not isinstance(tma, bool):
        raise TypeError(f"tma must be a bool, got {type(tma).__name__}")
    if block_n is not None and (isinstance(block_n, bool) or not isinstance(block_n, int)
                                or block_n not in (16, 32, 64, 128)):
        raise ValueError(f"block_n must be None or a power of two from 16 to 128, got {block_n!r}")
    previous, _VARIANT = _VARIANT, dict(tma=tma, block_n=block_n)
    try:
        yield
    finally:
        _VARIANT = previous


def _forward_config(block_d: int, dtype: torch.dtype, decode: bool, rows: int, k, v) -> LaunchConfig:
    """The table's config (_launch_config), with the forward_variant in force applied."""
    cfg = _launch_config(block_d, dtype, decode, rows)
    if _VARIANT is None or decode or dtype == torch.float32:
        return cfg
    if _VARIANT["block_n"] is not None and block_d <= 128:
        stages = 2 if _VARIANT["block_n"] > 64 else cfg.num_stages
        cfg = replace(cfg, block_n=_VARIANT["block_n"], num_stages=stages)
    if _VARIANT["tma"]:
        why = tma_unavailable(k, v)
        if why is None:
            cfg = replace(cfg, tma=True)
        else:
            warnings.warn(f"forward_variant(tma=True): pointer loads run instead of TMA: {why}", stacklevel=3)
    return cfg


def _kv_descriptor(t: torch.Tensor, block_n: int, block_d: int):
    """A [B, Hkv, Skv, D] descriptor of K or V whose blocks are one (batch, KV head)'s
    [block_n, block_d] tile; loads past Skv or D read zeros."""
    return tensor_descriptor(t, [1, 1, block_n, block_d])


def _launch_config(block_d: int, dtype: torch.dtype, decode: bool, rows: int) -> LaunchConfig:
    """Fixed H100 table, keyed by the padded head dim, the dtype and the phase.

    Chosen so that nothing spills on sm_90 (register counts from ptxas, triton 3.9):
    16-bit prefill uses FlashAttention-2's 128 x 64 tiles with 8 warps (two warpgroups, so
    the [128, D] fp32 accumulator costs D / 2 registers a thread; ~240 at D=128); D=256 halves
    both tiles. Decode is bandwidth-bound: one block holds all packed rows (16..128, the GQA
    group times the new tokens) so K/V is read once, 64-key tiles, 4 warps (8 past 64 rows),
    3 stages to keep loads in flight. float32 runs the exact (ieee, FMA) dot, whose operands
    live in registers, so it needs 16 x 16 tiles.
    """
    rows_pow2 = max(16, triton.next_power_of_2(rows))
    if dtype == torch.float32:
        return LaunchConfig(16, 16, 4 if block_d <= 64 else 8, 2)
    if decode:
        if block_d > 128:
            return LaunchConfig(min(rows_pow2, 64), 32, 4 if rows_pow2 <= 32 else 8, 2)
        return LaunchConfig(rows_pow2, 64, 4, 3) if rows_pow2 <= 64 else LaunchConfig(128, 64, 8, 3)
    if block_d <= 128:
        return LaunchConfig(min(128, rows_pow2), 64, 8, 3)
    return LaunchConfig(min(64, rows_pow2), 32, 8, 2)


def _bwd_launch_config(block_d: int, dtype: torch.dtype) -> tuple[LaunchConfig, LaunchConfig]:
    """(dK/dV config, dQ config), keyed by the padded head dim and the dtype. block_m tiles the
    queries, block_n the keys; a dK/dV program owns block_n keys, a dQ program block_m queries.

    float32 takes the forward's 16 x 16 tiles (the ieee dot keeps its operands in registers;
    dK/dV keeps an 8-byte stack at D=128, as the forward's fp32 on triton 3.6), which also keep
    the interpreter fast. The 16-bit tiles are chosen from the Triton tutorial's backward
    (32 x 128 for dK/dV, 128 x 32 for dQ: each program owns the long side), not measured on a
    GPU; warps and stages are set so that ptxas reports no spills on sm_90 (triton 3.9,
    tests/test_sm90_compile.py): dK/dV needs 8 warps (its two fp32 accumulators), and at
    D=256 32 keys (dK/dV) and 64 queries (dQ).
    """
    if dtype == torch.float32:
        warps = 4 if block_d <= 64 else 8
        return LaunchConfig(16, 16, warps, 2), LaunchConfig(16, 16, warps, 2)
    if block_d <= 64:
        return LaunchConfig(32, 128, 8, 2), LaunchConfig(128, 32, 4, 3)
    if block_d <= 128:
        return LaunchConfig(32, 128, 8, 2), LaunchConfig(128, 32, 8, 2)
    return LaunchConfig(32, 32, 8, 2), LaunchConfig(64, 32, 8, 2)


def _num_splits(programs: int, max_keys: int, block_n: int, device: torch.device) -> int:
    """How many KV splits to launch, from shapes only (no device sync).

    One while the grid already fills 3/4 of the GPU's program slots (_PROGRAMS_PER_SM per
    SM). Otherwise the fewest splits whose last wave is nearly full: with P programs and S
    slots, s splits run P * s / S waves, and a wave only partly filled wastes the rest of it
    (B=16 decode: 128 programs on 264 slots -> 2 splits, one full wave, rather than 3 splits
    and a half-empty second wave). Each split keeps at least _MIN_KEYS_PER_SPLIT keys.
    """
    sms = sm_count(device) or _INTERPRETER_SMS
    slots = _PROGRAMS_PER_SM * sms
    if programs * 4 >= slots * 3:
        return 1
    max_splits = max(1, min(max_keys // max(_MIN_KEYS_PER_SPLIT, block_n), _MAX_SPLITS))
    waves = [programs * n / slots for n in range(1, max_splits + 1)]
    efficiency = [w / math.ceil(w) for w in waves]
    best = max(efficiency)
    return next(n for n, e in enumerate(efficiency, start=1) if e >= 0.85 * best)


def _position_range(kv_start, Skv: int):
    """Positions and key indices are int32 in the kernels. A CUDA kv_start tensor is not read
    back (no host sync): its values are the caller's to keep within range."""
    if isinstance(kv_start, int):
        max_start = abs(kv_start)
    elif kv_start.device.type == "cpu" and kv_start.numel():
        max_start = int(kv_start.abs().max())
    else:
        max_start = 0
    if max_start + Skv >= 2**31:
        raise ValueError(f"kv_start (|kv_start| up to {max_start}) + Skv={Skv} must stay below 2**31")


def _lse_args(lse, q: torch.Tensor):
    """lse: float32 [B, Hq, Sq], contiguous, on q's device."""
    checks.tensor("lse", lse, ndim=3, dtypes=(torch.float32,), contiguous=True)
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be [B, Hq, Sq] = {list(q.shape[:3])} (q's first three dims), got {list(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int | None = None,
                      scale: float | None = None, kv_start: int | torch.Tensor = 0,
                      kv_len: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      lse: torch.Tensor | None = None) -> torch.Tensor:
    """Causal, optionally chunked, grouped-query flash attention.

    Args:
        q: [B, Hq, Sq, D] float16/bfloat16/float32, any strides.
        k, v: [B, Hkv, Skv, D], q's dtype and device, Hq % Hkv == 0, Sq <= Skv, any strides.
        chunk_size: C for Llama 4's chunked layers (a query sees only keys of its own chunk,
            chunk id = absolute position // C), or None for plain causal attention.
        scale: softmax scale, default D ** -0.5.
        kv_start: absolute position of key 0: an int, or an int32/int64 tensor [B] on q's
            device (per-sequence starts; negative starts mean left padding).
        kv_len: None (all Skv keys exist), or an int32/int64 tensor [B] on q's device with
            Sq <= kv_len[b] <= Skv: only keys 0..kv_len[b]-1 of sequence b exist and its queries
            are the last Sq of those. Lets a decode step read a static cache buffer whose fill
            level lives on the device (no host sync, capturable in a CUDA graph). Work is
            planned for Skv keys; tiles past kv_len[b] are skipped, not read.
        out: optional [B, Hq, Sq, D] output in q's dtype and device (any strides, must not
            overlap q, k or v).
        lse: optional float32 [B, Hq, Sq] contiguous tensor on q's device (not overlapping q, k,
            v or out) that receives each query row's log-sum-exp of its visible scaled scores in
            base 2, ``log2(sum_j 2^(scale * log2(e) * q.k_j))`` (the natural one times log2(e)),
            -inf for a row that sees no key: what chunked_attention_backward needs. With lse
            the key range is never split (splits=1: training prefill fills the GPU anyway).

    Returns:
        [B, Hq, Sq, D] in q's dtype: ``out`` when given, else a new tensor laid out like q
        (``torch.empty_like``: a [B, S, H, D]-transposed q gives a [B, S, H, D]-transposed out).
        Rows that see no key (queries at negative positions) are zeros. NaN / inf: as softmax
        math per row, except that a non-finite v can also reach rows of the same row block
        that do not see its key (module docstring, "NaN and inf").

    Sq <= DECODE_MAX_Q takes the decode layout (GQA group packed into the rows); either path
    splits the key range (flash-decoding) when the grid alone would leave SMs idle.
    """
    checks.attention_args(q, k, v, chunk_size, scale, kv_start, kv_len)
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if not supports_head_dim(D):
        raise ValueError(f"head dim D={D} is not supported (1 <= D <= 256)")
    checks.kernel_device("q", q, "chunked_attention", checks.INTERPRETER_BF16_DOT)
    _position_range(kv_start, Skv)
    if lse is not None:
        _lse_args(lse, q)
        checks.disjoint("lse", lse, q=q, k=k, v=v)
    if out is None:
        out = torch.empty_like(q)  # q's layout when dense (what the custom op's fake returns)
    else:
        checks.out_like(out, q, "q")
        checks.disjoint("out", out, q=q, k=k, v=v, lse=lse)  # programs read q/k/v rows others write
    if out.numel() == 0:
        return out

    group = Hq // Hkv
    decode = Sq <= DECODE_MAX_Q
    pack = group if decode else 1
    head_groups = Hq // pack
    rows = Sq * pack
    block_d = max(16, triton.next_power_of_2(D))
    cfg = _forward_config(block_d, q.dtype, decode, rows, k, v)
    m_blocks = triton.cdiv(rows, cfg.block_m)
    if B * head_groups > _MAX_GRID_Y:
        raise ValueError(f"B * Hq / {pack} = {B * head_groups} programs exceed the grid limit {_MAX_GRID_Y}")

    # Longest key range one row block can read: the whole cache, or one chunk plus the rows
    # the block spans. Only an upper bound is needed, so per-sequence kv_start stays on device.
    max_keys = Skv if chunk_size is None else min(Skv, chunk_size + cfg.block_m // pack)
    splits = 1 if lse is not None else _num_splits(m_blocks * B * head_groups, max_keys, cfg.block_n, q.device)
    split = splits > 1
    if split:
        partial_o = torch.empty(B * head_groups, splits, m_blocks * cfg.block_m, block_d,
                                dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(B * head_groups, splits, m_blocks * cfg.block_m,
                                  dtype=torch.float32, device=q.device)
    else:
        partial_o = out  # unused (SPLIT=False), any pointer will do
        partial_lse = out if lse is None else lse  # the lse output (STORE_LSE), else unused

    kv_tensor = isinstance(kv_start, torch.Tensor)
    scale = D ** -0.5 if scale is None else float(scale)
    k_arg, v_arg = (_kv_descriptor(k, cfg.block_n, block_d), _kv_descriptor(v, cfg.block_n, block_d)) \
        if cfg.tma else (k, v)
    _attn_fwd[(m_blocks, B * head_groups, splits)](
        q, k_arg, v_arg, out, partial_o, partial_lse, kv_start if kv_tensor else q, q if kv_len is None else kv_len,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        0 if kv_tensor else kv_start, Sq, Skv, head_groups,
        1 if chunk_size is None else min(chunk_size, 2**31 - 1), scale * _LOG2E,
        GROUP=group, PACK=pack, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        CHUNKED=chunk_size is not None, KV_START_TENSOR=kv_tensor, KV_LEN_TENSOR=kv_len is not None, SPLIT=split,
        STORE_LSE=lse is not None, KV_TMA=cfg.tma, INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split:
        splits_p2 = triton.next_power_of_2(splits)
        _merge_splits[(rows, B * head_groups)](
            partial_o, partial_lse, out, *out.stride(), head_groups, splits, m_blocks * cfg.block_m,
            PACK=pack, HEAD_DIM=D, SPLITS=splits_p2, BLOCK_D=block_d,
            num_warps=8 if splits_p2 * block_d > 4096 else 4,  # <= 128 fp32 tile values a thread
        )
    return out


def chunked_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, *, chunk_size: int | None = None,
                               scale: float | None = None,
                               kv_start: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of chunked_attention (no kv_len): dq, dk, dv from the output gradient.

    Args:
        do: [B, Hq, Sq, D], the gradient of the loss with respect to out: q's dtype and device,
            any strides (a stride-0 expanded gradient, as from ``out.sum()``, is fine).
        q, k, v, chunk_size, scale, kv_start: what the forward ran with (same rules).
        out: [B, Hq, Sq, D], the forward's output (q's dtype, any strides).
        lse: float32 [B, Hq, Sq] contiguous, the forward's ``lse`` output (base 2).

    Returns:
        (dq, dk, dv): dq [B, Hq, Sq, D] like q, dk / dv [B, Hkv, Skv, D] like k / v, in the
        inputs' dtype, laid out as ``torch.empty_like`` of the input (dense views keep their
        strides, others come back contiguous). dk and dv sum the GQA group's query heads.
        Queries that see no key get dq = 0; keys no query sees get dk = dv = 0. A NaN or inf
        spreads as through the softmax math, and (as in the forward) into the gradients of
        other queries or keys sharing a tile with it.
    """
    checks.attention_args(q, k, v, chunk_size, scale, kv_start)
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if not supports_head_dim(D):
        raise ValueError(f"head dim D={D} is not supported (1 <= D <= 256)")
    checks.kernel_device("q", q, "chunked_attention_backward", checks.INTERPRETER_BF16_DOT)
    checks.like(do, q, "q", "do")
    checks.like(out, q, "q", "out")
    _lse_args(lse, q)
    _position_range(kv_start, Skv)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:  # no query: nothing flows back to the keys
        return dq, dk.zero_(), dv.zero_()
    if B * Hq > _MAX_GRID_Y:
        raise ValueError(f"B * Hq = {B * Hq} programs exceed the grid limit {_MAX_GRID_Y}")

    group = Hq // Hkv
    block_d = max(16, triton.next_power_of_2(D))
    kv_cfg, q_cfg = _bwd_launch_config(block_d, q.dtype)
    kv_tensor = isinstance(kv_start, torch.Tensor)
    kv_start_arg = kv_start if kv_tensor else q  # a pointer either way; unused when an int
    kv_start_int = 0 if kv_tensor else kv_start
    chunk = 1 if chunk_size is None else min(chunk_size, 2**31 - 1)
    scale = D ** -0.5 if scale is None else float(scale)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    # delta = rowsum(dO * O), fp32 [B, Hq, Sq]; lse and delta share one row indexing.
    delta = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    rows = max(16, 4096 // block_d)
    _attn_bwd_preprocess[(triton.cdiv(Sq, rows), B * Hq)](
        out, do, delta, *out.stride(), *do.stride(), Hq, Sq,
        HEAD_DIM=D, BLOCK_M=rows, BLOCK_D=block_d, num_warps=4,
    )
    common = dict(GROUP=group, HEAD_DIM=D, BLOCK_D=block_d, CHUNKED=chunk_size is not None,
                  KV_START_TENSOR=kv_tensor, INPUT_PRECISION=precision)
    _attn_bwd_dkdv[(triton.cdiv(Skv, kv_cfg.block_n), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, kv_start_arg,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        kv_start_int, Sq, Skv, Hkv, chunk, scale * _LOG2E, scale,
        BLOCK_M=kv_cfg.block_m, BLOCK_N=kv_cfg.block_n, **common,
        num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
    )
    _attn_bwd_dq[(triton.cdiv(Sq, q_cfg.block_m), B * Hq)](
        q, k, v, do, lse, delta, dq, kv_start_arg,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        kv_start_int, Sq, Skv, Hq, chunk, scale * _LOG2E, scale,
        BLOCK_M=q_cfg.block_m, BLOCK_N=q_cfg.block_n, **common,
        num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
    )
    return dq, dk, dv
