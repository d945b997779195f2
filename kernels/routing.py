"""Expert routing for mixture-of-experts layers: top-k selection and the dispatch metadata.

Two launchers live here.

`route(router_logits, top_k, scoring, renormalize)` picks each token's experts and their
weights in one fused kernel (top-k and scoring together, one read of the logits).

`dispatch_metadata(topk_ids, num_experts, block_m)` groups the (token, slot) pairs by expert
for the grouped GEMMs of `fused_moe`. Its layout (all int32, all on the device)::

    pair p = t * top_k + j                 the j-th choice of token t (topk_ids.view(-1)[p])
    bucket b in [0, E]                     bucket E collects out-of-range ids (skipped experts)
    sorted_pairs   [T*k]                   the pairs ordered by bucket; stable, so within one
                                           expert they keep token order
    expert_offsets [E+2]                   bucket b's pairs are sorted_pairs[offsets[b]:offsets[b+1]]
                                           (per-expert counts are its differences)
    block_offsets  [E+2]                   bucket b owns GEMM row blocks [block_offsets[b],
                                           block_offsets[b+1]), i.e. cdiv(count_b, block_m) of
                                           them; block_offsets[E+1] is the number of valid blocks

A GEMM program with row block index m finds its bucket by counting the entries of
block_offsets[1:] that are <= m (the block-to-expert map, searched rather than stored), takes
rows `offsets[b] + (m - block_offsets[b]) * block_m + [0, block_m)` of sorted_pairs and masks
the ones past offsets[b+1]. Programs with m >= block_offsets[E+1] exit at once, so the grid can
be sized by the static bound `max_blocks` (no device->host copy anywhere: the decode step can
be captured in a CUDA graph). No padding slots are stored.

The builder is a histogram and a prefix sum: one launch while T*k <= _SINGLE_LAUNCH_PAIRS,
else three (per-chunk histograms, one scan over the chunks, per-chunk scatter). `fused_moe`
does not call it at all when every pair fits in one row block (decode): there each pair
indexes its expert directly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import checks

# Up to this many (token, slot) pairs the metadata is built by a single program in one launch.
_SINGLE_LAUNCH_PAIRS = 256
# Pairs per program in the multi-launch path (histogram and scatter kernels); a multiple of
# every BLOCK_P (<= 128), so the programs' ranges tile the pairs exactly.
_CHUNK_PAIRS = 256
# Elements of the [pairs, buckets] one-hot tile the metadata kernels hold in registers.
_ONEHOT_ELEMS = 8192


# ----------------------------------------------------------------------------------------------
# route: fused top-k + scoring
# ----------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["T"])
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, T, E, stride_t, stride_e,
                  TOP_K: tl.constexpr, SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program scores BLOCK_T tokens: a [BLOCK_T, BLOCK_E] tile of logits in registers,
    TOP_K rounds of arg-max, the k weights and ids gathered into [BLOCK_T, BLOCK_K] tiles
    and stored once. Ranking is torch.sort's descending order: NaN above +inf above every
    other value, equal values (and NaNs among themselves) to the lower index."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :] * stride_e
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    # Padding columns never rank. NaN ranks above everything, +inf included (as in torch.topk):
    # tl.max drops NaN, so NaNs are taken first by a separate test, then the finite/inf max.
    is_nan = x != x
    avail = tl.broadcast_to(col_ok[None, :], (BLOCK_T, BLOCK_E))
    if SOFTMAX:
        row_max = tl.max(tl.where(avail, x, float("-inf")), axis=1)
        probs = tl.where(avail, tl.exp(x - row_max[:, None]), 0.0)
        denom = tl.sum(probs, axis=1)

    kcols = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        nan_left = tl.max((avail & is_nan).to(tl.int32), axis=1) > 0
        best = tl.max(tl.where(avail & ~is_nan, x, float("-inf")), axis=1)
        # Lowest column among the available NaNs, else among the available maxima: ties go to
        # the lower expert index. An all -inf row still matches (-inf == -inf), so an id is
        # always found.
        hit = avail & tl.where(nan_left[:, None], is_nan, x == best[:, None])
        idx = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
        chosen = cols[None, :] == idx[:, None]
        if SOFTMAX:
            w = tl.sum(tl.where(chosen, probs, 0.0), axis=1) / denom
        else:
            w = tl.sigmoid(tl.sum(tl.where(chosen, x, 0.0), axis=1))
        top_w = tl.where(kcols[None, :] == j, w[:, None], top_w)
        top_i = tl.where(kcols[None, :] == j, idx[:, None], top_i)
        avail = avail & ~chosen
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]  # columns >= TOP_K hold 0

    out_offs = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    out_mask = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(weights_ptr + out_offs, top_w, mask=out_mask)
    tl.store(ids_ptr + out_offs, top_i, mask=out_mask)


def route(router_logits: torch.Tensor, top_k: int, scoring: str = "sigmoid",
          renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert selection with scoring, fused in one kernel.

    router_logits: [T, E] float16/bfloat16/float32, any strides.
    Returns `(topk_weights [T, top_k] float32, topk_ids [T, top_k] int32)`, both contiguous,
    ids in descending logit order as torch.sort(descending=True, stable=True) gives it: NaN
    ranks highest (above +inf), ties go to the lower expert index first.

    scoring="sigmoid" (Llama 4): weight = sigmoid(selected logit), computed in fp32.
    scoring="softmax": softmax over all E logits in fp32, then the top k of it;
    renormalize=True rescales the k weights to sum to 1.
    NaN and inf follow the fp32 math: sigmoid(NaN) is NaN, sigmoid(+-inf) is 1 / 0; a softmax
    row holding a NaN or a +inf (inf - inf) or only -inf is all NaN, and so are its weights.
    """
    checks.route_args(router_logits, top_k, scoring, renormalize)
    checks.kernel_device("router_logits", router_logits, "route")
    T, E = router_logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    if T == 0:
        return weights, ids
    block_e = max(16, triton.next_power_of_2(E))
    block_t = max(1, min(64, 4096 // block_e))
    _route_kernel[(triton.cdiv(T, block_t),)](
        router_logits, weights, ids, T, E, router_logits.stride(0), router_logits.stride(1),
        TOP_K=top_k, SOFTMAX=scoring == "softmax", RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k), num_warps=4)
    return weights, ids


# ----------------------------------------------------------------------------------------------
# dispatch metadata: histogram + prefix sum, no host synchronisation
# ----------------------------------------------------------------------------------------------

@triton.jit
def _pair_buckets(ids_ptr, start, P, E, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    """Pairs [start, start + BLOCK_P): their indices, validity and a [BLOCK_P, BLOCK_B] int32
    one-hot of their bucket (the expert id, or E for an id outside [0, E))."""
    pairs = start + tl.arange(0, BLOCK_P)
    valid = pairs < P
    ids = tl.load(ids_ptr + pairs, mask=valid, other=0)
    bucket = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    bucket = tl.where(valid, bucket, -1)  # matches no column
    onehot = (bucket[:, None] == tl.arange(0, BLOCK_B)[None, :]).to(tl.int32)
    return pairs, valid, onehot


@triton.jit
def _count_range(ids_ptr, start, stop, P, E, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    """Per-bucket counts [BLOCK_B] of the pairs in [start, stop)."""
    counts = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for s in range(start, stop, BLOCK_P):
        _, _, onehot = _pair_buckets(ids_ptr, s, P, E, BLOCK_P, BLOCK_B)
        counts += tl.sum(onehot, axis=0)
    return counts


@triton.jit
def _scatter_range(ids_ptr, sorted_ptr, cursor, start, stop, P, E,
                   BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    """Write the pairs in [start, stop) to sorted_pairs. cursor [BLOCK_B] is the next free slot
    of each bucket; a pair goes to cursor[bucket] + (earlier pairs of its bucket in the tile)."""
    for s in range(start, stop, BLOCK_P):
        pairs, valid, onehot = _pair_buckets(ids_ptr, s, P, E, BLOCK_P, BLOCK_B)
        # The inclusive running count down the tile, read at the pair's own bucket, is its
        # 1-based rank among the tile's pairs of that bucket: a stable order without sorting.
        rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1
        slot = tl.sum(onehot * cursor[None, :], axis=1) + rank
        tl.store(sorted_ptr + slot, pairs, mask=valid)
        cursor += tl.sum(onehot, axis=0)


@triton.jit
def _store_offsets(counts, expert_offsets_ptr, block_offsets_ptr, NB,
                   BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """From per-bucket counts, write expert_offsets and block_offsets ([NB + 1] each, exclusive
    prefix sums with a leading 0); return each bucket's first slot."""
    cols = tl.arange(0, BLOCK_B)
    first = cols == 0
    inclusive = tl.cumsum(counts, axis=0)
    tl.store(expert_offsets_ptr + cols, tl.zeros_like(cols), mask=first)
    tl.store(expert_offsets_ptr + 1 + cols, inclusive, mask=cols < NB)
    blocks = tl.cumsum((counts + BLOCK_M - 1) // BLOCK_M, axis=0)
    tl.store(block_offsets_ptr + cols, tl.zeros_like(cols), mask=first)
    tl.store(block_offsets_ptr + 1 + cols, blocks, mask=cols < NB)
    return inclusive - counts


@triton.jit(do_not_specialize=["P"])
def _metadata_single_kernel(ids_ptr, sorted_ptr, expert_offsets_ptr, block_offsets_ptr, P, E,
                            BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    """Small T*k: one program counts, prefix-sums and scatters every pair (one launch)."""
    counts = _count_range(ids_ptr, 0, P, P, E, BLOCK_P, BLOCK_B)
    cursor = _store_offsets(counts, expert_offsets_ptr, block_offsets_ptr, E + 1, BLOCK_M, BLOCK_B)
    _scatter_range(ids_ptr, sorted_ptr, cursor, 0, P, P, E, BLOCK_P, BLOCK_B)


@triton.jit(do_not_specialize=["P"])
def _chunk_count_kernel(ids_ptr, chunk_counts_ptr, P, E, CHUNK: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    """Large T*k, step 1: program c writes the bucket histogram of pairs [c*CHUNK, (c+1)*CHUNK)
    to row c of chunk_counts [C, BLOCK_B]."""
    c = tl.program_id(0)
    counts = _count_range(ids_ptr, c * CHUNK, (c + 1) * CHUNK, P, E, BLOCK_P, BLOCK_B)
    tl.store(chunk_counts_ptr + c.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B), counts)


@triton.jit(do_not_specialize=["C"])
def _chunk_scan_kernel(chunk_counts_ptr, expert_offsets_ptr, block_offsets_ptr, C, E,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    """Large T*k, step 2 (one program): turn chunk_counts into, per chunk and bucket, the number
    of that bucket's pairs in earlier chunks (in place), and write the offsets."""
    cols = tl.arange(0, BLOCK_B)
    carry = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        ptrs = chunk_counts_ptr + rows[:, None].to(tl.int64) * BLOCK_B + cols[None, :]
        tile = tl.load(ptrs, mask=(rows < C)[:, None], other=0)
        tl.store(ptrs, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=(rows < C)[:, None])
        carry += tl.sum(tile, axis=0)
    _store_offsets(carry, expert_offsets_ptr, block_offsets_ptr, E + 1, BLOCK_M, BLOCK_B)


@triton.jit(do_not_specialize=["P"])
def _chunk_scatter_kernel(ids_ptr, chunk_counts_ptr, expert_offsets_ptr, sorted_ptr, P, E,
                          CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    """Large T*k, step 3: program c scatters its chunk, starting each bucket at the bucket's
    first slot plus the pairs of that bucket in earlier chunks."""
    c = tl.program_id(0)
    cols = tl.arange(0, BLOCK_B)
    cursor = tl.load(expert_offsets_ptr + cols, mask=cols < E + 1, other=0)
    cursor += tl.load(chunk_counts_ptr + c.to(tl.int64) * BLOCK_B + cols)
    _scatter_range(ids_ptr, sorted_ptr, cursor, c * CHUNK, (c + 1) * CHUNK, P, E, BLOCK_P, BLOCK_B)


class DispatchMetadata(NamedTuple):
    """Pairs grouped by expert, for the grouped GEMMs (layout in the module docstring).

    sorted_pairs [T*k] int32; expert_offsets [E+2] int32; block_offsets [E+2] int32 (all on
    the device of topk_ids); block_m: rows per GEMM block; max_blocks: a static upper bound on
    block_offsets[E+1], to size grids without reading the device.
    """
    sorted_pairs: torch.Tensor
    expert_offsets: torch.Tensor
    block_offsets: torch.Tensor
    block_m: int
    max_blocks: int


def max_row_blocks(num_pairs: int, num_buckets: int, block_m: int) -> int:
    """Upper bound on sum_b cdiv(count_b, block_m) over num_buckets buckets holding num_pairs:
    each non-empty bucket wastes at most block_m - 1 rows, and at most min(buckets, pairs) of
    them are non-empty."""
    return (num_pairs + min(num_buckets, num_pairs) * (block_m - 1)) // block_m


def dispatch_metadata(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> DispatchMetadata:
    """Group the (token, slot) pairs of topk_ids [T, k] (int32/int64) by expert, on the device.

    num_experts: E; ids outside [0, E) go to bucket E, which `fused_moe` skips (no
    contribution). block_m: rows per GEMM block. Returns a `DispatchMetadata`; no host
    synchronisation, buffer sizes depend only on (T, k, E, block_m).
    """
    checks.tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    for name, v in (("num_experts", num_experts), ("block_m", block_m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    ids = topk_ids.contiguous().view(-1)
    P, E, dev = ids.numel(), num_experts, ids.device
    sorted_pairs = torch.empty(P, dtype=torch.int32, device=dev)
    expert_offsets = torch.empty(E + 2, dtype=torch.int32, device=dev)
    block_offsets = torch.empty(E + 2, dtype=torch.int32, device=dev)
    block_b = triton.next_power_of_2(E + 1)
    block_p = max(16, min(128, _ONEHOT_ELEMS // block_b))
    if P <= _SINGLE_LAUNCH_PAIRS:
        _metadata_single_kernel[(1,)](ids, sorted_pairs, expert_offsets, block_offsets, P, E,
                                      BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_B=block_b, num_warps=8)
    else:
        chunks = triton.cdiv(P, _CHUNK_PAIRS)
        chunk_counts = torch.empty(chunks, block_b, dtype=torch.int32, device=dev)
        _chunk_count_kernel[(chunks,)](ids, chunk_counts, P, E, CHUNK=_CHUNK_PAIRS,
                                       BLOCK_P=block_p, BLOCK_B=block_b, num_warps=8)
        _chunk_scan_kernel[(1,)](chunk_counts, expert_offsets, block_offsets, chunks, E,
                                 BLOCK_M=block_m, BLOCK_C=max(1, _ONEHOT_ELEMS // block_b // 2),
                                 BLOCK_B=block_b, num_warps=8)
        _chunk_scatter_kernel[(chunks,)](ids, chunk_counts, expert_offsets, sorted_pairs, P, E,
                                         CHUNK=_CHUNK_PAIRS, BLOCK_P=block_p, BLOCK_B=block_b,
                                         num_warps=8)
    return DispatchMetadata(sorted_pairs, expert_offsets, block_offsets, block_m,
                            max_row_blocks(P, E + 1, block_m))
