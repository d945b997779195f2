"""What the launchers ask of the device they plan a launch for."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None for any other device (the Triton
    interpreter runs programs one after another, so each launcher picks its own stand-in)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count
