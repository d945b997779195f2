"""Quantize a Llama 4 (the thin model or a patched transformers one), and save / load it.

    llama4_fast.quantize(model, "int4")                      # routed experts, group 128
    llama4_fast.quantize(model, "fp8", shared_expert=True, dense_ffn=True, attention=True)
    llama4_fast.save_quantized(model, "out/")                # model.safetensors + quantization.json
    llama4_fast.load_quantized(model, "out/")                # same architecture, any weights

Schemes (formats: llama4_fast.quant): "fp8" (per-channel e4m3 weights, per-token activations),
"fp8_tensor" (one weight scale per tensor / expert), "fp8_block" (128x128 weight blocks, 1x128
activation groups), "int4" (symmetric group-wise, -8..7), "int4_asym" (group-wise with zero
points). Quantized modules replace the originals in place, one at a time, and experts are
quantized one expert at a time, so the only extra memory is one expert's fp32 copy.

Which weights: the routed experts always; the shared expert's, the dense FFN layers' and the
attention projections' nn.Linear layers when asked. The router and lm_head stay as they are.
Experts become `QuantExperts`, whose `gate_up_proj` / `down_proj` are format objects that the
MoE forwards (thin model, and transformers' once patched) hand to `ops.fused_moe`; linears
become `QuantLinear` (`ops.quant_linear`). A transformers model is patched first
(`llama4_fast.patch`): its own expert forward cannot read quantized weights, so do not unpatch it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from llama4_fast.kernels.quant_matmul import int4_group_size_args
from llama4_fast.quant import Fp8Weight, Int4Weight

SCHEMES = ("fp8", "fp8_tensor", "fp8_block", "int4", "int4_asym")
MANIFEST = "quantization.json"
_FP8_GRANULARITY = {"fp8": "channel", "fp8_tensor": "tensor", "fp8_block": "block"}


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 128, act_scale_ub: float | None = None):
    """One weight [*lead, K, N] in `scheme`; a leading expert dimension is done one expert at
    a time (the fp32 working copy is one expert, not all of them)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")

    def one(x):
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
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

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


# ----------------------------------------------------------------------------------------------
# which modules
# ----------------------------------------------------------------------------------------------

def _is_experts(module: nn.Module) -> bool:
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3


def _linear_role(name: str) -> str | None:
    """Which quantize() option covers the nn.Linear at this module path (None: never)."""
    parts = name.split(".")
    if parts[-1] == "router":  # the thin model's router is a plain nn.Linear
        return None
    if "shared_expert" in parts:
        return "shared_expert"
    if "self_attn" in parts:
        return "attention"
    if "feed_forward" in parts:
        return "dense_ffn"
    return None


def _check_target(name: str, module: nn.Module, scheme: str, group_size: int):
    """Raise, naming the module, what quantize_weight would refuse part-way through the model."""
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            raise ValueError(f"{name}: linear layers with a bias are not supported")
        depths = {"weight": module.in_features}
    else:
        depths = {"gate_up_proj": module.gate_up_proj.shape[1], "down_proj": module.down_proj.shape[1]}
    for what, K in depths.items():
        if scheme.startswith("int4") and K % group_size:
            raise ValueError(f"{name}.{what}: K={K} is not a multiple of group_size={group_size}; choose a "
                             f"smaller power-of-two group (>= 32) or leave this module unquantized")


def _text_model(model: nn.Module, patch: bool = True):
    """The model itself, after checking its type; a transformers model is patched when `patch`."""
    from llama4_fast.model import Llama4

    if isinstance(model, Llama4):
        return model
    from llama4_fast import hf_patch

    m = hf_patch._llama4_classes()
    if not isinstance(model, (m.Llama4ForCausalLM, m.Llama4TextModel, m.Llama4ForConditionalGeneration)):
        raise TypeError(f"model must be a llama4_fast.Llama4 or a transformers Llama 4, got {type(model).__name__}")
    if patch:
        hf_patch.patch(model)
    return model


