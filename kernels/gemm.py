"""What the GEMMs share (imported by kernels/quant_matmul.py and kernels/moe.py): which output
tile a program computes (the grouped, "super-row" order), a weight tile read through a TMA
descriptor, the kernel that finishes a split-K GEMM, a GEMM's tile and launch parameters
(GemmConfig), the rule that decides how many ways to split K, and the SM count that rule plans
for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .device import sm_count

# Split K at most this many ways, keeping at least this many K steps per split.
_MAX_SPLIT_K = 8
_MIN_K_TILES_PER_SPLIT = 4


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` over a num_pid_m x num_pid_n grid of tiles, walked GROUP_M
    row blocks at a time, column block by column block: the programs resident together share B
    column blocks (several row blocks) and A row blocks (several column blocks) in L2."""
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n


@triton.jit
def weight_tile(desc, index, k0, n0, ROWS: tl.constexpr, COLS: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The [ROWS, COLS] tile at (k0, n0) of weight matrix `index` ([K, N], one expert; 0 for a
    single matrix) through its TMA descriptor (device.weight_descriptor): over [E, K, N], or
    over [E, N, K] when TRANSPOSED (K contiguous, as nn.Linear stores it). Zeros past K and N."""
    if TRANSPOSED:
        return desc.load([index, n0, k0]).reshape(COLS, ROWS).trans()
    return desc.load([index, k0, n0]).reshape(ROWS, COLS)


COMBINE_BLOCK_N = 1024  # columns per combine program


@triton.jit(do_not_specialize=["num_splits"])
def combine_splits_kernel(partial_ptr, out_ptr, stride_om, stride_on, N, split_stride, num_splits,
                          ROWS: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    """Finish a GEMM that stored fp32 partials (contiguous [num_splits, R * ROWS, width]),
    summing in a fixed order (deterministic), and write out [R, N] in out's dtype:
    SWIGLU=False (down GEMM, width N): out[r] = sum over splits and the ROWS = top_k rows of r.
    SWIGLU=True (split gate_up GEMM, width 2N, ROWS = 1): out[r] = silu(g) * u, where g and u
    are the split sums of columns [:N] and [N:]. PDL: launched as a programmatic dependent
    launch (waits for the GEMM's partials in the kernel)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    if SWIGLU:
        width = 2 * N
    else:
        width = N
    ptrs = partial_ptr + r * ROWS * width + offs
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for _ in range(num_splits):
        for j in tl.static_range(ROWS):
            acc += tl.load(ptrs + j * width, mask=mask, other=0.0)
        if SWIGLU:
            up += tl.load(ptrs + N, mask=mask, other=0.0)
        ptrs += split_stride
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * up
    tl.store(out_ptr + r * stride_om + offs * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launch parameters and split-K
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmConfig:
    """Tile and launch parameters of one GEMM. split_k is chosen per call."""
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1


def split_k(cfg: GemmConfig, row_blocks: int, n: int, k: int, num_sms: int) -> int:
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


def num_sms(device: torch.device) -> int:
    """The parallel workers split_k plans for: the SM count, 1 off CUDA (the interpreter runs
    programs one after another: splitting never pays)."""
    return sm_count(device) or 1
