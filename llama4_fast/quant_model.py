"""Quantize a Llama 4 (the thin model or a patched transformers one), and save / load it.

    llama4_fast.quantize(model, "int4")                      # routed experts, group 128
    llama4_fast.quantize(model, "fp8", shared_expert=True, dense_ffn=True, attention=True)
    llama4_fast.save_quantized(model, "out/")                # model.safetensors + quantization.json
    llama4_fast.load_quantized(model, "out/")                # same architecture, any weights

Schemes (formats: llama4_fast.quant): "fp8" (per-channel e4m3 weights, per-token activations),
"fp8_tensor" (one weight scale per tensor / expert), "fp8_block" (128x128 weight blocks, 1x128
activation groups), "int4" (symmetric group-wise, -8..7), "int4_asym" (group-wise with zero
points). Quantized modules replace the originals in place; experts are quantized one expert at
a time, so the fp32 working copy is one expert.

Which weights: the routed experts always; the shared expert's, the dense FFN layers' and the
attention projections' nn.Linear layers when asked. The router and lm_head stay as they are.

All or nothing (llama4_fast.transaction): `quantize` and `load_quantized` check everything they
can before the first change, then swap modules and parameters through one undo log, so a call
that fails (a NaN weight, a manifest that does not match, Ctrl-C) leaves the model exactly as
it was. The replaced full-precision modules are therefore freed when the call completes: peak
memory is the model plus its quantized copy (plus one expert's fp32 working copy).
Experts become `QuantExperts`, whose `gate_up_proj` / `down_proj` are format objects that the
MoE forwards (thin model, and transformers' once patched) hand to `ops.fused_moe`; linears
become `QuantLinear` (`ops.quant_linear`). A transformers model is patched first
(`llama4_fast.patch`): its own expert forward cannot read quantized weights, so do not unpatch it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from llama4_fast.config import read_json_object
from llama4_fast.kernels import checks
from llama4_fast.kernels.quant_matmul import int4_group_size_args
from llama4_fast.quant import GRANULARITIES, SCHEMES, Fp8Weight, Int4Weight, check_int4_depth, quantize_weight
from llama4_fast.quant_modules import QuantExperts, QuantLinear, _is_experts, _QuantModule, logical_shape, scheme_of
from llama4_fast.transaction import Changes, all_or_nothing

MANIFEST = "quantization.json"


# ----------------------------------------------------------------------------------------------
# which modules
# ----------------------------------------------------------------------------------------------

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
    if scheme.startswith("int4"):
        for what, K in depths.items():
            check_int4_depth(f"{name}.{what}", K, group_size)


def _check_model(model: nn.Module) -> bool:
    """Check that `model` is a thin Llama4 or a transformers Llama 4 with real (not meta)
    weights; returns True for a transformers model (which gets patched)."""
    from llama4_fast.model import Llama4

    if not isinstance(model, Llama4):
        from llama4_fast import hf_patch

        m = hf_patch.llama4_classes()
        if not isinstance(model, (m.Llama4ForCausalLM, m.Llama4TextModel, m.Llama4ForConditionalGeneration)):
            raise TypeError(f"model must be a llama4_fast.Llama4 or a transformers Llama 4, got {type(model).__name__}")
    meta = next((name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"model holds weights on the meta device ({meta}): load its weights first")
    return not isinstance(model, Llama4)


@contextlib.contextmanager
def _patched_if_transformers(model: nn.Module, is_transformers: bool):
    """Patch a transformers model (its own expert forward cannot read quantized weights) for the
    block; if the block fails and the patch was ours, unpatch again."""
    from llama4_fast import hf_patch

    ours = is_transformers and not hf_patch.is_patched(model)
    if ours:
        hf_patch.patch(model)
    try:
        yield
    except BaseException:
        if ours:
            hf_patch.unpatch(model)
        raise


@torch.no_grad()
def quantize(model: nn.Module, scheme: str, group_size: int = 128, *, shared_expert: bool = False,
             dense_ffn: bool = False, attention: bool = False, act_scale_ub: float | None = None) -> nn.Module:
    """Quantize `model` in place and return it (see the module docstring for schemes and modules).

    group_size: INT4 rows of K per scale (power of two >= 32 dividing every K).
    act_scale_ub: FP8 only, upper bound on a token's activation amax (fbgemm_fp8 uses 1200).

    All or nothing: everything is checked first (arguments, every target module, a model
    already quantized in another scheme, meta weights); a failure after that (a weight holding
    NaN, an interrupt) restores the model exactly. Quantizing again in the same scheme only
    adds what was not quantized yet.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if act_scale_ub is not None and not scheme.startswith("fp8"):
        raise ValueError("act_scale_ub applies to the fp8 schemes only")
    act_scale_ub = checks.scale_bound("act_scale_ub", act_scale_ub)
    if scheme.startswith("int4"):
        int4_group_size_args(group_size)
    is_transformers = _check_model(model)
    others = sorted({f"{scheme_of(m)} ({name})" for name, m in model.named_modules()
                     if isinstance(m, _QuantModule) and scheme_of(m) != scheme})
    if others:
        raise ValueError(f"model is already quantized in another scheme: {others[:4]}; quantize a full-precision "
                         f"model to {scheme!r} instead")
    wanted = {"shared_expert": shared_expert, "dense_ffn": dense_ffn, "attention": attention}
    targets = [name for name, module in model.named_modules()
               if (_is_experts(module) and not isinstance(module, QuantExperts))
               or (type(module) is nn.Linear and wanted.get(_linear_role(name)))]  # transformers' router: a subclass
    for name in targets:
        _check_target(name, model.get_submodule(name), scheme, group_size)
    with _patched_if_transformers(model, is_transformers), all_or_nothing() as changes:
        for name in targets:
            module = model.get_submodule(name)
            if isinstance(module, nn.Linear):
                new = QuantLinear(quantize_weight(module.weight.t(), scheme, group_size, act_scale_ub,
                                                  name=f"{name}.weight"))
            else:
                new = QuantExperts(*(quantize_weight(getattr(module, w), scheme, group_size, act_scale_ub,
                                                     name=f"{name}.{w}") for w in ("gate_up_proj", "down_proj")))
            _replace(changes, model, name, new)
    return model


