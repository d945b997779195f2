"""Dense dequant-matmul: y [M, N] = x [M, K] @ W [K, N] with W in an FP8 or INT4 format.

One kernel, two launch modes chosen per call from M:
- decode (M <= 16): BLOCK_M = 16 and K split across programs when the column tiles alone
  cannot keep every SM streaming weights (N = 1024 at TP8: 16 tiles of 64 for 132 SMs).
  Each split stores an fp32 partial (its scales already applied: they are linear), and one
  combine launch (shared with the grouped GEMM) sums the splits in a fixed order
  (deterministic) and casts.
- prefill (M > 16): 64 or 128-row tiles, grouped tile order so resident programs share
  weight column blocks, no split.
Decode is bound by the weight bytes (FP8: 1 byte per weight, INT4: ~0.5), which is the whole
point of the formats; the tile shapes are first guesses from the roofline, not yet tuned on a
GPU (no H100 measurement exists for this kernel yet).

The formats and their layouts are documented in `dequant.py`; `quant_matmul` takes the
quantized weight as plain tensors plus a format name. FP8 formats quantize the activations at
run time (`quantize_fp8_activations`: per token, or per 1x128 group for fp8_block).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import checks
from .dequant import (FORMATS, FP8_BLOCK, FP8_BLOCK_SIZE, FP8_MAX, INT4_ASYM, INT4_SYM, dequant_dot,
                      fp8_quantize_rows_kernel, rowwise_epilogue)
from .device import tensor_descriptor, weight_descriptor
from .gemm import (COMBINE_BLOCK_N, GemmConfig, combine_splits_kernel, grouped_tile, num_sms, split_k,
                   weight_tile)

MIN_FP8_SCALE = 1.0 / (FP8_MAX * 512.0)  # floor of an activation scale: an all-zero row stays finite
_DECODE_MAX_M = 16


@triton.jit(do_not_specialize=["M", "num_splits"])
def _quant_matmul_kernel(
    a_ptr, stride_am, stride_ak,
    a_scale_ptr, stride_asm, stride_ask,      # fp8: [M] per token or [M, cdiv(K, 128)] groups
    w_ptr, stride_wk, stride_wn,              # logical [K, N] (int4: packed [K / 2, N] bytes)
    s_ptr, stride_sk, stride_sn,
    z_ptr, stride_zk, stride_zn,
    c_ptr, stride_cm, stride_cn, c_split_stride,
    M, N, K, num_splits,
    WEIGHT_FORMAT: tl.constexpr, GROUP_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    # MatmulConfig.tma: TMA descriptors over a [M, K] (blocks [BLOCK_M, BLOCK_K]) and over the
    # weight as stored (device.weight_descriptor: [1, K, N] or, W_TRANSPOSED, [1, N, K]; packed
    # int4: K / 2 rows); None: pointer loads
    a_desc=None, w_desc=None, W_TRANSPOSED: tl.constexpr = False,
):
    pid_s = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    k_tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), num_splits)
    k_lo = pid_s * k_tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + k_tiles_per_split * BLOCK_K)

    a_rows = a_ptr + offs_m[:, None] * stride_am
    a_group_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)  # read by FP8_BLOCK only
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        if a_desc is not None:
            a = a_desc.load([pid_m * BLOCK_M, k0])
        else:
            a = tl.load(a_rows + kk[None, :] * stride_ak, mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
        if w_desc is None:
            w_tile = None
        elif WEIGHT_FORMAT == INT4_SYM or WEIGHT_FORMAT == INT4_ASYM:
            w_tile = weight_tile(w_desc, 0, k0 // 2, pid_n * BLOCK_N, BLOCK_K // 2, BLOCK_N, W_TRANSPOSED)
        else:
            w_tile = weight_tile(w_desc, 0, k0, pid_n * BLOCK_N, BLOCK_K, BLOCK_N, W_TRANSPOSED)
        if WEIGHT_FORMAT == FP8_BLOCK:
            a_group_scale = tl.load(a_scale_ptr + offs_m * stride_asm + (k0 // FP8_BLOCK_SIZE) * stride_ask,
                                    mask=m_mask, other=0.0)
        acc = dequant_dot(acc, a, a_group_scale, w_ptr, stride_wk, stride_wn, s_ptr, stride_sk, stride_sn,
                          z_ptr, stride_zk, stride_zn, k0, offs_n, n_mask, K,
                          WEIGHT_FORMAT, GROUP_K, BLOCK_K, DOT_PRECISION, w_tile)

    a_scale = tl.load(a_scale_ptr + offs_m * stride_asm, mask=m_mask, other=0.0)  # FP8_ROWWISE's
    acc = rowwise_epilogue(acc, a_scale, s_ptr, stride_sn, offs_n, n_mask, WEIGHT_FORMAT)
    c_ptrs = c_ptr + pid_s.to(tl.int64) * c_split_stride + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# activation quantization (FP8 formats)
# ----------------------------------------------------------------------------------------------

def quantize_fp8_activations(x: torch.Tensor, *, group_size: int | None = None,
                             scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 quantization of activations x [M, K] (float16/bfloat16/float32).

    group_size None: one scale per row (token) -> (xq [M, K] float8_e4m3fn, scale [M] float32).
    group_size 128: one scale per 1x128 group -> (xq, scale [M, cdiv(K, 128)] float32).
    scale = min(amax, scale_ub) / 448 (floored at MIN_FP8_SCALE), xq = x / scale saturated to
    +-448, so x ~= xq * scale. scale_ub bounds outliers (fbgemm_fp8 checkpoints use 1200).
    """
    checks.tensor("x", x, ndim=2, dtypes=checks.FLOAT_DTYPES)
    checks.kernel_device("x", x, "quantize_fp8_activations")
    scale_ub = checks.scale_bound("scale_ub", scale_ub)
    if group_size not in (None, FP8_BLOCK_SIZE.value):
        raise ValueError(f"group_size must be None (per token) or {FP8_BLOCK_SIZE.value}, got {group_size!r}")
    M, K = x.shape
    group = K if group_size is None else group_size
    groups = 1 if group_size is None else triton.cdiv(K, group_size)
    xq = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, groups, dtype=torch.float32, device=x.device)
    if M and K:
        fp8_quantize_rows_kernel[(M, groups)](
            x, x.stride(0), x.stride(1), xq, xq.stride(0), xq.stride(1), scale, scale.stride(0), scale.stride(1),
            K, group, 0.0 if scale_ub is None else scale_ub,
            HAS_UB=scale_ub is not None, MIN_SCALE=MIN_FP8_SCALE,
            BLOCK=min(1024, max(16, triton.next_power_of_2(group))), num_warps=4)
    else:  # K == 0: an all-zero row's scale
        scale.fill_(MIN_FP8_SCALE)
    return xq, (scale[:, 0] if group_size is None else scale)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def format_code(fmt: str, zero) -> int:
    """The kernel's WEIGHT_FORMAT for a format name ("fp8_rowwise", "fp8_block", "int4"; int4
    with zero points is "int4_asym")."""
    if fmt == "int4":
        return INT4_SYM.value if zero is None else INT4_ASYM.value
    if fmt not in ("fp8_rowwise", "fp8_block"):
        raise ValueError(f"weight_format must be one of 'fp8_rowwise', 'fp8_block', 'int4', got {fmt!r}")
    if zero is not None:
        raise ValueError(f"zero points belong to the int4 format, not {fmt!r}")
    return FORMATS[fmt]


