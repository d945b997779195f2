"""Triton kernels for Llama 4 inference, installed as `llama4_fast.kernels`.

Plain torch tensors in and out (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
shapes are documented on each launcher. This package knows nothing of models or registries.
"""

from .attention import chunked_attention, chunked_attention_backward
from .moe import fused_moe
from .prologue import qk_prologue
from .quant_matmul import quant_matmul, quantize_fp8_activations
from .routing import route

__all__ = ["route", "fused_moe", "chunked_attention", "chunked_attention_backward", "qk_prologue", "quant_matmul",
           "quantize_fp8_activations"]
