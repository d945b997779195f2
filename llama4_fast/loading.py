"""Putting a checkpoint into a model: the thin model's `from_pretrained` and `from_hf`.

Reading is llama4_fast.checkpoint's (files, names, headers, tensors one at a time); this module
builds the model on the meta device from the config, checks every stored tensor against it
(names, shapes, dtypes, quantized layouts) before reading any, then fills it. It does not
import the model classes: the caller passes its class (`Llama4.from_pretrained(...)` passes
`Llama4`), so the import graph runs checkpoint, quant_modules <- loading <- model.

Quantize while loading (`Llama4.from_pretrained(path, quantize="int4")`, any scheme of
llama4_fast.quant.SCHEMES): each routed-expert stack is quantized on the target device as it
arrives (one expert at a time in fp32, `quant.quantize_weight`) and its full-precision copy
dropped before the next tensor is read, so the full-precision model never exists on the host
or the device. Peak memory: the quantized model plus one expert stack in the load dtype (and
its one expert in fp32) on the device, one tensor on the host. The routed experts are most of
Llama 4's weights; the rest stays in the load dtype, and `llama4_fast.quantize(model, scheme,
shared_expert=True, dense_ffn=True, attention=True)` afterwards quantizes it too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llama4_fast import checkpoint
from llama4_fast.checkpoint import (checkpoint_dir, language_model_parameters, meta_tensors, quantization_config,
                                    quantized_weights, stored_tensors, StoredTensor, _CASTABLE)
from llama4_fast.config import MODEL_DTYPES, Llama4Config, rope_inv_freq
from llama4_fast.kernels.quant_matmul import int4_group_size_args
from llama4_fast.quant import SCHEMES, check_int4_depth, quantize_weight
from llama4_fast.quant_modules import QuantExperts, QuantLinear, _is_experts, logical_shape


def model_dtype(dtype, cfg) -> torch.dtype:
    """The dtype a load computes in: `dtype` (a torch dtype or its name) or config.json's."""
    if dtype is None:
        return cfg.dtype()
    dtype = MODEL_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in MODEL_DTYPES.values():
        raise TypeError(f"dtype must be None, torch.float16, torch.bfloat16 or torch.float32 (or their names), "
                        f"got {dtype!r}")
    return dtype


def check_checkpoint(model_cls, path: str | Path, *, quantize: str | None = None, group_size: int = 128):
    """Check a checkpoint directory without reading any weight: the config
    (`Llama4Config.from_hf`), the files (`safetensors_files`), the tensor names
    (`stored_tensors`), then the whole load of a `model_cls` on meta tensors (shapes against
    the config, dtypes, quantized layouts, and what `quantize` needs: a scheme, INT4 groups
    that divide every expert's K). Returns (config, quantization_config or None, stored
    tensors). `load_pretrained` and the command line run it first."""
    return _checked(model_cls, path, quantize, group_size)[:3]


def _checked(model_cls, path, quantize, group_size):
    """check_checkpoint's result and the meta-device model the check built."""
    path = checkpoint_dir(path)
    cfg = Llama4Config.from_hf(path)
    qcfg = quantization_config(path)
    stored = stored_tensors(path)
    dry = meta_tensors(stored)
    model = build_model(model_cls, cfg, dry, quantized_weights(dry, qcfg) if qcfg else {}, str(path),
                        _origin(stored))
    if quantize is not None:
        if qcfg:
            raise ValueError(f"{path} is already quantized ({qcfg['quant_method']}): load it as stored "
                             "(quantize=None)")
        _check_quantize(model, quantize, group_size)
    return cfg, qcfg, stored, model


def _origin(stored: dict[str, StoredTensor]) -> dict[str, str]:
    return {name: t.file.name for name, t in stored.items()}


def load_pretrained(model_cls, path: str | Path, *, dtype=None, device: str | torch.device = "cpu",
                    quantize: str | None = None, group_size: int = 128):
    """`Llama4.from_pretrained`: config.json and the safetensors files of a directory, read
    only after `check_checkpoint` passed; with `quantize`, the routed experts are quantized
    while they stream in (module docstring)."""
    cfg, qcfg, stored, meta_model = _checked(model_cls, path, quantize, group_size)
    dtype = model_dtype(dtype, cfg)
    device = torch.device(device)
    if quantize is not None:
        experts = {name for name, module in meta_model.named_modules() if _is_experts(module)}
        return _load_quantizing(model_cls, cfg, stored, experts, dtype, device, quantize, group_size, str(path))
    params = checkpoint.load_tensors(stored, dtype=dtype, device=device)
    return build_model(model_cls, cfg, params, quantized_weights(params, qcfg) if qcfg else {}, str(path),
                       _origin(stored))