def int4_group_size_args(group_size):
    """The INT4 groups the kernels run: powers of two of at least 32 rows of K (a K step lies in
    one group and splits into two nibble-plane dots of at least 16)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 32 \
            or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 32, got {group_size!r}")


def quant_weight_args(name: str, code: int, qweight, scale, zero, group_size, K: int, N: int, lead=()):
    """Check a quantized weight whose logical shape is [*lead, K, N] (see dequant.py). Returns
    the scale viewed with explicit K-group and N dimensions ([*lead, groups_k, groups_n];
    per-tensor and per-channel FP8 scales get stride 0 where they broadcast)."""
    lead = tuple(lead)
    if code in (INT4_SYM.value, INT4_ASYM.value):
        checks.tensor(name, qweight, dtypes=(torch.uint8,))
        if K % 2:
            raise ValueError(f"{name}: int4 packs two K rows per byte, so K must be even, got K={K}")
        int4_group_size_args(group_size)
        if K % group_size:
            raise ValueError(f"{name}: K={K} must be a multiple of group_size={group_size}")
        want = lead + (K // 2, N)
        if tuple(qweight.shape) != want:
            raise ValueError(f"{name} (packed int4) must be {list(want)}, got {list(qweight.shape)}")
        groups = lead + (K // group_size, N)
        checks.tensor(f"{name} scale", scale, dtypes=checks.FLOAT_DTYPES)
        if tuple(scale.shape) != groups:
            raise ValueError(f"{name} scale must be [{', '.join(map(str, groups))}] (one per {group_size} "
                             f"rows of K and column), got {list(scale.shape)}")
        if code == INT4_ASYM.value:
            checks.tensor(f"{name} zero", zero, dtypes=(torch.uint8,))
            if tuple(zero.shape) != groups:
                raise ValueError(f"{name} zero must be {list(groups)}, got {list(zero.shape)}")
        return scale
    checks.tensor(name, qweight, dtypes=(torch.float8_e4m3fn,))
    want = lead + (K, N)
    if tuple(qweight.shape) != want:
        raise ValueError(f"{name} must be {list(want)}, got {list(qweight.shape)}")
    checks.tensor(f"{name} scale", scale, dtypes=(torch.float32,))
    if code == FP8_BLOCK.value:
        b = FP8_BLOCK_SIZE.value
        blocks = lead + (triton.cdiv(K, b), triton.cdiv(N, b))
        if tuple(scale.shape) != blocks:
            raise ValueError(f"{name} scale must be {list(blocks)} (one per 128x128 block), got {list(scale.shape)}")
        return scale
    if tuple(scale.shape) == lead + (N,):
        return scale.unsqueeze(-2)
    if tuple(scale.shape) in (lead + (1,), lead + (1, 1)) or (not lead and scale.dim() == 0):
        return scale.reshape(lead + (1, 1)).expand(lead + (1, N))
    raise ValueError(f"{name} scale must be {list(lead + (N,))} (per channel) or {list(lead + (1,))} "
                     f"(per tensor), got {list(scale.shape)}")


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------

def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *, weight_format: str,
                 zero: torch.Tensor | None = None, group_size: int = 128, act_scale_ub: float | None = None,
                 out: torch.Tensor | None = None, config: MatmulConfig | None = None) -> torch.Tensor:
    """y = x @ W for a quantized W of logical shape [K, N] (formats: kernels/dequant.py).

    x:          [M, K] float16/bfloat16/float32, any strides.
    qweight:    weight_format "fp8_rowwise" / "fp8_block": float8_e4m3fn [K, N] (any strides;
                an nn.Linear-style [N, K] tensor passes as `.t()`). "int4": uint8 [K / 2, N],
                two K rows per byte (low nibble: even k), unsigned nibble u.
    scale:      fp8_rowwise: float32 [N] (per channel) or [1] (per tensor); fp8_block: float32
                [cdiv(K, 128), cdiv(N, 128)]; int4: [K / group_size, N] any float dtype.
    zero:       int4 only: None (symmetric, W = (u - 8) * s) or uint8 [K / group_size, N]
                (asymmetric, W = (u - z) * s).
    group_size: int4 group along K (power of two >= 32 dividing K).
    act_scale_ub: FP8 only: upper bound on a token's activation amax (fbgemm_fp8: 1200).
    out:        optional [M, N] tensor in x's dtype (every element is written).
    config:     optional MatmulConfig replacing `launch_config`'s choice (tests force tile
                sizes with it, e.g. several K steps inside one int4 group); validated by
                `config_args`.

    Returns [M, N] in x's dtype, accumulated in fp32. FP8 formats quantize x at run time (per
    token; per 1x128 group for fp8_block) with `quantize_fp8_activations`.
    """
    checks.tensor("x", x, ndim=2, dtypes=checks.FLOAT_DTYPES)
    checks.kernel_device("x", x, "quant_matmul", checks.INTERPRETER_BF16_DOT)
    act_scale_ub = checks.scale_bound("act_scale_ub", act_scale_ub)
    code = format_code(weight_format, zero)
    is_int4 = code in (INT4_SYM.value, INT4_ASYM.value)
    checks.tensor("qweight", qweight, ndim=2)
    M, K = x.shape
    N = qweight.shape[1]
    scale2d = quant_weight_args("qweight", code, qweight, scale, zero, group_size, K, N)
    checks.same_device(x=x, qweight=qweight, scale=scale, **({} if zero is None else {"zero": zero}))
    group_k = group_size if is_int4 else FP8_BLOCK_SIZE.value
    if config is not None:
        config_args(config, code, group_k)
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        checks.out_like(out, x, "x", shape=(M, N))  # x's dtype and device, [M, N]
        checks.disjoint("out", out, x=x, qweight=qweight, scale=scale, zero=zero)
    if M == 0:
        return out
    if K == 0:  # an empty sum; the kernel would still read a scale row that does not exist
        return out.zero_()
    if is_int4:
        a, a_scale = x, x  # a_scale: placeholder, never read
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
    else:
        a, a_scale = quantize_fp8_activations(x, group_size=128 if code == FP8_BLOCK.value else None,
                                              scale_ub=act_scale_ub)
        precision = "tf32"  # unused by fp8 dots
    a_scale2d = a_scale if a_scale.dim() == 2 else a_scale[:, None]
    if config is None:
        config = launch_config(M, N, K, code, group_size, num_sms(x.device))
    block_m, block_n, block_k, group_m, num_warps, num_stages, split, tma = config
    dest = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    z = zero if zero is not None else qweight  # placeholder, never read
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), split)
    descriptors = {}
    if tma:  # each operand the copy engine can read (device.tensor_descriptor), else pointer loads
        w_desc, transposed = weight_descriptor(qweight[None], block_k // 2 if is_int4 else block_k, block_n)
        descriptors = dict(a_desc=tensor_descriptor(a, [block_m, block_k]), w_desc=w_desc, W_TRANSPOSED=transposed)
    _quant_matmul_kernel[grid](
        a, a.stride(0), a.stride(1), a_scale2d, a_scale2d.stride(0), a_scale2d.stride(1),
        qweight, qweight.stride(0), qweight.stride(1), scale2d, scale2d.stride(0), scale2d.stride(1),
        z, z.stride(0), z.stride(1),
        dest, dest.stride(-2), dest.stride(-1), dest.stride(0) if split > 1 else 0,
        M, N, K, split,
        WEIGHT_FORMAT=code, GROUP_K=group_k, DOT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages, **descriptors)
    if split > 1:  # one launch sums the splits in a fixed order and casts (deterministic)
        combine_splits_kernel[(M, triton.cdiv(N, COMBINE_BLOCK_N))](
            dest, out, out.stride(0), out.stride(1), N, dest.stride(0), split,
            ROWS=1, SWIGLU=False, BLOCK_N=COMBINE_BLOCK_N, num_warps=4)
    return out


class MatmulConfig(NamedTuple):
    """Tiles and launch parameters of one quant_matmul call (split_k: K split across programs,
    their fp32 partials summed by the combine kernel). tma: read the activations and the
    weight through TMA descriptors where the device, the triton and the layouts allow it
    (`device.tensor_descriptor`); off by default, not measured on a GPU yet
    (benchmarks/quant_matmul.py times both)."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int
    tma: bool = False