def _replace(changes: Changes, model: nn.Module, name: str, new: nn.Module):
    parent_name, _, attr = name.rpartition(".")
    changes.set(model.get_submodule(parent_name) if parent_name else model, attr, new)


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------

def save_quantized(model: nn.Module, path: str | Path):
    """Write the whole state dict as `model.safetensors` and the quantized modules' formats as
    `quantization.json` under the directory `path` (replacing what a directory held)."""
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
    # Written beside, then renamed: an interrupted save leaves no manifest (a clear error on
    # load), never a manifest that belongs to other tensors.
    manifest = {"format": "llama4_fast", "modules": formats, "transposed": transposed}
    save_file(tensors, str(path / "model.safetensors.partial"))
    (path / (MANIFEST + ".partial")).write_text(json.dumps(manifest, indent=1) + "\n")
    (path / MANIFEST).unlink(missing_ok=True)
    os.replace(path / "model.safetensors.partial", path / "model.safetensors")
    os.replace(path / (MANIFEST + ".partial"), path / MANIFEST)


@torch.no_grad()
def load_quantized(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a directory written by `save_quantized` into `model` (the same architecture, full
    precision or already quantized alike): modules listed in quantization.json are replaced by
    quantized ones built from the stored tensors, and every other parameter and buffer by the
    stored one (cast to the dtype and device it has in the model; tied weights stay tied).

    All or nothing: the manifest, every stored tensor's name and shape and every format are
    checked against the model before anything changes, and the changes are assignments through
    one undo log, so a failure leaves the model exactly as it was (unpatched, too)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = _read_manifest(path)
    is_transformers = _check_model(model)
    device = next(model.parameters()).device
    file = path / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (save_quantized writes it beside {MANIFEST})")
    try:
        state = load_file(str(file), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
    for k in manifest["transposed"]:
        if k not in state or state[k].dim() < 2:
            raise ValueError(f"{path / MANIFEST} lists {k} as transposed, but {file.name} has no such matrix")
        state[k] = state[k].transpose(-1, -2)
    new_modules = {name: _stored_module(model, name, entry, state, path) for name, entry in manifest["modules"].items()}
    used = {f"{name}.{key}" for name, module in new_modules.items() for key in module.state_dict()}
    params = _stored_parameters(model, set(new_modules), {k: v for k, v in state.items() if k not in used}, path)
    with _patched_if_transformers(model, is_transformers), all_or_nothing() as changes:
        for name, module in new_modules.items():
            _replace(changes, model, name, module)
        for owners, value in params:
            for module, attr in owners:
                changes.set(module, attr, value)
    return model


def _read_manifest(path: Path) -> dict:
    """quantization.json, checked: format, module kinds, weight formats (errors name the file)."""
    file = path / MANIFEST
    manifest = read_json_object(file, "a directory written by save_quantized holds it")
    if manifest.get("format") != "llama4_fast" or not isinstance(manifest.get("modules"), dict):
        raise ValueError(f"{file} is not a llama4_fast manifest (format 'llama4_fast' with a modules table)")
    manifest.setdefault("transposed", [])
    if not isinstance(manifest["transposed"], list) or not all(isinstance(k, str) for k in manifest["transposed"]):
        raise ValueError(f"{file}: transposed must be a list of tensor names")
    prefixes = {"QuantLinear": {""}, "QuantExperts": {"gate_up_", "down_"}}
    for name, entry in manifest["modules"].items():
        kind = entry.get("module") if isinstance(entry, dict) else None
        formats = entry.get("formats") if isinstance(entry, dict) else None
        if kind not in prefixes or not isinstance(formats, dict) or set(formats) != prefixes[kind]:
            raise ValueError(f"{file}: module {name!r} must be a QuantLinear (format '') or QuantExperts (formats "
                             f"'gate_up_', 'down_'), got {entry!r}")
        for prefix, spec in formats.items():
            _check_spec(spec, f"{file}: {name}.{prefix or 'weight'}")
    return manifest


def _check_spec(spec, where: str):
    if not isinstance(spec, dict) or spec.get("kind") not in ("fp8", "int4"):
        raise ValueError(f"{where}: format must be {{'kind': 'fp8' | 'int4', ...}}, got {spec!r}")
    if spec["kind"] == "fp8":
        if spec.get("granularity") not in GRANULARITIES:
            raise ValueError(f"{where}: fp8 granularity must be one of {GRANULARITIES}, "
                             f"got {spec.get('granularity')!r}")
        checks.scale_bound(f"{where}: act_scale_ub", spec.get("act_scale_ub"))
    else:
        try:
            int4_group_size_args(spec.get("group_size"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _stored_module(model: nn.Module, name: str, entry: dict, state: dict, path: Path) -> "_QuantModule":
    """The quantized module `entry` describes, from the stored tensors, checked against the
    module of the model it replaces (same kind, same logical shape)."""
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{path / MANIFEST} lists {name}, which the model does not have") from None
    weights = {}
    for prefix, spec in entry["formats"].items():
        t = {suffix: state.get(f"{name}.{prefix}{suffix}") for suffix in ("qweight", "scale", "zero")}
        if t["qweight"] is None or t["scale"] is None:
            raise ValueError(f"{path / 'model.safetensors'} lacks {name}.{prefix}qweight / scale")
        try:
            if spec["kind"] == "fp8":
                weights[prefix] = Fp8Weight(t["qweight"], t["scale"], spec["granularity"], spec.get("act_scale_ub"))
            else:
                weights[prefix] = Int4Weight(t["qweight"], t["scale"], t["zero"], spec["group_size"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {name}.{prefix or 'weight'} does not match its format {spec}: {e}") from None
    new = QuantLinear(weights[""]) if entry["module"] == "QuantLinear" else \
        QuantExperts(weights["gate_up_"], weights["down_"])
    if logical_shape(new) != logical_shape(current):
        raise ValueError(f"{path}: {name} holds {entry['module']} weights {logical_shape(new)}; the model's {name} "
                         f"is {type(current).__name__} {logical_shape(current)}")
    return new.to(next(iter(current.state_dict().values())).device)


def _stored_parameters(model: nn.Module, replaced: set[str], state: dict, path: Path):
    """Every parameter and persistent buffer of the model outside the `replaced` modules, as
    [(owners [(module, attribute)], new value)] from `state`: one entry per tensor object,
    so tied weights get one new value (the stored copies must agree). Checks that the names
    match exactly and the shapes agree; values take the dtype and device the model has."""
    def outside(key):
        return not any(key == r or key.startswith(r + ".") for r in replaced)

    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if outside(k)}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    bad = [f"{k} {list(state[k].shape)} vs the model's {list(v.shape)}" for k, v in expected.items()
           if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path} does not match the model's shapes: {bad[:8]}")
    owners: dict[int, list] = {}
    first: dict[int, str] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        stores = (module._parameters, {k: b for k, b in module._buffers.items()
                                       if k not in module._non_persistent_buffers_set})
        for store in stores:
            for attr, t in store.items():
                key = f"{prefix}.{attr}" if prefix else attr
                if t is None or key not in expected:
                    continue
                if (module, attr) not in owners.setdefault(id(t), []):
                    owners[id(t)].append((module, attr))
                tied = first.setdefault(id(t), key)
                if tied != key and not torch.equal(state[key].to(state[tied].dtype), state[tied]):
                    raise ValueError(f"{path}: {key} and {tied} are one tied tensor in the model but "
                                     "differ in the file")
    result = []
    for tid, key in first.items():
        old = expected[key]
        value = state[key].to(dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        result.append((owners[tid], value))
    return result
