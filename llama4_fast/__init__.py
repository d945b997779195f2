"""llama4-fast: Triton kernels for Llama 4 inference, a thin Llama 4 model, and a one-call
patch for Hugging Face transformers' Llama 4.

    import llama4_fast
    llama4_fast.patch(model)                 # a loaded transformers Llama 4, in place
    from llama4_fast.kernels import route, fused_moe, chunked_attention
    llama4_fast.ops.fused_moe(...)           # registry-dispatched op (torch or triton backend)
    llama4_fast.quantize(model, "int4")      # FP8 / INT4 experts (and optionally linears), in place
    llama4_fast.register_experts()           # then any transformers MoE model:
    AutoModelForCausalLM.from_pretrained(..., experts_implementation="llama4_fast")
"""

from llama4_fast import ops, registry
from llama4_fast.config import Llama4Config
from llama4_fast.experts import register_experts
from llama4_fast.hf_patch import patch, patch_llama4, unpatch, unpatch_llama4
from llama4_fast.planning import memory_plan
from llama4_fast.model import Llama4
from llama4_fast.quant_model import load_quantized, quantize, save_quantized

__version__ = "0.1.0"
__all__ = ["ops", "registry", "patch", "unpatch", "patch_llama4", "unpatch_llama4", "Llama4", "Llama4Config",
           "quantize", "save_quantized", "load_quantized", "memory_plan", "register_experts"]