def _check_quantize(model, scheme: str, group_size: int):
    if scheme not in SCHEMES:
        raise ValueError(f"quantize must be one of {SCHEMES} or None, got {scheme!r}")
    if not scheme.startswith("int4"):
        return
    int4_group_size_args(group_size)
    for name, module in model.named_modules():
        if _is_experts(module):
            for attr in ("gate_up_proj", "down_proj"):
                check_int4_depth(f"{name}.{attr}", getattr(module, attr).shape[1], group_size)


def _load_quantizing(model_cls, cfg, stored, experts: set[str], dtype, device, scheme: str, group_size: int,
                     source: str):
    """Stream the tensors in; each stack of the routed-expert modules `experts` is quantized on
    `device` as it arrives and only its quantized form is kept. On any failure (a shard that
    cannot be read, Ctrl-C) everything read so far is released before the exception leaves."""
    params: dict[str, torch.Tensor] = {}
    formats: dict[str, dict[str, object]] = {}
    tensors = checkpoint.iter_tensors(stored, dtype=dtype, device=device)
    try:
        for name, t in tensors:
            module, _, attr = name.rpartition(".")
            if module in experts and attr in ("gate_up_proj", "down_proj"):
                formats.setdefault(module, {})[attr] = quantize_weight(t, scheme, group_size, name=name)
            else:
                params[name] = t
            del t  # the full-precision expert stack goes here, before the next one is read
        modules = {m: (f["gate_up_proj"], f["down_proj"]) for m, f in formats.items()}
        formats.clear()
        return build_model(model_cls, cfg, params, modules, source, _origin(stored))
    except BaseException:
        params.clear()  # the traceback keeps this frame: drop what it holds
        formats.clear()
        raise
    finally:
        tensors.close()


def from_hf_model(model_cls, hf_model):
    """`Llama4.from_hf`: the thin model sharing a loaded transformers Llama 4's parameters."""
    cfg = Llama4Config.from_hf(hf_model.config)
    params = language_model_parameters(hf_model)
    if "lm_head.weight" not in params and not cfg.tie_word_embeddings:
        raise ValueError(f"{type(hf_model).__name__} has no lm_head: pass the Llama4ForCausalLM or "
                         "Llama4ForConditionalGeneration that holds it")
    return build_model(model_cls, cfg, params, {}, type(hf_model).__name__)


def build_model(model_cls, cfg, params: dict[str, torch.Tensor], quantized: dict[str, object], source: str,
                origin: dict[str, str] | None = None):
    """A `model_cls(cfg)` with `params` (thin-model names) as its parameters, after the
    `quantized` weights (by module name: a format object for a linear, a (gate_up_proj,
    down_proj) pair for routed experts) replace its own modules. Everything is checked against the model
    the config describes (built on the meta device) before it is used: names, shapes, dtypes
    (floating; float8 only inside quantized modules). Errors list the first mismatches with
    the file each tensor came from (`origin`)."""
    with torch.device("meta"):
        model = model_cls(cfg)
    where = origin or {}
    modules = {name: QuantExperts(*w) if isinstance(w, tuple) else QuantLinear(w) for name, w in quantized.items()}

    def at(name):
        return f"{name} ({where[name]})" if name in where else name

    problems = []
    for name, module in modules.items():
        parent, _, attr = name.rpartition(".")
        own = getattr(model.get_submodule(parent), attr, None) if _has_module(model, parent) else None
        if not isinstance(own, torch.nn.Module):
            problems.append(f"quantized weights for {name}, which the model does not have")
            continue
        got, want = logical_shape(module), logical_shape(own)
        if got != want:
            problems.append(f"{name} holds {got}, the config implies {want}")
            continue
        setattr(model.get_submodule(parent), attr, module)
    if "lm_head.weight" not in params and cfg.tie_word_embeddings and "embed_tokens.weight" in params:
        params["lm_head.weight"] = params["embed_tokens.weight"]
    expected = dict(model.named_parameters())
    missing = sorted(expected.keys() - params.keys())
    unexpected = sorted(params.keys() - expected.keys())
    if missing:
        problems.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {[at(n) for n in unexpected[:8]]}{' ...' if len(unexpected) > 8 else ''}")
    for name in sorted(expected.keys() & params.keys()):
        t = params[name]
        if tuple(t.shape) != tuple(expected[name].shape):
            problems.append(f"{at(name)} is {list(t.shape)}, the config implies {list(expected[name].shape)}")
        elif t.dtype not in _CASTABLE:
            problems.append(f"{at(name)} is {str(t.dtype).replace('torch.', '')}: an unquantized weight must be "
                            "float16/bfloat16/float32" + (" (float8 weights need a quantization_config)"
                                                          if t.dtype == torch.float8_e4m3fn else ""))
    if problems:
        raise ValueError(f"weights from {source} do not match the config: " + "; ".join(problems[:8])
                         + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
    for name, tensor in params.items():
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr,
                tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor, requires_grad=False))
    model.inv_freq = rope_inv_freq(cfg).to(params["embed_tokens.weight"].device)
    return model.eval()


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