def block_k_args(name: str, block_k: int, code: int, group_k: int):
    """A K step of a quantized GEMM must lie inside one scale group: BLOCK_K divides the int4
    group (and is at least 32: two nibble-plane dots of 16) or FP8's 128 (fp8_block's K block;
    rowwise FP8 promotes its fast accumulation at least every 128 products too)."""
    least = 32 if code in (INT4_SYM.value, INT4_ASYM.value) else 16
    if block_k < least or group_k % block_k:
        raise ValueError(f"{name} must be a power of two >= {least} dividing the K group of {group_k} "
                         f"(one scale per K step), got {block_k}")


def config_args(cfg, code: int, group_k: int):
    """Check a caller's MatmulConfig (quant_matmul's `config=`): powers of two >= 16 for the
    tiles (tl.dot's least shape), positive counts, BLOCK_K inside one scale group."""
    if not isinstance(cfg, MatmulConfig):
        raise TypeError(f"config must be a MatmulConfig, got {type(cfg).__name__}")
    for field in ("block_m", "block_n", "block_k"):
        checks.power_of_two(f"config.{field}", getattr(cfg, field))
    checks.power_of_two("config.num_warps", cfg.num_warps, 1)
    for field in ("group_m", "num_stages", "split_k"):
        checks.positive_int(f"config.{field}", getattr(cfg, field))
    checks.flag("config.tma", cfg.tma)
    block_k_args("config.block_k", cfg.block_k, code, group_k)


