"""Reading Llama 4 checkpoints: which files, which tensors (names, shapes, dtypes from the
headers alone), the tensors themselves one at a time, and quantized checkpoints' tensors as
format objects (llama4_fast.quant). Nothing here knows the model classes: llama4_fast.loading
puts what this module reads into a model.

Names are returned in the thin model's convention, which is transformers' Llama4TextModel
naming without the wrapper prefixes: `model.layers.0...` (Llama4ForCausalLM) and
`language_model.model.layers.0...` (Llama4ForConditionalGeneration) both become `layers.0...`;
`lm_head.weight` keeps its name. Vision-tower and projector weights are skipped.

Quantized checkpoints (config.json `quantization_config`) are read with their weights as
stored, no requantization (`quantized_weights`):
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

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llama4_fast.config import read_config_json, read_json_object
from llama4_fast.quant import Fp8Weight

logger = logging.getLogger("llama4_fast")

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


# Tensors of a checkpoint that are not the text model's and are skipped: the vision tower and its
# projector (multimodal checkpoints), and RoPE frequency buffers (recomputed from the config).
_SKIPPED_PARTS = ("vision_model.", "multi_modal_projector.")
_SKIPPED_SUFFIX = "rotary_emb.inv_freq"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# safetensors' dtype names; anything else (int8, unsigned, ...) is refused by `_from_parameters`.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    """One checkpoint tensor as its file header describes it (nothing read but the header)."""
    key: str            # the name in the file
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def checkpoint_dir(path: str | Path) -> Path:
    """`path` as a checkpoint directory, or a FileNotFoundError / NotADirectoryError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file: pass the checkpoint directory (config.json + safetensors)")
    return path


def safetensors_files(path: str | Path) -> dict[Path, set[str] | None]:
    """The weight files to read, each with the tensor names the index assigns to it (None: every
    tensor of the file). With an index only the files its weight_map names, else only
    model.safetensors; other *.safetensors files are never read (a warning lists them)."""
    path = checkpoint_dir(path)
    index = path / INDEX
    if index.exists():
        weight_map = read_json_object(index, "a sharded checkpoint holds it").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: weight_map must map tensor names to file names, "
                             f"got {type(weight_map).__name__}")
        files: dict[Path, set[str] | None] = {}
        for key, name in weight_map.items():
            files.setdefault(path / name, set()).add(key)
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names files that are not in {path}: {sorted(absent)[:8]}")
    elif (path / SINGLE).is_file():
        files = {path / SINGLE: None}
    else:
        found = sorted(f.name for f in path.glob("*.safetensors"))
        hint = f" (found {found[:8]}: which of them to read is what the index says)" if found else ""
        raise FileNotFoundError(f"{path} has neither {SINGLE} nor {INDEX}{hint}")
    ignored = sorted(f.name for f in path.glob("*.safetensors") if f not in files)
    if ignored:
        logger.warning("llama4_fast: %s: not reading %s (the %s names only %d file(s))", path, ignored,
                       INDEX if index.exists() else "checkpoint, without an index,", len(files))
    return files


