"""Weights for the thin model: from safetensors directories or a loaded transformers model.

Names are returned in the thin model's convention, which is transformers' Llama4TextModel
naming without the wrapper prefixes: `model.layers.0...` (Llama4ForCausalLM) and
`language_model.model.layers.0...` (Llama4ForConditionalGeneration) both become `layers.0...`;
`lm_head.weight` keeps its name. Vision-tower and projector weights are skipped.
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
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                tensors[key] = t
    if not tensors:
        raise ValueError(f"{path} holds no Llama 4 text-model weights")
    return tensors