@functools.lru_cache(maxsize=4096)
def launch_config(M: int, N: int, K: int, code: int, group_size: int, num_sms: int) -> MatmulConfig:
    """The MatmulConfig (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, split_k)
    of one call.

    BLOCK_K divides the format's K group (int4: group_size; fp8_block: 128) so one K step has
    one scale. Decode (M <= 16) splits K by the grouped MoE GEMM's rule (gemm.split_k: the
    busiest SM's share of the work, at least 4 K steps per split), e.g. TP8's N = 1024 (16
    column tiles) 8 ways, N = 5120 (80 tiles) 3 ways on 132 SMs."""
    k_cap = group_size if code in (INT4_SYM.value, INT4_ASYM.value) else FP8_BLOCK_SIZE.value
    k_fit = max(16, triton.next_power_of_2(K))
    n_fit = max(16, triton.next_power_of_2(N))
    if M <= _DECODE_MAX_M:
        block_m, block_n, block_k, group_m, warps, stages = 16, min(64, n_fit), min(128, k_cap, k_fit), 1, 4, 4
        split = split_k(GemmConfig(block_n, block_k, group_m, warps, stages), 1, N, K, num_sms)
        return MatmulConfig(block_m, block_n, block_k, group_m, warps, stages, split)
    block_m = 64 if M <= 64 else 128
    block_k = min(64 if code in (INT4_SYM.value, INT4_ASYM.value) else 128, k_cap, k_fit)
    return MatmulConfig(block_m, min(128, n_fit), block_k, 8, 8 if block_m == 128 else 4, 3, 1)
