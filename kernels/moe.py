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
   decided per call from the tile count and the SM count, never at prefill.

Quantized experts (FP8 per-channel / per-tensor / 128x128 blocks, INT4 group-wise; layouts in
dequant.py) take the same two GEMMs with a constexpr WEIGHT_FORMAT: each K step calls
dequant.dequant_dot (FP8 rowwise scales in the epilogue), FP8 activations (x, then h) are
quantized per token on the device first, and the router weight still scales the fp32 result.
WEIGHT_FORMAT=DENSE keeps the 16-bit path's K loop and epilogue as they were (same PTX for
sm90, checked by compiling both versions).

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
from .device import sm_count
from .tiling import COMBINE_BLOCK_N, combine_splits_kernel, grouped_tile
from .dequant import DENSE, FP8_BLOCK, FP8_BLOCK_SIZE, FP8_ROWWISE, INT4_ASYM, INT4_SYM, dequant_dot, rowwise_epilogue
from .quant_matmul import block_k_args, format_code, quant_weight_args, quantize_fp8_activations
from .routing import dispatch_metadata

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "moe_h100.json"
# Split K at most this many ways, keeping at least this many K steps per split.
_MAX_SPLIT_K = 8
_MIN_K_TILES_PER_SPLIT = 4
# Up to this many (token, slot) pairs, fused_moe skips the dispatch metadata: one row block of
# up to 64 rows holds every pair, and each GEMM program indexes its expert directly.
DIRECT_MAX_PAIRS = 64


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
    # C rows are pair indices: h [P, N], fp32 partials [splits, P, N or 2N], or out [T, N] (top-1)
    c_ptr, stride_cm, stride_cn, c_split_stride,
    # routing: flat topk_ids / topk_weights [P], and the dispatch metadata (unused when DIRECT)
    topk_ids_ptr, topk_weights_ptr, sorted_pairs_ptr, expert_offsets_ptr, block_offsets_ptr,
    num_pairs, num_experts, num_pid_m, N, K, num_splits,
    A_ROW_DIV: tl.constexpr,   # A row of pair p is p // A_ROW_DIV (top_k for x, 1 for h)
    DIRECT: tl.constexpr,      # all pairs in one row block; program m serves pair m's expert
    GATED: tl.constexpr,       # gate_up: two accumulators, columns n and N + n of B
    SCALE_C: tl.constexpr,     # router weight multiplies the GEMM result rows (epilogue)
    C_PARTIAL: tl.constexpr,   # store fp32 partials (split K or top_k > 1) instead of final rows
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_B: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr = DENSE,  # dequant.py's formats; DENSE: B in A's dtype
    GROUP_K: tl.constexpr = 128,          # K rows per scale group of a quantized B
):
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
        row_mask = (ids == expert) & (offs_r < num_pairs)
    else:
        num_blocks = tl.load(block_offsets_ptr + num_experts + 1)
        if pid_m >= num_blocks:
            return  # beyond the valid blocks of this routing (the grid is a static bound)
        b = tl.arange(0, BLOCK_B)
        ends = tl.load(block_offsets_ptr + 1 + b, mask=b < num_experts + 1, other=num_pid_m)
        expert = tl.sum((ends <= pid_m).to(tl.int32), axis=0)  # bucket num_experts: bad ids
        first_slot = tl.load(expert_offsets_ptr + expert)
        slots = first_slot + (pid_m - tl.load(block_offsets_ptr + expert)) * BLOCK_M + offs_r
        row_mask = slots < tl.load(expert_offsets_ptr + expert + 1)
        pairs = tl.load(sorted_pairs_ptr + slots, mask=row_mask, other=0)
    # An out-of-range id contributes nothing: its rows run no K steps and store zeros.
    valid_expert = (expert >= 0) & (expert < num_experts)
    pairs = pairs.to(tl.int64)
    a_rows = pairs // A_ROW_DIV
    if SCALE_C:
        router_w = tl.load(topk_weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)

    # -- this split's K range (whole K tiles).
    k_tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), num_splits)
    k_lo = pid_s * k_tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + k_tiles_per_split * BLOCK_K)
    k_hi = tl.where(valid_expert, k_hi, k_lo)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows_ptrs = a_ptr + a_rows[:, None] * stride_am
    b_base = b_ptr + expert.to(tl.int64) * stride_be  # only dereferenced for a valid expert
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if WEIGHT_FORMAT != DENSE:
        bs_base = bs_ptr + expert.to(tl.int64) * stride_bse
        bz_base = bz_ptr + expert.to(tl.int64) * stride_bze
        a_group_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)  # read by FP8_BLOCK only
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        a_mask = row_mask[:, None] & (kk < K)[None, :]
        a = tl.load(a_rows_ptrs + kk[None, :] * stride_ak, mask=a_mask, other=0.0)
        if WEIGHT_FORMAT == DENSE:
            b_ptrs = b_base + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn
            b_mask = (kk < K)[:, None] & n_mask[None, :]
            acc = tl.dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), acc, input_precision=DOT_PRECISION)
            if GATED:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=b_mask, other=0.0)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        else:
            if WEIGHT_FORMAT == FP8_BLOCK:
                a_group_scale = tl.load(as_ptr + a_rows * stride_asm + (k0 // FP8_BLOCK_SIZE) * stride_ask,
                                        mask=row_mask, other=0.0)
            acc = dequant_dot(acc, a, a_group_scale, b_base, stride_bk, stride_bn, bs_base, stride_bsk, stride_bsn,
                              bz_base, stride_bzk, stride_bzn, k0, offs_n, n_mask, K,
                              WEIGHT_FORMAT, GROUP_K, BLOCK_K, DOT_PRECISION)
            if GATED:  # the up columns are N + n of the same expert matrix
                acc_up = dequant_dot(acc_up, a, a_group_scale, b_base, stride_bk, stride_bn, bs_base, stride_bsk,
                                     stride_bsn, bz_base, stride_bzk, stride_bzn, k0, offs_n + N, n_mask, K,
                                     WEIGHT_FORMAT, GROUP_K, BLOCK_K, DOT_PRECISION)

    # -- epilogue: rows go back to their pair (or, top-1, token) row; nothing is permuted.
    c_ptrs = (c_ptr + pid_s.to(tl.int64) * c_split_stride
              + pairs[:, None] * stride_cm + offs_n[None, :] * stride_cn)
    c_mask = row_mask[:, None] & n_mask[None, :]
    if WEIGHT_FORMAT == FP8_ROWWISE:  # per-token activation scale x per-channel weight scale
        a_scale = tl.load(as_ptr + a_rows * stride_asm, mask=row_mask, other=0.0)
        acc = rowwise_epilogue(acc, a_scale, bs_base, stride_bsn, offs_n, n_mask, WEIGHT_FORMAT)
        if GATED:
            acc_up = rowwise_epilogue(acc_up, a_scale, bs_base, stride_bsn, offs_n + N, n_mask, WEIGHT_FORMAT)
    if SCALE_C:  # the router weight on the GEMM result rows: w * (a @ B) == (w * a) @ B
        acc = acc * router_w[:, None]
        if GATED:
            acc_up = acc_up * router_w[:, None]
    if GATED:
        if C_PARTIAL:
            tl.store(c_ptrs, acc, mask=c_mask)
            tl.store(c_ptrs + N * stride_cn, acc_up, mask=c_mask)
        else:
            h = acc * tl.sigmoid(acc) * acc_up
            tl.store(c_ptrs, h.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# launch configs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmConfig:
    """Tile and launch parameters of one of the two GEMMs. split_k is chosen per call."""
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1


@dataclass(frozen=True)
class MoeConfig:
    """block_m (rows per block) is shared: both GEMMs walk the same dispatch metadata."""
    block_m: int
    gate_up: GemmConfig
    down: GemmConfig

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
            rows.append((float("inf") if bound is None else float(bound),
                         MoeConfig(checks.power_of_two(f"{where}.block_m", b["block_m"]),
                                   _gemm_from_json(b["gate_up"], where + ".gate_up"),
                                   _gemm_from_json(b["down"], where + ".down"))))
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


def _split_k(cfg: GemmConfig, row_blocks: int, n: int, k: int, num_sms: int) -> int:
    """Ways to split K when the (row block, column block) tiles leave SMs idle (decode).

    Model: the kernel takes as long as its busiest SM, which runs cdiv(tiles * s, num_sms)
    programs of 1/s of the K loop each. Take the smallest split within 10% of the best one,
    and only if it beats no split by 10% (partials cost traffic and a combine launch).
    Each split keeps at least _MIN_K_TILES_PER_SPLIT K steps for the software pipeline.
    """
    tiles = row_blocks * triton.cdiv(n, cfg.block_n)
    if tiles >= num_sms:
        return 1
    max_split = max(1, min(_MAX_SPLIT_K, triton.cdiv(k, cfg.block_k) // _MIN_K_TILES_PER_SPLIT))
    busiest = {s: triton.cdiv(tiles * s, num_sms) / s for s in range(1, max_split + 1)}
    best = min(busiest.values())
    split = min(s for s, t in busiest.items() if t <= 1.1 * best)
    return split if busiest[split] < 0.9 * busiest[1] else 1


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
    return replace(cfg, gate_up=replace(cfg.gate_up, split_k=_split_k(cfg.gate_up, row_blocks, I, H, num_sms)),
                   down=replace(cfg.down, split_k=_split_k(cfg.down, row_blocks, H, I, num_sms)))


def _num_sms(device: torch.device) -> int:
    return sm_count(device) or 1  # the interpreter runs programs one after another: splitting never pays


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


def fused_moe(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              apply_router_weight_on_input: bool = True, out: torch.Tensor | None = None,
              weight_format: str | None = None, gate_up_scale: torch.Tensor | None = None,
              down_scale: torch.Tensor | None = None, gate_up_zero: torch.Tensor | None = None,
              down_zero: torch.Tensor | None = None, group_size: int = 128,
              act_scale_ub: float | None = None, config: MoeConfig | None = None) -> torch.Tensor:
    """Routed SwiGLU experts, computing only the chosen (token, expert) pairs.

    hidden_states: [T, H] float16/bfloat16/float32, any strides.
    gate_up_proj:  [E, H, 2I], same dtype; columns [:I] are the gate, [I:] the up projection
                   (transformers' Llama4TextExperts layout, read in place; contiguous last
                   dimension is fastest).
    down_proj:     [E, I, H], same dtype.
    topk_weights:  [T, k] float (any float dtype; used in fp32).
    topk_ids:      [T, k] int32/int64 expert ids. On CUDA, ids outside [0, E) are skipped
                   (contribute nothing); on CPU they raise.
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

    Returns [T, H] in hidden_states' dtype: sum over the k choices of
    down(silu(x_w @ gate) * (x_w @ up)), accumulated in fp32. The shared expert is not included.
    """
    if weight_format is None:
        checks.moe_args(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids)
        quant = None
    else:
        quant = quant_experts_args(hidden_states, gate_up_proj, down_proj, weight_format, gate_up_scale, down_scale,
                                   gate_up_zero, down_zero, group_size, act_scale_ub)
        checks.routing_args(hidden_states, topk_weights, topk_ids, gate_up_proj.shape[0])
    checks.kernel_device("hidden_states", hidden_states, "fused_moe", checks.INTERPRETER_BF16_DOT)
    if config is not None:
        config_args(config, quant)
    if out is None:
        out = torch.empty_like(hidden_states, memory_format=torch.contiguous_format)
    else:
        checks.out_like(out, hidden_states, "hidden_states")
        checks.disjoint("out", out, hidden_states=hidden_states, gate_up_proj=gate_up_proj, down_proj=down_proj,
                        topk_weights=topk_weights, topk_ids=topk_ids)
    if hidden_states.shape[0] == 0:
        return out
    cfg = config or launch_config(hidden_states, gate_up_proj, down_proj, topk_ids.shape[1], quant)
    return _launch(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids,
                   apply_router_weight_on_input, out, cfg, quant)


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
                             num_sms=_num_sms(dev), use_table=_use_table(dev))
    cfg = select_config(T, top_k, E, H, two_i // 2, hidden_states.dtype, num_sms=_num_sms(dev), use_table=False)
    # K steps inside one scale group; INT4 steps at least 32 deep (two nibble-plane dots of 16)
    least = 32 if quant.code in (INT4_SYM.value, INT4_ASYM.value) else 16
    return replace(cfg, gate_up=replace(cfg.gate_up, block_k=max(least, min(cfg.gate_up.block_k, quant.group_k))),
                   down=replace(cfg.down, block_k=max(least, min(cfg.down.block_k, quant.group_k))))


def config_args(cfg, quant: ExpertQuant | None = None):
    """Check a caller's MoeConfig (fused_moe's `config=`): tiles powers of two >= 16 (tl.dot's
    least shape), positive counts, and for quantized experts K steps inside one scale group."""
    if not isinstance(cfg, MoeConfig) or not all(isinstance(g, GemmConfig) for g in (cfg.gate_up, cfg.down)):
        raise TypeError(f"config must be a MoeConfig of two GemmConfigs, got {cfg!r}")
    checks.power_of_two("config.block_m", cfg.block_m)
    for name, g in (("gate_up", cfg.gate_up), ("down", cfg.down)):
        checks.power_of_two(f"config.{name}.block_n", g.block_n)
        checks.power_of_two(f"config.{name}.block_k", g.block_k)
        checks.power_of_two(f"config.{name}.num_warps", g.num_warps, 1)
        for field in ("group_m", "num_stages", "split_k"):
            checks.positive_int(f"config.{name}.{field}", getattr(g, field))
        if quant is not None:
            block_k_args(f"config.{name}.block_k", g.block_k, quant.code, quant.group_k)


def _launch(x, w13, w2, topk_weights, topk_ids, on_input: bool, out: torch.Tensor, cfg: MoeConfig,
            quant: ExpertQuant | None = None):
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

    # gate_up: x [T, H] @ w13[e] -> h [P, I]; split K: fp32 gate/up partials, then combine
    g = cfg.gate_up
    h = torch.empty(P, I, dtype=x.dtype, device=x.device)
    y1 = h if g.split_k == 1 else torch.empty(g.split_k, P, 2 * I, dtype=torch.float32, device=x.device)
    a1, q1, f1 = quant_args(x, *((quant.gate_up_scale, quant.gate_up_zero) if quant else (None, None)))
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
            ROWS=1, SWIGLU=True, BLOCK_N=COMBINE_BLOCK_N, num_warps=4)

    # down: h [P, I] @ w2[e] -> out[token] (top-1), or fp32 partials [S2, P, H] + combine
    d = cfg.down
    partial = top_k > 1 or d.split_k > 1
    y2 = torch.empty(d.split_k, P, H, dtype=torch.float32, device=x.device) if partial else out
    a2, q2, f2 = quant_args(h, *((quant.down_scale, quant.down_zero) if quant else (None, None)))
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
            ROWS=top_k, SWIGLU=False, BLOCK_N=COMBINE_BLOCK_N, num_warps=4)
    return out
