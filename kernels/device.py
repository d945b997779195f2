"""What the launchers ask of the device they plan a launch for: its SM count, and whether
Hopper's tensor memory accelerator (TMA) and programmatic dependent launch (PDL) are there."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None for any other device (the Triton
    interpreter runs programs one after another, so each launcher picks its own stand-in)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def descriptor_class():
    """triton.tools.tensor_descriptor.TensorDescriptor (host-side TMA descriptors), or None on
    a triton without it (before 3.4)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def tma_layout_ok(*tensors: torch.Tensor) -> bool:
    """Whether the copy engine can address every tensor: not empty, unit stride in the last
    dimension, the base address and every other stride a multiple of 16 bytes."""
    for t in tensors:
        size = t.element_size()
        if t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return False
    return True


def tma_unavailable(*tensors: torch.Tensor) -> str | None:
    """Why TMA descriptors cannot read these tensors here (a CUDA device before Hopper, a triton
    without host-side descriptors, a layout tma_layout_ok refuses), or None when they can. The
    interpreter runs descriptors on CPU tensors."""
    if any(t.is_cuda and not _hopper(t.device) for t in tensors):
        return "a GPU before Hopper (sm90)"
    if descriptor_class() is None:
        return f"triton {triton.__version__} has no host-side TensorDescriptor"
    if not tma_layout_ok(*tensors):
        return "a layout TMA cannot address (tma_layout_ok)"
    return None


def tensor_descriptor(t: torch.Tensor, block: list[int]):
    """A host-side TMA descriptor over all of t in blocks of `block` (loads past t's edges read
    zeros), or None where `tma_unavailable` says why not."""
    if tma_unavailable(t) is not None:
        return None
    return descriptor_class()(t, list(t.shape), list(t.stride()), block)


def supports_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: a Hopper GPU and a triton with grid dependency control
    (tl.extra.cuda.gdc_wait); never under the interpreter."""
    return _hopper(device) and hasattr(tl.extra.cuda, "gdc_wait")


def weight_descriptor(w: torch.Tensor, block_k: int, block_n: int):
    """(descriptor, transposed) for a weight read as logical [..., K, N] matrices (K: the rows
    one K step reads, e.g. packed INT4 byte rows) in [block_k, block_n] tiles, one leading index
    at a time: over w itself when N is contiguous, else over its [..., N, K] transpose when K is
    (nn.Linear-style storage; transposed=True, the kernel transposes the tile); (None, False)
    where neither can be read (`tensor_descriptor`)."""
    lead = [1] * (w.dim() - 2)
    if w.stride(-1) == 1:
        return tensor_descriptor(w, lead + [block_k, block_n]), False
    desc = tensor_descriptor(w.transpose(-1, -2), lead + [block_n, block_k])
    return desc, desc is not None