def stored_tensors(path: str | Path) -> dict[str, StoredTensor]:
    """The text model's tensors of a checkpoint directory by thin-model name, from the file
    headers alone. Raises, naming the file and tensor, on: a tensor the index assigns to a file
    that lacks it, a tensor in a file the index does not assign there (or stored twice), and a
    tensor that is neither the text model's nor a known skipped kind (`_SKIPPED_PARTS`)."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, StoredTensor] = {}
    unknown = []
    for file, assigned in safetensors_files(path).items():
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = set(f.keys())
                headers = {k: f.get_slice(k) for k in keys}
                headers = {k: (tuple(h.get_shape()), h.get_dtype()) for k, h in headers.items()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
        if assigned is not None:
            if assigned - keys:
                raise ValueError(f"{file.name} lacks tensors that {INDEX} assigns to it: "
                                 f"{sorted(assigned - keys)[:8]}")
            if keys - assigned:
                raise ValueError(f"{file.name} holds tensors that {INDEX} does not assign to it (stale or stray "
                                 f"data): {sorted(keys - assigned)[:8]}")
        for key in sorted(keys):
            name = text_name(key)
            if name is None:
                if not (any(part in key for part in _SKIPPED_PARTS) or key.endswith(_SKIPPED_SUFFIX)):
                    unknown.append(f"{key} ({file.name})")
                continue
            if name in tensors:
                raise ValueError(f"{name} is stored twice: as {tensors[name].key} in {tensors[name].file.name} "
                                 f"and as {key} in {file.name}")
            shape, dtype = headers[key]
            if dtype not in _DTYPES:
                raise ValueError(f"{key} in {file.name} has dtype {dtype}, which no Llama 4 weight has")
            tensors[name] = StoredTensor(key, file, shape, _DTYPES[dtype])
    if unknown:
        raise ValueError(f"{path} holds tensors that are not Llama 4's: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    if not tensors:
        raise ValueError(f"{path} holds no Llama 4 text-model weights")
    return tensors


_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # never float8


def _is_scale(name: str) -> bool:
    return name.endswith(("_scale", "input_scale_ub"))


def meta_tensors(stored: dict[str, StoredTensor]) -> dict[str, torch.Tensor]:
    """Meta-device stand-ins of the stored tensors: the loading code runs on these first, so
    every name, shape and dtype is checked before any memory is allocated."""
    return {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in stored.items()}


def iter_tensors(stored: dict[str, StoredTensor], *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu"):
    """Yield (name, tensor) for the stored tensors, read one at a time (memory-mapped, file by
    file) onto `device`, floating ones (not float8, not scales) cast to `dtype` if given. The
    caller holds what it keeps; this holds one tensor. A file that fails to read (truncated,
    replaced, gone since its header was read) raises ValueError naming it and the tensor."""
    from safetensors import SafetensorError, safe_open

    by_file: dict[Path, list[str]] = {}
    for name, t in stored.items():
        by_file.setdefault(t.file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in names:
                    t = f.get_tensor(stored[name].key)
                    if tuple(t.shape) != stored[name].shape or t.dtype != stored[name].dtype:
                        raise ValueError(f"{file}: {stored[name].key} changed since its header was read")
                    if dtype is not None and t.dtype in _CASTABLE and t.dtype != dtype and not _is_scale(name):
                        t = t.to(dtype)
                    yield name, t
                    del t
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} could not be read ({type(e).__name__}: {e}); the load was abandoned "
                             "and nothing of it is kept") from None


def load_tensors(stored: dict[str, StoredTensor], *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every stored tensor (`iter_tensors`) in one dict: peak memory is the model plus one tensor."""
    return dict(iter_tensors(stored, dtype=dtype, device=device))


# ----------------------------------------------------------------------------------------------
# quantized checkpoints
# ----------------------------------------------------------------------------------------------

QUANT_METHODS = ("fbgemm_fp8", "compressed-tensors")


def quantization_config(path: str | Path) -> dict | None:
    """config.json's `quantization_config` (top level, or under text_config), or None."""
    cfg = read_config_json(path)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    qcfg = cfg.get("quantization_config") or text.get("quantization_config")
    if qcfg is None:
        return None
    if not isinstance(qcfg, dict):
        raise ValueError(f"{path}: quantization_config must be a JSON object, got {type(qcfg).__name__}")
    method = qcfg.get("quant_method")
    if method not in QUANT_METHODS:
        raise ValueError(f"{path}: quantization method {method!r} is not supported (supported: {QUANT_METHODS})")
    if method == "fbgemm_fp8":
        ub = qcfg.get("activation_scale_ub")
        if ub is not None and (isinstance(ub, bool) or not isinstance(ub, (int, float)) or not 0 < ub < float("inf")):
            raise ValueError(f"{path}: quantization_config.activation_scale_ub must be a positive number, got {ub!r}")
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


def _take(params: dict[str, torch.Tensor], key: str, owner: str) -> torch.Tensor:
    if key not in params:
        raise ValueError(f"the float8 weight {owner} has no {key.rpartition('.')[2]} tensor ({key})")
    return params.pop(key)


def _fp8_scale(scale: torch.Tensor, lead: tuple[int, ...], n: int, name: str) -> tuple[torch.Tensor, str]:
    """A stored FP8 scale ([*lead, N, 1], [*lead, 1, N], [*lead, N] per channel; one value per
    tensor or expert) as (float32 [*lead, N] or [*lead, 1], granularity)."""
    count = math.prod(lead)
    if scale.numel() in (1, count):
        return scale.float().reshape(-1, 1).expand(count, 1).reshape(*lead, 1).contiguous(), "tensor"
    if scale.numel() != count * n:
        raise ValueError(f"{name}: {list(scale.shape)} is neither one scale per output channel ({n}) nor one "
                         f"per tensor")
    return scale.float().reshape(*lead, n), "channel"


