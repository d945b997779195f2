"""Quantized weight formats (FP8, INT4), their quantizers, and their torch reference math.

Every format describes a weight of logical shape [*lead, K, N] used as y = x @ W (K the input
features, N the outputs; lead is [E] for experts). nn.Linear's weight [N, K] is W transposed;
transformers' experts are already [E, K, N] (gate_up_proj [E, H, 2I], down_proj [E, I, H]).
The kernels read the tensors through their strides (layouts: llama4_fast.kernels.dequant).

Fp8Weight  float8_e4m3fn weights with float32 scales; granularity
           "channel": scale [*lead, N], one per output column (fbgemm_fp8, compressed-tensors
                      FP8-dynamic); activations are quantized per token at run time, their amax
                      clamped to act_scale_ub when set (Maverick's fbgemm_fp8 uses 1200);
           "tensor":  scale [*lead, 1]; activations per token as above;
           "block":   scale [*lead, cdiv(K, 128), cdiv(N, 128)] per 128x128 block; activations in
                      1x128 groups along K.
Int4Weight weight-only INT4 in groups of `group_size` rows of K (128 by default):
           packed uint8 [*lead, K / 2, N], two K rows per byte (row 2j in the low nibble, 2j + 1
           in the high one), unsigned nibbles u in 0..15; scale [*lead, K / G, N] in the model
           dtype; zero None (symmetric, W = (u - 8) * s, values -8..7 as Meta's int4 recipe)
           or uint8 [*lead, K / G, N] zero points (asymmetric, W = (u - z) * s, GPTQ/HQQ-style
           min-max).

`dequantize()` gives the float weight; the `torch` backend of `ops.quant_linear` and of
`ops.fused_moe` computes with it (and, for FP8, with activations quantized exactly as the
kernels do), so it defines what the Triton kernels must match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama4_fast.kernels import checks
from llama4_fast.kernels.dequant import FP8_MAX
from llama4_fast.kernels.quant_matmul import MIN_FP8_SCALE, format_code, quant_weight_args

FP8_BLOCK = 128
GRANULARITIES = ("channel", "tensor", "block")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# INT4 packing
# ----------------------------------------------------------------------------------------------

def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Nibbles u [..., K, N] (integers 0..15, K even) -> uint8 [..., K / 2, N]: row 2j in the low
    nibble, row 2j + 1 in the high nibble."""
    if u.shape[-2] % 2:
        raise ValueError(f"int4 packs two K rows per byte: K must be even, got {u.shape[-2]}")
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise ValueError("int4 nibbles must lie in 0..15")
    u = u.to(torch.uint8)
    return u[..., 0::2, :] | (u[..., 1::2, :] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K / 2, N] -> nibbles uint8 [..., K, N] (inverse of pack_int4)."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-2).flatten(-3, -2)


# ----------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------

