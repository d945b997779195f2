"""Llama 4 text-model configuration, read from a transformers-style config.

Accepts the text config itself (`model_type: llama4_text`) or a multimodal config holding it
under `text_config`, as a dict, a config.json path, or a transformers config object; fills the
defaults transformers fills (NoPE every 4th layer, MoE layers, layer types).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
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
    moe_layers: list[int] = field(default_factory=list)
    no_rope_layers: list[int] = field(default_factory=list)  # 1 = RoPE (chunked) layer, 0 = NoPE (global)
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

    @classmethod
    def from_hf(cls, source) -> "Llama4Config":
        """From a config.json path, a dict, or a transformers config (text or multimodal)."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            source = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        elif not isinstance(source, dict):
            source = source.to_dict()
        outer = source
        if "text_config" in source:
            source = source["text_config"]
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in source.items() if k in known and v is not None}
        if "attention_chunk_size" in source and source["attention_chunk_size"] is None:
            kwargs["attention_chunk_size"] = None  # stated as none: every layer attends globally
        rope = source.get("rope_parameters")  # transformers 5 folds theta and scaling in here
        if isinstance(rope, dict):
            kwargs.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
            if rope.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = rope
        if "torch_dtype" not in kwargs:  # a multimodal config keeps the dtype at its top level
            dtype = next((c[k] for c in (source, outer) for k in ("dtype", "torch_dtype") if c.get(k)), None)
            if dtype is not None:
                kwargs["torch_dtype"] = dtype
        cfg = cls(**kwargs)
        cfg._fill_defaults(source)
        return cfg

    def _fill_defaults(self, source: dict):
        n = self.num_hidden_layers
        if not self.no_rope_layers:
            interval = source.get("no_rope_layer_interval", 4)
            self.no_rope_layers = [int((i + 1) % interval != 0) for i in range(n)]
        if source.get("moe_layers") is None:
            step = source.get("interleave_moe_layer_step", 1)
            self.moe_layers = list(range(step - 1, n, step))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if len(self.no_rope_layers) < n:
            raise ValueError(f"no_rope_layers has {len(self.no_rope_layers)} entries for {n} layers")

    def is_chunked(self, layer: int) -> bool:
        """RoPE layers attend within chunks; NoPE layers are global causal."""
        return bool(self.no_rope_layers[layer]) and self.attention_chunk_size is not None

    def dtype(self, default=torch.bfloat16) -> torch.dtype:
        return getattr(torch, self.torch_dtype) if isinstance(self.torch_dtype, str) else default


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
    elif kind != "default":
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, llama3)")
    return inv_freq