def quantized_weights(params: dict[str, torch.Tensor], qcfg: dict) -> dict[str, object]:
    """Pop the quantized tensors out of `params` (thin-model names) and return them as format
    objects in the checkpoint's own layout and scales, by module name: an Fp8Weight [K, N] for
    a linear, a (gate_up_proj, down_proj) pair of Fp8Weights for routed experts. Runs on meta
    tensors too (`meta_tensors`), which is how a load checks them first."""

    ub = qcfg.get("activation_scale_ub") if qcfg["quant_method"] == "fbgemm_fp8" else None

    def fp8(q, scale, n, name):
        scale, granularity = _fp8_scale(scale, tuple(q.shape[:-2]), n, name)
        return Fp8Weight(q, scale, granularity, ub)

    modules = {}
    fp8_names = [k for k, t in params.items() if t.dtype == torch.float8_e4m3fn]
    stacked: dict[str, dict[str, object]] = {}
    unrolled: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in fp8_names:
        q = params.pop(name)
        module, _, attr = name.rpartition(".")
        if attr in ("gate_up_proj", "down_proj"):  # fbgemm experts [E, K, N]
            if q.dim() != 3:
                raise ValueError(f"{name}: float8 experts must be [E, K, N], got {list(q.shape)}")
            stacked.setdefault(module, {})[attr] = fp8(q, _take(params, name + "_scale", name), q.shape[-1],
                                                       name + "_scale")
            continue
        if attr != "weight" or q.dim() != 2:
            raise ValueError(f"unexpected float8 tensor {name} {list(q.shape)}: float8 weights are linear [N, K] "
                             "weights or fbgemm experts")
        scale = _take(params, module + ".weight_scale", name)
        params.pop(module + ".input_scale", None)
        parts = module.split(".")
        if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():  # experts.<e>.<proj>
            unrolled.setdefault(".".join(parts[:-2]), {}).setdefault(int(parts[-2]), {})[parts[-1]] = (q, scale)
            continue
        modules[module] = fp8(q.t(), scale, q.shape[0], module + ".weight_scale")
    for module, weights in stacked.items():
        if set(weights) != {"gate_up_proj", "down_proj"}:
            raise ValueError(f"{module}: float8 experts need both gate_up_proj and down_proj, got {sorted(weights)}")
        modules[module] = (weights["gate_up_proj"], weights["down_proj"])
    for module, experts in unrolled.items():
        modules[module] = _stack_unrolled(module, experts, ub)
    return modules


def _stack_unrolled(module: str, experts: dict[int, dict[str, tuple]], ub):
    """compressed-tensors' per-expert linears `experts.<e>.{gate,up,down}_proj` ([I, H], [I, H],
    [H, I] e4m3 + per-row or per-tensor scales) stacked into one (gate_up_proj, down_proj) pair."""

    E = len(experts)
    if sorted(experts) != list(range(E)) or any(set(v) != {"gate_proj", "up_proj", "down_proj"}
                                                for v in experts.values()):
        raise ValueError(f"{module}: unrolled experts must be 0..E-1, each with gate_proj, up_proj, down_proj")
    shapes = {proj: experts[0][proj][0].shape for proj in ("gate_proj", "up_proj", "down_proj")}
    inter, hidden = shapes["gate_proj"]
    if shapes["up_proj"] != (inter, hidden) or shapes["down_proj"] != (hidden, inter):
        raise ValueError(f"{module}: expert 0's gate/up/down are {[list(s) for s in shapes.values()]}, not "
                         "[I, H], [I, H], [H, I]")

    def rows(e, proj):  # the weight [N, K] and its per-row scale [N]
        q, scale = experts[e][proj]
        if q.shape != shapes[proj]:
            raise ValueError(f"{module}.{e}.{proj}.weight is {list(q.shape)}, expert 0's is {list(shapes[proj])}")
        if scale.numel() not in (1, q.shape[0]):
            raise ValueError(f"{module}.{e}.{proj}.weight_scale {list(scale.shape)} is neither per row nor per tensor")
        return q, scale.float().reshape(-1).expand(q.shape[0])

    # per expert: gate/up [I, H] -> gate_up storage [2I, H]; down [H, I]. Both stay
    # K-contiguous, viewed as transformers' [E, K, N]; per-tensor scales become per-row.
    gu = torch.stack([torch.cat([rows(e, "gate_proj")[0], rows(e, "up_proj")[0]]) for e in range(E)])
    gu_s = torch.stack([torch.cat([rows(e, "gate_proj")[1], rows(e, "up_proj")[1]]) for e in range(E)])
    down = torch.stack([rows(e, "down_proj")[0] for e in range(E)])
    down_s = torch.stack([rows(e, "down_proj")[1] for e in range(E)])
    return (Fp8Weight(gu.transpose(1, 2), gu_s, "channel", ub),
            Fp8Weight(down.transpose(1, 2), down_s.contiguous(), "channel", ub))