@dataclass
class Fp8Weight:
    """FP8 e4m3 weight, logical [*lead, K, N]; see the module docstring for the scale shapes."""

    qweight: torch.Tensor
    scale: torch.Tensor
    granularity: str = "channel"
    act_scale_ub: float | None = None

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.qweight.dim() < 2:
            raise ValueError(f"qweight must be [*lead, K, N], got shape {tuple(self.qweight.shape)}")
        *lead, K, N = self.qweight.shape
        quant_weight_args("qweight", format_code(self.kernel_format, None), self.qweight, self.scale, None,
                          None, K, N, lead)
        self.act_scale_ub = checks.scale_bound("act_scale_ub", self.act_scale_ub)  # None, or positive and finite

    @property
    def kernel_format(self) -> str:
        return "fp8_block" if self.granularity == "block" else "fp8_rowwise"

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.qweight, self.scale

    def expert(self, e: int) -> "Fp8Weight":
        return Fp8Weight(self.qweight[e], self.scale[e], self.granularity, self.act_scale_ub)

    @classmethod
    def quantize(cls, w: torch.Tensor, granularity: str = "channel", act_scale_ub: float | None = None) -> "Fp8Weight":
        """Round w [*lead, K, N] to e4m3 with scales from its amax (per column, per tensor or per
        128x128 block). The FP8 weight is stored K-contiguous (its transpose is contiguous), the
        operand order Hopper's FP8 MMA reads."""
        wf = w.detach().float()
        *lead, K, N = wf.shape
        if granularity == "channel":
            scale = wf.abs().amax(dim=-2) / FP8_MAX
            expand = scale.unsqueeze(-2)
        elif granularity == "tensor":
            scale = wf.abs().flatten(-2).amax(dim=-1, keepdim=True) / FP8_MAX
            expand = scale.unsqueeze(-1)
        elif granularity == "block":
            scale = _block_amax(wf) / FP8_MAX
            expand = _expand_blocks(scale, K, N)
        else:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
        q = (wf / expand).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return cls(q.transpose(-1, -2).contiguous().transpose(-1, -2), scale.contiguous(), granularity, act_scale_ub)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [*lead, K, N] the format stands for."""
        *lead, K, N = self.qweight.shape
        if self.granularity == "block":
            expand = _expand_blocks(self.scale, K, N)
        elif self.granularity == "channel":
            expand = self.scale.unsqueeze(-2)
        else:
            expand = self.scale.reshape(*lead, 1, 1)
        return (self.qweight.float() * expand).to(dtype)


@dataclass
class Int4Weight:
    """Group-wise INT4 weight, logical [*lead, K, N]; see the module docstring for the layout."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group_size: int = 128

    def __post_init__(self):
        if self.packed.dim() < 2:
            raise ValueError(f"packed must be [*lead, K / 2, N], got shape {tuple(self.packed.shape)}")
        *lead, half_k, N = self.packed.shape
        quant_weight_args("packed", format_code("int4", self.zero), self.packed, self.scale, self.zero,
                          self.group_size, 2 * half_k, N, lead)

    kernel_format = "int4"

    @property
    def shape(self) -> torch.Size:
        *lead, half_k, N = self.packed.shape
        return torch.Size((*lead, 2 * half_k, N))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.packed, self.scale) if self.zero is None else (self.packed, self.scale, self.zero)

    def expert(self, e: int) -> "Int4Weight":
        return Int4Weight(self.packed[e], self.scale[e], None if self.zero is None else self.zero[e], self.group_size)

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                 scale_dtype: torch.dtype | None = None) -> "Int4Weight":
        """Round w [*lead, K, N] in groups of group_size rows of K. Symmetric: s = amax / 7,
        q = round(w / s) in -8..7 (stored u = q + 8). Asymmetric: s = (max - min) / 15,
        z = round(-min / s), u = round(w / s) + z in 0..15. scale_dtype defaults to w's dtype
        (float32 for other dtypes)."""
        *lead, K, N = w.shape
        if K % 2 or group_size < 1 or K % group_size:
            raise ValueError(f"K={K} must be even and a multiple of group_size={group_size}")
        if scale_dtype is None:
            scale_dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32
        g = w.detach().float().reshape(*lead, K // group_size, group_size, N)
        tiny = torch.finfo(torch.float32).tiny
        # In place after the one division: a load that quantizes while streaming holds the
        # fp32 copy and one temporary of one expert, not four.
        if symmetric:
            scale = (g.abs().amax(dim=-2) / 7.0).clamp(min=tiny).to(scale_dtype)
            s = scale.float().unsqueeze(-2)
            u = torch.div(g, s).round_().clamp_(-8, 7).add_(8).reshape(*lead, K, N)
            zero = None
        else:
            lo, hi = g.amin(dim=-2).clamp(max=0), g.amax(dim=-2).clamp(min=0)
            scale = ((hi - lo) / 15.0).clamp(min=tiny).to(scale_dtype)
            s = scale.float()
            zero = torch.round(-lo / s).clamp(0, 15)
            u = torch.div(g, s.unsqueeze(-2)).round_().add_(zero.unsqueeze(-2)).clamp_(0, 15).reshape(*lead, K, N)
            zero = zero.to(torch.uint8)
        return cls(pack_int4(u), scale, zero, group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        *lead, K, N = self.shape
        u = unpack_int4(self.packed).float().reshape(*lead, K // self.group_size, self.group_size, N)
        zero = 8.0 if self.zero is None else self.zero.float().unsqueeze(-2)
        w = (u - zero) * self.scale.float().unsqueeze(-2)
        return w.reshape(*lead, K, N).to(dtype)


QuantWeight = (Fp8Weight, Int4Weight)


def _block_amax(w: torch.Tensor) -> torch.Tensor:
    """amax over 128x128 blocks of w [*lead, K, N] -> [*lead, cdiv(K, 128), cdiv(N, 128)]."""
    *lead, K, N = w.shape
    kb, nb = _cdiv(K, FP8_BLOCK), _cdiv(N, FP8_BLOCK)
    padded = w.new_zeros(*lead, kb * FP8_BLOCK, nb * FP8_BLOCK)
    padded[..., :K, :N] = w.abs()
    return padded.reshape(*lead, kb, FP8_BLOCK, nb, FP8_BLOCK).amax(dim=(-3, -1))


def _expand_blocks(scale: torch.Tensor, K: int, N: int) -> torch.Tensor:
    return scale.repeat_interleave(FP8_BLOCK, dim=-2)[..., :K, :].repeat_interleave(FP8_BLOCK, dim=-1)[..., :N]


# ----------------------------------------------------------------------------------------------
# torch reference math
# ----------------------------------------------------------------------------------------------

def quantize_fp8_activations_ref(x: torch.Tensor, group_size: int | None = None,
                                 scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch twin of kernels.quant_matmul.quantize_fp8_activations: x [M, K] -> (xq e4m3,
    scale [M] or [M, cdiv(K, 128)] float32). NaN and inf take the plain float math, which the
    kernel matches: a NaN makes its group's scale and every q NaN; an inf (no scale_ub) makes
    the scale inf, q NaN at the inf and 0 elsewhere; with scale_ub an inf saturates to +-448."""
    xf = x.float()
    M, K = xf.shape
    if group_size is None:
        groups = xf.reshape(M, 1, K)
    else:
        pad = _cdiv(K, group_size) * group_size - K
        groups = torch.nn.functional.pad(xf, (0, pad)).reshape(M, _cdiv(K, group_size), group_size)
    amax = groups.abs().amax(dim=-1)
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    scale = (amax / FP8_MAX).clamp(min=MIN_FP8_SCALE)
    q = (groups / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.flatten(1)[:, :K]  # (flatten, not reshape(M, -1): M may be 0)
    return q, (scale[:, 0] if group_size is None else scale)


def effective_activations(x: torch.Tensor, weight) -> torch.Tensor:
    """The activations the format's matmul really multiplies, in float32: FP8 formats quantize
    them (per token, or per 1x128 group for block scales); INT4 uses x as is."""
    if isinstance(weight, Int4Weight):
        return x.float()
    group = FP8_BLOCK if weight.granularity == "block" else None
    q, s = quantize_fp8_activations_ref(x, group, weight.act_scale_ub)
    if group is None:
        return q.float() * s[:, None]
    return q.float() * s.repeat_interleave(FP8_BLOCK, dim=1)[:, :x.shape[1]]


def quant_linear_ref(x: torch.Tensor, weight) -> torch.Tensor:
    """y [M, N] = effective_activations(x) @ dequantize(W), in float32, cast to x's dtype."""
    return (effective_activations(x, weight) @ weight.dequantize(torch.float32)).to(x.dtype)


def kernel_args(weight) -> dict:
    """A format object as the kernels' keyword arguments (weight tensor under "qweight")."""
    if isinstance(weight, Int4Weight):
        return dict(qweight=weight.packed, weight_format="int4", scale=weight.scale, zero=weight.zero,
                    group_size=weight.group_size, act_scale_ub=None)
    return dict(qweight=weight.qweight, weight_format=weight.kernel_format, scale=weight.scale, zero=None,
                group_size=128, act_scale_ub=weight.act_scale_ub)


def from_kernel_args(qweight: torch.Tensor, weight_format: str, scale: torch.Tensor, zero: torch.Tensor | None,
                     group_size: int, act_scale_ub: float | None):
    """The format object that `kernel_args` (or one weight of `expert_kernel_args`) describes:
    how the backward of a custom op, which receives plain tensors, dequantizes its weight."""
    if weight_format == "int4":
        return Int4Weight(qweight, scale, zero, group_size)
    if weight_format == "fp8_block":
        return Fp8Weight(qweight, scale, "block", act_scale_ub)
    per_tensor = scale.shape[-1] == 1 and qweight.shape[-1] != 1
    return Fp8Weight(qweight, scale, "tensor" if per_tensor else "channel", act_scale_ub)


def expert_kernel_args(gate_up_proj, down_proj) -> dict:
    """Quantized experts as `kernels.fused_moe` keyword arguments (besides the two weights).
    Both must share one format (type, granularity, group size, zero points, act_scale_ub)."""
    if type(gate_up_proj) is not type(down_proj) or not isinstance(gate_up_proj, QuantWeight):
        raise TypeError(f"gate_up_proj and down_proj must both be Fp8Weight or both Int4Weight, got "
                        f"{type(gate_up_proj).__name__} and {type(down_proj).__name__}")
    a, b = kernel_args(gate_up_proj), kernel_args(down_proj)
    same = (a["weight_format"] == b["weight_format"] and a["group_size"] == b["group_size"]
            and a["act_scale_ub"] == b["act_scale_ub"] and (a["zero"] is None) == (b["zero"] is None))
    if not same:
        raise ValueError("gate_up_proj and down_proj must share one quantization format")
    return dict(weight_format=a["weight_format"], gate_up_scale=a["scale"], down_scale=b["scale"],
                gate_up_zero=a["zero"], down_zero=b["zero"], group_size=a["group_size"],
                act_scale_ub=a["act_scale_ub"])


def fused_moe_ref(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, apply_router_weight_on_input=True):
    """Routed experts with quantized weights in torch, only the selected experts dequantized
    (one at a time): per expert, gu = (act(x) @ W13) * w (the router weight on the fp32
    result), h = silu(gate) * up cast to x's dtype, y = act(h) @ W2 (* w when not on input),
    where act() is `effective_activations` (FP8: quantized per token or 1x128 group)."""
    T, H = hidden_states.shape
    top_k = topk_ids.shape[1]
    inter = gate_up_proj.shape[-1] // 2
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden_states.device)
    flat_ids = topk_ids.reshape(-1).long()
    flat_weights = topk_weights.reshape(-1).float()
    for expert in flat_ids.unique().tolist():
        pairs = (flat_ids == expert).nonzero()[:, 0]
        rows = pairs // top_k
        w = flat_weights[pairs, None]
        w13, w2 = gate_up_proj.expert(expert), down_proj.expert(expert)
        gu = effective_activations(hidden_states[rows], w13) @ w13.dequantize(torch.float32)
        if apply_router_weight_on_input:
            gu = gu * w
        h = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(hidden_states.dtype)
        y = effective_activations(h, w2) @ w2.dequantize(torch.float32)
        if not apply_router_weight_on_input:
            y = y * w
        out.index_add_(0, rows, y)
    return out.to(hidden_states.dtype)


# ----------------------------------------------------------------------------------------------
# quantizing a weight
# ----------------------------------------------------------------------------------------------

SCHEMES = ("fp8", "fp8_tensor", "fp8_block", "int4", "int4_asym")


def check_int4_depth(name: str, K: int, group_size: int):
    """Refuse, naming the weight, an INT4 depth K that `group_size` does not divide: what
    quantize_weight would refuse part-way through a model, said before the first change."""
    if K % group_size:
        raise ValueError(f"{name}: K={K} is not a multiple of group_size={group_size}; choose a smaller "
                         "power-of-two group (>= 32) or leave this module unquantized")
_FP8_GRANULARITY = {"fp8": "channel", "fp8_tensor": "tensor", "fp8_block": "block"}


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 128, act_scale_ub: float | None = None,
                    *, name: str = "weight"):
    """One weight [*lead, K, N] in `scheme`; a leading expert dimension is done one expert at
    a time (the fp32 working copy is one expert, not all of them). A weight holding NaN or inf
    is refused (ValueError naming `name`): its scale would spread the NaN over a whole
    channel, group or block, far more of the model than the original weight touched."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")

    def one(x):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} holds NaN or inf values: quantize a model with finite weights")
        if scheme.startswith("fp8"):
            return Fp8Weight.quantize(x, _FP8_GRANULARITY[scheme], act_scale_ub)
        return Int4Weight.quantize(x, group_size, symmetric=scheme == "int4")

    if w.dim() == 2:
        return one(w)
    parts = [one(w[e]) for e in range(w.shape[0])]
    if scheme.startswith("fp8"):
        # keep each expert K-contiguous: stack the [N, K] storages, view back as [E, K, N]
        q = torch.stack([p.qweight.transpose(-1, -2) for p in parts]).transpose(-1, -2)
        return Fp8Weight(q, torch.stack([p.scale for p in parts]), parts[0].granularity, act_scale_ub)
    zero = None if parts[0].zero is None else torch.stack([p.zero for p in parts])
    return Int4Weight(torch.stack([p.packed for p in parts]), torch.stack([p.scale for p in parts]), zero, group_size)
