"""The modules that hold quantized weights: `QuantLinear` (a bias-free nn.Linear) and
`QuantExperts` (routed experts), each keeping its format's tensors (llama4_fast.quant) as
buffers, so `.to()`, state_dict and safetensors see them, and handing format objects to
`ops.quant_linear` / `ops.fused_moe`. Built by `quantize` (quant_model.py), by loading a
quantized or quantize-while-loading checkpoint (loading.py), and by expert parallelism."""

from __future__ import annotations

import torch
import torch.nn as nn

from llama4_fast.quant import Fp8Weight, Int4Weight


def _register(module: nn.Module, prefix: str, weight):
    """Hold a format's tensors as buffers named <prefix>qweight / _scale / _zero (so .to(),
    state_dict and safetensors see them) and remember the format's other fields."""
    if isinstance(weight, Fp8Weight):
        module.register_buffer(prefix + "qweight", weight.qweight)
        module._formats[prefix] = dict(kind="fp8", granularity=weight.granularity, act_scale_ub=weight.act_scale_ub)
    else:
        module.register_buffer(prefix + "qweight", weight.packed)
        module._formats[prefix] = dict(kind="int4", group_size=weight.group_size)
    module.register_buffer(prefix + "scale", weight.scale)
    if getattr(weight, "zero", None) is not None:
        module.register_buffer(prefix + "zero", weight.zero)


def _format(module: nn.Module, prefix: str):
    spec = module._formats[prefix]
    q, s = getattr(module, prefix + "qweight"), getattr(module, prefix + "scale")
    if spec["kind"] == "fp8":
        return Fp8Weight(q, s, spec["granularity"], spec["act_scale_ub"])
    return Int4Weight(q, s, getattr(module, prefix + "zero", None), spec["group_size"])


class _QuantModule(nn.Module):
    """Rebuilds (and re-validates) its format objects only when its tensors change (.to())."""

    def __init__(self):
        super().__init__()
        self._formats: dict[str, dict] = {}
        self._cache: dict[str, object] = {}

    def _apply(self, fn, *args, **kwargs):
        """`.to(device)` moves the quantized tensors; a dtype change (`.half()`, `.to(torch.float16)`
        on the whole model) passes them by: float8 weights and their float32 scales are the format,
        not the model's dtype."""
        self._cache.clear()

        def keep_dtype(t):
            probe = fn(t.new_empty(0))  # what fn does to this dtype, without converting t
            return fn(t) if probe.dtype == t.dtype else t.to(probe.device)

        return super()._apply(keep_dtype, *args, **kwargs)

    def _weight(self, prefix: str):
        if prefix not in self._cache:
            self._cache[prefix] = _format(self, prefix)
        return self._cache[prefix]

    def extra_repr(self) -> str:
        return ", ".join(f"{p or 'weight'}: {spec}" for p, spec in self._formats.items())


class QuantLinear(_QuantModule):
    """Drop-in for a bias-free nn.Linear(K, N): y = x @ W with W a quantized [K, N] weight
    (nn.Linear's weight transposed), through `ops.quant_linear`. x [..., K] -> [..., N]."""

    def __init__(self, weight):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"a linear weight is [K, N], got {list(weight.shape)}")
        self.in_features, self.out_features = weight.shape
        _register(self, "", weight)

    @property
    def weight_format(self):
        return self._weight("")

    def forward(self, x):
        from llama4_fast import ops

        y = ops.quant_linear(x.reshape(-1, self.in_features), self.weight_format)
        return y.view(*x.shape[:-1], self.out_features)


class QuantExperts(_QuantModule):
    """Routed experts with quantized gate_up_proj (logical [E, H, 2I]) and down_proj
    ([E, I, H]). The attributes `gate_up_proj` / `down_proj` are the format objects."""

    def __init__(self, gate_up_proj, down_proj):
        super().__init__()
        _register(self, "gate_up_", gate_up_proj)
        _register(self, "down_", down_proj)

    @property
    def gate_up_proj(self):
        return self._weight("gate_up_")

    @property
    def down_proj(self):
        return self._weight("down_")


def scheme_of(module: "_QuantModule") -> str:
    """The `quantize` scheme a quantized module is in (also for FP8 checkpoints: "fp8")."""
    spec = next(iter(module._formats.values()))
    if spec["kind"] == "fp8":
        return {"channel": "fp8", "tensor": "fp8_tensor", "block": "fp8_block"}[spec["granularity"]]
    return "int4_asym" if next(iter(module._formats)) + "zero" in module._buffers else "int4"


def _is_experts(module: nn.Module) -> bool:
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3


def logical_shape(module: nn.Module):
    """What a module multiplies by: a linear's [in, out] or experts' gate_up [E, H, 2I] and
    down [E, I, H], quantized or not; None for anything else. Loading compares a stored
    module with the one it replaces by this."""
    if isinstance(module, (nn.Linear, QuantLinear)):
        return ("linear", [module.in_features, module.out_features])
    if _is_experts(module) or isinstance(module, QuantExperts):
        return ("experts", [list(module.gate_up_proj.shape), list(module.down_proj.shape)])
    return None
