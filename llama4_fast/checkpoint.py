"""Weights for the thin model: from safetensors directories or a loaded transformers model.

Names are returned in the thin model's convention, which is transformers' Llama4TextModel
naming without the wrapper prefixes: `model.layers.0...` (Llama4ForCausalLM) and
`language_model.model.layers.0...` (Llama4ForConditionalGeneration) both become `layers.0...`;
`lm_head.weight` keeps its name. Vision-tower and projector weights are skipped.

Quantized checkpoints (config.json `quantization_config`) are read with their weights as
stored, no requantization (`quantized_modules`):
- fbgemm_fp8 (Maverick FP8): e4m3 `<linear>.weight` [N, K] + `weight_scale` [N, 1]; experts
  `gate_up_proj` [E, H, 2I] + `gate_up_proj_scale` [E, 1, 2I], `down_proj` [E, I, H] +
  `down_proj_scale` [E, H, 1]; activations per token with amax <= `activation_scale_ub`.
- compressed-tensors FP8-dynamic (format "float-quantized"): e4m3 `<linear>.weight` [N, K] +
  `weight_scale` [N, 1] (strategy "channel") or [1] ("tensor"); routed experts unrolled as
  `experts.<e>.gate_proj / up_proj / down_proj` linears, which are stacked (not converted) into
  the [E, K, N] expert layout; dynamic per-token activations.
Tensors stored in float8 and their scales are never cast to the model dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Wrapper prefixes of the text model's weights, longest first.
_TEXT_PREFIXES = ("model.language_model.model.", "language_model.model.", "model.language_model.", "model.")
_HEAD_PREFIXES = ("model.language_model.", "language_model.", "")


def text_name(name: str) -> str | None:
    """The thin-model name of a checkpoint tensor name, or None for non-text weights."""
    for prefix in _HEAD_PREFIXES:
        if name == prefix + "lm_head.weight":
            return "lm_head.weight"
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest.startswith(("layers.", "embed_tokens.", "norm.")):
                return rest
    if name.startswith(("layers.", "embed_tokens.", "norm.")):  # a bare Llama4TextModel
        return name
    return None


def language_model_parameters(hf_model) -> dict[str, torch.nn.Parameter]:
    """The text model's parameters of a loaded transformers Llama 4, by thin-model name."""
    params = {}
    for name, p in hf_model.named_parameters(remove_duplicate=False):
        key = text_name(name)
        if key is not None:
            params[key] = p
    return params


def safetensors_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files (or model.safetensors.index.json) in {path}")
    return files


_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # never float8


def _is_scale(name: str) -> bool:
    return name.endswith(("_scale", "input_scale_ub"))


