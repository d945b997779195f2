"""A patched, quantized transformers Llama 4 straight from a checkpoint, never in bf16.

    model = llama4_fast.hf_loading.from_pretrained_quantized(path, "int4", device_map="auto")

transformers' own `from_pretrained` materialises every weight in the load dtype before
`llama4_fast.quantize` can shrink the experts: 218 GB for Scout in bf16. This builds the
transformers model with empty (meta) parameters, streams the checkpoint in one tensor at a time
(llama4_fast.checkpoint, after the same header checks as `Llama4.from_pretrained`), quantizes
each routed-expert stack on its layer's device as it arrives (an experts module becomes a
`QuantExperts`, as `quantize` makes it), then patches the model (`llama4_fast.patch`: only the
patched MoE reads quantized experts) and, across several devices, dispatches it with
accelerate's hooks. The result is the model `quantize(patch(AutoModelForCausalLM.from_pretrained(
path)), scheme)` would give (for a multimodal checkpoint, its language model), without its peak memory: the quantized model plus one expert stack
in the load dtype on a device, one tensor on the host.

device_map: a device ("cuda:0", "cpu"), "auto" (the decoder layers split evenly over the CUDA
devices in order, embeddings on the first, the final norm and LM head on the last), or a
{module name: device} dict in accelerate's format (a module's name prefix; "" for everything).
Several devices are dispatched with accelerate's hooks, which the patched MoE runs (the same
path as transformers' device_map="auto"); tested here on one device (CPU) only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from llama4_fast import checkpoint, hf_patch, loading
from llama4_fast.model import Llama4
from llama4_fast.quant import quantize_weight
from llama4_fast.quant_modules import QuantExperts, _is_experts


def from_pretrained_quantized(path: str | Path, quantize: str, *, group_size: int = 128, dtype=None,
                              device_map: str | torch.device | dict = "cpu"):
    """A transformers Llama4ForCausalLM from `path` (the language model of a multimodal
    checkpoint: its vision tower is not loaded), its routed experts in `quantize`
    (llama4_fast.quant.SCHEMES; INT4 groups of `group_size`) from the start, patched. dtype:
    the other weights' dtype (default config.json's). Raises before reading any weight if the
    checkpoint, the scheme or the group size do not fit the config (`loading.check_checkpoint`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    cfg, qcfg, stored = loading.check_checkpoint(Llama4, path, quantize=quantize, group_size=group_size)
    dtype = loading.model_dtype(dtype, cfg)
    config = AutoConfig.from_pretrained(str(path)).get_text_config()
    with init_empty_weights(include_buffers=False):  # parameters on meta; RoPE buffers computed
        model = hf_patch.llama4_classes().Llama4ForCausalLM(config)
    model.to(dtype)  # the buffers; the meta parameters take dtype as they are filled
    placement = _placement(model, device_map)
    owners = _owners(model, placement)  # thin-model name -> (module, attribute, its device)
    missing = sorted(set(owners) - set(stored))
    if missing:
        raise ValueError(f"{path} lacks weights the transformers model has: {missing[:8]}")

    expert_weights: dict[str, dict[str, object]] = {}
    tensors = checkpoint.iter_tensors(stored, dtype=dtype, device="cpu")
    try:
        for name, t in tensors:
            if name not in owners:
                continue  # e.g. a tied lm_head stored anyway
            module, attr, device = owners[name]
            if isinstance(module, _ExpertsSlot):
                expert_weights.setdefault(module.name, {})[attr] = quantize_weight(
                    t.to(device), quantize, group_size, name=name)
                if len(expert_weights[module.name]) == 2:
                    w = expert_weights.pop(module.name)
                    _set_module(model, module.name, QuantExperts(w["gate_up_proj"], w["down_proj"]))
            else:
                module._parameters[attr] = nn.Parameter(t.to(device), requires_grad=module._parameters[attr]
                                                        .requires_grad)
            del t
    except BaseException:
        expert_weights.clear()
        model = owners = None  # nothing of a failed load stays reachable from this frame
        raise
    finally:
        tensors.close()
    if config.tie_word_embeddings:
        model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"{path}: no weights were read for {meta[:8]}")
    _place_buffers(model, placement)
    hf_patch.patch(model)
    devices = set(placement.values())
    if len(devices) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map={name or "": dev for name, dev in placement.items()})
    return model.eval()


class _ExpertsSlot:
    """Stands for a routed-experts module whose two weights are quantized as they arrive."""

    def __init__(self, name: str):
        self.name = name


def _owners(model, placement) -> dict[str, tuple]:
    """thin-model name -> (owning module or an _ExpertsSlot, attribute, device) for every
    parameter of the transformers model."""
    owners = {}
    for full, _ in model.named_parameters(remove_duplicate=False):
        name = checkpoint.text_name(full)
        if name is None:
            continue
        module_name, _, attr = full.rpartition(".")
        module = model.get_submodule(module_name)
        device = _device_of(placement, module_name)
        owners[name] = ((_ExpertsSlot(module_name), attr, device) if _is_experts(module) else (module, attr, device))
    return owners


def _placement(model, device_map) -> dict[str, torch.device]:
    """{module name prefix: device} from `device_map` (module docstring), kept on the model."""
    if isinstance(device_map, dict):
        placement = {k: torch.device(v) for k, v in device_map.items()}
    elif device_map == "auto":
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("device_map='auto' needs CUDA devices; pass a device (e.g. 'cpu') instead")
        layers = len(model.model.layers)
        placement = {"": torch.device("cuda", n - 1), "model.embed_tokens": torch.device("cuda", 0)}
        placement.update({f"model.layers.{i}": torch.device("cuda", i * n // layers) for i in range(layers)})
    else:
        placement = {"": torch.device(device_map)}
    return placement


def _device_of(placement: dict[str, torch.device], module_name: str) -> torch.device:
    """The device of the longest prefix of `module_name` in the placement."""
    best = max((p for p in placement if p == "" or module_name == p or module_name.startswith(p + ".")), key=len,
               default=None)
    if best is None:
        raise ValueError(f"device_map places no prefix of {module_name!r}; add it or an '' entry")
    return placement[best]


def _place_buffers(model, placement):
    for name, module in model.named_modules():
        for attr, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[attr] = buf.to(_device_of(placement, name))


def _set_module(model, name: str, new: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
