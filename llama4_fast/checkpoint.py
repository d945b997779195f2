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

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llama4_fast.config import MODEL_DTYPES, Llama4Config, read_config_json, read_json_object, rope_inv_freq

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


def load_tensors(stored: dict[str, StoredTensor], *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The stored tensors read one at a time onto `device`, floating ones (not float8, not
    scales) cast to `dtype` if given, so peak memory is the model plus one tensor."""
    from safetensors import safe_open

    tensors = {}
    by_file: dict[Path, list[str]] = {}
    for name, t in stored.items():
        by_file.setdefault(t.file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in names:
                t = f.get_tensor(stored[name].key)
                if dtype is not None and t.dtype in _CASTABLE and t.dtype != dtype and not _is_scale(name):
                    t = t.to(dtype)
                tensors[name] = t
    return tensors


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


def quantized_modules(params: dict[str, torch.Tensor], qcfg: dict) -> dict[str, torch.nn.Module]:
    """Pop the quantized tensors out of `params` (thin-model names) and return them as
    {module name: QuantLinear | QuantExperts}, in the checkpoint's own layout and scales.
    Runs on meta tensors too (`meta_tensors`), which is how a load checks them first."""
    from llama4_fast.quant import Fp8Weight
    from llama4_fast.quant_model import QuantExperts, QuantLinear

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
        modules[module] = QuantLinear(fp8(q.t(), scale, q.shape[0], module + ".weight_scale"))
    for module, weights in stacked.items():
        if set(weights) != {"gate_up_proj", "down_proj"}:
            raise ValueError(f"{module}: float8 experts need both gate_up_proj and down_proj, got {sorted(weights)}")
        modules[module] = QuantExperts(weights["gate_up_proj"], weights["down_proj"])
    for module, experts in unrolled.items():
        modules[module] = _stack_unrolled(module, experts, ub)
    return modules


def _stack_unrolled(module: str, experts: dict[int, dict[str, tuple]], ub):
    """compressed-tensors' per-expert linears `experts.<e>.{gate,up,down}_proj` ([I, H], [I, H],
    [H, I] e4m3 + per-row or per-tensor scales) stacked into one QuantExperts."""
    from llama4_fast.quant import Fp8Weight
    from llama4_fast.quant_model import QuantExperts

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
    return QuantExperts(Fp8Weight(gu.transpose(1, 2), gu_s, "channel", ub),
                        Fp8Weight(down.transpose(1, 2), down_s.contiguous(), "channel", ub))


# ----------------------------------------------------------------------------------------------
# building the thin model
# ----------------------------------------------------------------------------------------------

def model_dtype(dtype, cfg) -> torch.dtype:
    """The dtype a load computes in: `dtype` (a torch dtype or its name) or config.json's."""
    if dtype is None:
        return cfg.dtype()
    dtype = MODEL_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in MODEL_DTYPES.values():
        raise TypeError(f"dtype must be None, torch.float16, torch.bfloat16 or torch.float32 (or their names), "
                        f"got {dtype!r}")
    return dtype


def check_checkpoint(path: str | Path):
    """Check a checkpoint directory without reading any weight: the config
    (`Llama4Config.from_hf`), the files (`safetensors_files`), the tensor names
    (`stored_tensors`), then the whole load on meta tensors (shapes against the config,
    dtypes, quantized layouts). Returns (config, quantization_config or None, stored tensors).
    `load_pretrained` and the command line run it first."""
    path = checkpoint_dir(path)
    cfg = Llama4Config.from_hf(path)
    qcfg = quantization_config(path)
    stored = stored_tensors(path)
    dry = meta_tensors(stored)
    build_model(cfg, dry, quantized_modules(dry, qcfg) if qcfg else {}, str(path), _origin(stored))
    return cfg, qcfg, stored


def _origin(stored: dict[str, StoredTensor]) -> dict[str, str]:
    return {name: t.file.name for name, t in stored.items()}


def load_pretrained(path: str | Path, *, dtype=None, device: str | torch.device = "cpu"):
    """`Llama4.from_pretrained`: config.json and the safetensors files of a directory, read
    only after `check_checkpoint` passed."""
    cfg, qcfg, stored = check_checkpoint(path)
    dtype = model_dtype(dtype, cfg)
    params = load_tensors(stored, dtype=dtype, device=torch.device(device))
    return build_model(cfg, params, quantized_modules(params, qcfg) if qcfg else {}, str(path), _origin(stored))


def from_hf_model(hf_model):
    """`Llama4.from_hf`: the thin model sharing a loaded transformers Llama 4's parameters."""
    cfg = Llama4Config.from_hf(hf_model.config)
    params = language_model_parameters(hf_model)
    if "lm_head.weight" not in params and not cfg.tie_word_embeddings:
        raise ValueError(f"{type(hf_model).__name__} has no lm_head: pass the Llama4ForCausalLM or "
                         "Llama4ForConditionalGeneration that holds it")
    return build_model(cfg, params, {}, type(hf_model).__name__)


def build_model(cfg, params: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], source: str,
                origin: dict[str, str] | None = None):
    """The thin model with `params` (thin-model names) as its parameters, after `modules`
    (quantized ones, by module name) replace its own. Everything is checked against the model
    the config describes (built on the meta device) before it is used: names, shapes, dtypes
    (floating; float8 only inside quantized modules). Errors list the first mismatches with
    the file each tensor came from (`origin`)."""
    from llama4_fast.model import Llama4
    from llama4_fast.quant_model import logical_shape

    with torch.device("meta"):
        model = Llama4(cfg)
    where = origin or {}

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