def load_safetensors(path: str | Path, *, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Text-model tensors of a checkpoint directory, one tensor at a time onto `device`, cast to
    `dtype` if given (floating tensors only), so peak memory is the model plus one tensor."""
    from safetensors import safe_open

    tensors = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                key = text_name(name)
                if key is None:
                    continue
                t = f.get_tensor(name)
                if dtype is not None and t.dtype in _CASTABLE and t.dtype != dtype and not _is_scale(key):
                    t = t.to(dtype)
                tensors[key] = t
    if not tensors:
        raise ValueError(f"{path} holds no Llama 4 text-model weights")
    return tensors


# ----------------------------------------------------------------------------------------------
# quantized checkpoints
# ----------------------------------------------------------------------------------------------

QUANT_METHODS = ("fbgemm_fp8", "compressed-tensors")


def quantization_config(path: str | Path) -> dict | None:
    """config.json's `quantization_config` (top level, or under text_config), or None."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    qcfg = cfg.get("quantization_config") or cfg.get("text_config", {}).get("quantization_config")
    if qcfg is None:
        return None
    method = qcfg.get("quant_method")
    if method not in QUANT_METHODS:
        raise ValueError(f"{path}: quantization method {method!r} is not supported (supported: {QUANT_METHODS})")
    if method == "compressed-tensors":
        if qcfg.get("format") not in (None, "float-quantized", "naive-quantized"):
            raise ValueError(f"{path}: compressed-tensors format {qcfg.get('format')!r} is not supported; "
                             "FP8-dynamic checkpoints are 'float-quantized'")
        for name, group in qcfg.get("config_groups", {}).items():
            w, a = group.get("weights") or {}, group.get("input_activations") or {}
            if w.get("num_bits") != 8 or w.get("type") != "float" or w.get("strategy") not in ("channel", "tensor"):
                raise ValueError(f"{path}: compressed-tensors group {name!r} is not FP8 per-channel/per-tensor weights")
            if a and not (a.get("dynamic") and a.get("strategy") == "token"):
                raise ValueError(f"{path}: compressed-tensors group {name!r} needs dynamic per-token activations")
    return qcfg


def quantized_modules(params: dict[str, torch.Tensor], qcfg: dict) -> dict[str, torch.nn.Module]:
    """Pop the quantized tensors out of `params` (thin-model names) and return them as
    {module name: QuantLinear | QuantExperts}, in the checkpoint's own layout and scales."""
    from llama4_fast.quant import Fp8Weight
    from llama4_fast.quant_model import QuantExperts, QuantLinear

    ub = qcfg.get("activation_scale_ub") if qcfg["quant_method"] == "fbgemm_fp8" else None

    def fp8(q, scale, n):  # scale [N, 1] / [1, N] / [N] (per channel) or [1] / [] (per tensor)
        scale = scale.float()
        if scale.numel() == 1:
            return Fp8Weight(q, scale.reshape(*q.shape[:-2], 1), "tensor", ub)
        return Fp8Weight(q, scale.reshape(*q.shape[:-2], n), "channel", ub)

    modules = {}
    fp8_names = [k for k, t in params.items() if t.dtype == torch.float8_e4m3fn]
    unrolled: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in fp8_names:
        q = params.pop(name)
        module, _, attr = name.rpartition(".")
        if attr in ("gate_up_proj", "down_proj"):  # fbgemm experts [E, K, N]
            modules.setdefault(module, {})[attr] = fp8(q, params.pop(name + "_scale"), q.shape[-1])
            continue
        if attr != "weight":
            raise ValueError(f"unexpected float8 tensor {name}")
        scale = params.pop(module + ".weight_scale")
        params.pop(module + ".input_scale", None)
        parts = module.split(".")
        if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():  # experts.<e>.<proj>
            unrolled.setdefault(".".join(parts[:-2]), {}).setdefault(int(parts[-2]), {})[parts[-1]] = (q, scale)
            continue
        modules[module] = QuantLinear(fp8(q.t(), scale, q.shape[0]))
    for module, weights in list(modules.items()):
        if isinstance(weights, dict):
            modules[module] = QuantExperts(weights["gate_up_proj"], weights["down_proj"])
    for module, experts in unrolled.items():
        E = len(experts)
        if sorted(experts) != list(range(E)) or any(set(v) != {"gate_proj", "up_proj", "down_proj"}
                                                    for v in experts.values()):
            raise ValueError(f"{module}: unrolled experts must be 0..E-1, each with gate_proj, up_proj, down_proj")
        # per expert: gate/up [I, H] -> gate_up storage [2I, H]; down [H, I]. Both stay
        # K-contiguous, viewed as transformers' [E, K, N]; per-tensor scales become per-row.
        def rows(e, proj):
            q, scale = experts[e][proj]
            return q, scale.float().reshape(-1).expand(q.shape[0])

        gu = torch.stack([torch.cat([rows(e, "gate_proj")[0], rows(e, "up_proj")[0]]) for e in range(E)])
        gu_s = torch.stack([torch.cat([rows(e, "gate_proj")[1], rows(e, "up_proj")[1]]) for e in range(E)])
        down = torch.stack([rows(e, "down_proj")[0] for e in range(E)])
        down_s = torch.stack([rows(e, "down_proj")[1] for e in range(E)])
        modules[module] = QuantExperts(Fp8Weight(gu.transpose(1, 2), gu_s, "channel", ub),
                                       Fp8Weight(down.transpose(1, 2), down_s.contiguous(), "channel", ub))
    return modules
