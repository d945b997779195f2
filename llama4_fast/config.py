"""Llama 4 text-model configuration, read from a transformers-style config.

Accepts the text config itself (`model_type: llama4_text`) or a multimodal config holding it
under `text_config`, as a dict, a config.json path, or a transformers config object; fills the
defaults transformers fills (NoPE every 4th layer, MoE layers, layer types). Everything is
checked when the config is made: a field that sets a weight's shape must be stated, and every
value must be in range, so a bad config.json fails here, naming the file and the field, rather
than as a shape mismatch (or a silent default) further on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Llama4Config:
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # routed and shared experts
    intermediate_size_mlp: int = 16384  # dense FFN layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: list[int] | None = None  # None: every layer
    no_rope_layers: list[int] | None = None  # 1 = RoPE (chunked) layer, 0 = NoPE (global); None: every 4th NoPE
    use_qk_norm: bool = True
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None

    def __post_init__(self):
        n = self.num_hidden_layers
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:  # defaults as transformers fills them
            if not self.no_rope_layers:  # None or empty, as transformers reads it
                self.no_rope_layers = [int((i + 1) % 4 != 0) for i in range(n)]
            if self.moe_layers is None:
                self.moe_layers = list(range(n))
        self.validate()

    @classmethod
    def from_hf(cls, source) -> "Llama4Config":
        """From a config.json path (the file or its directory), a dict, or a transformers config
        (text or multimodal). A file or dict must state every field that sets a weight's shape
        (`REQUIRED`); the rest take transformers' defaults. Raises ValueError naming the file
        (or "config") and the field for anything missing, mistyped or out of range."""
        where = "config"
        if isinstance(source, (str, Path)):
            source, where = read_config_json(source), str(_config_file(source))
        elif not isinstance(source, dict):
            source = source.to_dict()
        outer = source
        if "text_config" in source:
            source = source["text_config"]
            if not isinstance(source, dict):
                raise ValueError(f"{where}: text_config must be a JSON object, got {type(source).__name__}")
        missing = [k for k in REQUIRED if k not in source]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (required: they set the weights' shapes)")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in source.items() if k in known and v is not None}
        if "attention_chunk_size" in source and source["attention_chunk_size"] is None:
            kwargs["attention_chunk_size"] = None  # stated as none: every layer attends globally
        if kwargs.get("num_key_value_heads") is None:  # stated as null: as many as query heads (transformers)
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = _div(kwargs["hidden_size"], kwargs["num_attention_heads"])
        rope = source.get("rope_parameters")  # transformers 5 folds theta and scaling in here
        if isinstance(rope, dict):
            kwargs.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
            if rope.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = rope
        if "torch_dtype" not in kwargs:  # a multimodal config keeps the dtype at its top level
            dtype = next((c[k] for c in (source, outer) for k in ("dtype", "torch_dtype") if c.get(k)), None)
            if dtype is not None:
                kwargs["torch_dtype"] = dtype
        if isinstance(kwargs.get("torch_dtype"), torch.dtype):
            kwargs["torch_dtype"] = str(kwargs["torch_dtype"]).replace("torch.", "")
        for key, default in (("no_rope_layer_interval", 4), ("interleave_moe_layer_step", 1)):
            _check(where, key, source.get(key, default), lambda v: _is_int(v) and v >= 1, "a positive int")
        n = kwargs["num_hidden_layers"]
        if _is_int(n) and not kwargs.get("no_rope_layers"):
            interval = source.get("no_rope_layer_interval", 4)
            kwargs["no_rope_layers"] = [int((i + 1) % interval != 0) for i in range(n)]
        if _is_int(n) and source.get("moe_layers") is None:
            step = source.get("interleave_moe_layer_step", 1)
            kwargs["moe_layers"] = list(range(step - 1, n, step))
        for key, supported in (("hidden_act", "silu"), ("attention_bias", False)):
            if source.get(key, supported) != supported:
                raise ValueError(f"{where}: {key}={source[key]!r} is not supported (Llama 4 uses {supported!r})")
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def validate(self):
        """Raise ValueError naming the first field out of range (see `from_hf`)."""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                    "num_experts_per_tok"):
            _check(None, key, getattr(self, key), lambda v: _is_int(v) and v >= 1, "a positive int")
        n = self.num_hidden_layers
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_local_experts="
                             f"{self.num_local_experts}")
        _check(None, "moe_layers", self.moe_layers,
               lambda v: isinstance(v, list) and all(_is_int(i) and 0 <= i < n for i in v), f"a list of layers < {n}")
        _check(None, "no_rope_layers", self.no_rope_layers,
               lambda v: isinstance(v, list) and len(v) >= n and all(i in (0, 1) for i in v),
               f"a list of at least {n} zeros and ones")
        _check(None, "attention_chunk_size", self.attention_chunk_size, lambda v: v is None or (_is_int(v) and v >= 1),
               "a positive int or null")
        for key in ("rms_norm_eps", "rope_theta", "floor_scale"):
            _check(None, key, getattr(self, key), lambda v: _is_real(v) and 0 < v < math.inf, "a positive number")
        _check(None, "attn_scale", self.attn_scale, lambda v: _is_real(v) and math.isfinite(v), "a finite number")
        _check(None, "dtype", self.torch_dtype, lambda v: v is None or v in MODEL_DTYPES,
               f"null or one of {sorted(MODEL_DTYPES)}")
        _check(None, "eos_token_id", self.eos_token_id,
               lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(_is_int(i) for i in v)),
               "an id, a list of ids or null")
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, llama3)")
        if kind == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                _check(None, f"rope_scaling.{key}", scaling.get(key), lambda v: _is_real(v) and 0 < v < math.inf,
                       "a positive number")

    def is_chunked(self, layer: int) -> bool:
        """RoPE layers attend within chunks; NoPE layers are global causal."""
        return bool(self.no_rope_layers[layer]) and self.attention_chunk_size is not None

    def dtype(self, default=torch.bfloat16) -> torch.dtype:
        return MODEL_DTYPES[self.torch_dtype] if self.torch_dtype is not None else default


# Fields a config.json must state: each sets the shape of some weight, so a default here would
# meet the checkpoint's tensors as a shape mismatch far from its cause.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok")
# The model dtypes a config may name (what the thin model computes in).
MODEL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _config_file(path) -> Path:
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def read_config_json(path) -> dict:
    """The JSON object in `path` (config.json, or a directory holding it); errors name the file."""
    return read_json_object(_config_file(path), "a checkpoint directory holds config.json")


def read_json_object(file: Path, where_from: str) -> dict:
    """The JSON object in `file`: FileNotFoundError (with `where_from`, the file's usual
    origin) or ValueError naming the file when it is missing, not JSON, or not an object."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file ({where_from})")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got a {type(data).__name__}")
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _div(a, b):
    return a // b if _is_int(a) and _is_int(b) and b > 0 else None


def _check(where, key, value, ok, expected: str):
    if not ok(value):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{key} must be {expected}, got {value!r}")


def rope_inv_freq(cfg: Llama4Config) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim/2] float32, with Llama 3-style scaling if configured."""
    dim = cfg.head_dim
    # float32 throughout, as transformers computes it, so positions rotate identically
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        if high != low:  # a smooth ramp between the two wavelengths
            smooth = (old_len / wavelen - low) / (high - low)
            ramp = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
            scaled = torch.where(medium, ramp, scaled)
        inv_freq = scaled
    return inv_freq