@torch.no_grad()
def quantize(model: nn.Module, scheme: str, group_size: int = 128, *, shared_expert: bool = False,
             dense_ffn: bool = False, attention: bool = False, act_scale_ub: float | None = None) -> nn.Module:
    """Quantize `model` in place and return it (see the module docstring for schemes and modules).

    group_size: INT4 rows of K per scale (power of two >= 32 dividing every K).
    act_scale_ub: FP8 only, upper bound on a token's activation amax (fbgemm_fp8 uses 1200).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if act_scale_ub is not None and not scheme.startswith("fp8"):
        raise ValueError("act_scale_ub applies to the fp8 schemes only")
    if scheme.startswith("int4"):
        int4_group_size_args(group_size)  # before any module is touched
    _text_model(model, patch=False)  # the type check, before anything changes
    wanted = {"shared_expert": shared_expert, "dense_ffn": dense_ffn, "attention": attention}
    # Names, not modules: a list holding the modules would keep every full-precision weight alive
    # until the end, doubling the peak memory this module-by-module loop exists to avoid.
    targets = [name for name, module in model.named_modules()
               if (_is_experts(module) and not isinstance(module, QuantExperts))
               or (type(module) is nn.Linear and wanted.get(_linear_role(name)))]  # transformers' router: a subclass
    for name in targets:  # every check before the first change: a refusal leaves the model as it was
        _check_target(name, model.get_submodule(name), scheme, group_size)
    _text_model(model)  # a transformers model: patched, so its layers call the ops
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            new = QuantLinear(quantize_weight(module.weight.t(), scheme, group_size, act_scale_ub))
        else:
            new = QuantExperts(quantize_weight(module.gate_up_proj, scheme, group_size, act_scale_ub),
                               quantize_weight(module.down_proj, scheme, group_size, act_scale_ub))
        _replace(model, name, new)
        del module, new  # the full-precision module is freed here, before the next one is quantized
    return model


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------

def save_quantized(model: nn.Module, path: str | Path):
    """Write the whole state dict as `model.safetensors` and the quantized modules' formats as
    `quantization.json` under the directory `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    formats = {name: {"module": type(m).__name__, "formats": m._formats}
               for name, m in model.named_modules() if isinstance(m, _QuantModule)}
    if not formats:
        raise ValueError("the model has no quantized modules: call llama4_fast.quantize first")
    # Keep each tensor's memory order: a transposed view (the K-contiguous FP8 weights the
    # quantizer makes for Hopper's FP8 MMA) is stored as its contiguous transpose and viewed back
    # on load, so a reloaded model has the same layouts and gives bit-identical outputs.
    tensors, transposed = {}, []
    for k, v in model.state_dict().items():
        if v.dim() >= 2 and not v.is_contiguous() and v.transpose(-1, -2).is_contiguous():
            tensors[k] = v.transpose(-1, -2)
            transposed.append(k)
        else:
            tensors[k] = v.contiguous()
    seen = {}
    for k, v in list(tensors.items()):  # tied weights: safetensors stores each storage once
        key = (v.data_ptr(), v.dtype, tuple(v.shape))
        if key in seen:
            tensors[k] = v.clone()
        seen[key] = k
    save_file(tensors, str(path / "model.safetensors"))
    manifest = {"format": "llama4_fast", "modules": formats, "transposed": transposed}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


@torch.no_grad()
def load_quantized(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a directory written by `save_quantized` into `model` (the same architecture, full
    precision or already quantized alike): modules listed in quantization.json are replaced by
    quantized ones built from the stored tensors, then every other weight is loaded."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    model = _text_model(model)
    device = next(model.parameters()).device
    state = load_file(str(path / "model.safetensors"), device=str(device))
    for k in manifest.get("transposed", []):
        state[k] = state[k].transpose(-1, -2)
    for name, entry in manifest["modules"].items():
        module = model.get_submodule(name)
        if isinstance(module, _QuantModule):
            continue
        fields = {}
        for prefix, spec in entry["formats"].items():
            t = {suffix: state.get(f"{name}.{prefix}{suffix}") for suffix in ("qweight", "scale", "zero")}
            if spec["kind"] == "fp8":
                fields[prefix] = Fp8Weight(t["qweight"], t["scale"], spec["granularity"], spec["act_scale_ub"])
            else:
                fields[prefix] = Int4Weight(t["qweight"], t["scale"], t["zero"], spec["group_size"])
        new = QuantLinear(fields[""]) if entry["module"] == "QuantLinear" else \
            QuantExperts(fields["gate_up_"], fields["down_"])
        _replace(model, name, new)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("inv_freq")]:
        raise ValueError(f"{path} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model
