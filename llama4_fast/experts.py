"""`experts_implementation="llama4_fast"`: the experts of every transformers MoE model through
`ops.fused_moe`.

transformers 5.x dispatches the forward of each experts class decorated with
`@use_experts_implementation` (Mixtral, Qwen2/Qwen3-MoE, DeepSeek-V2/V3, OLMoE, GraniteMoE,
gpt-oss, ...) through its `ExpertsInterface`. `register_experts()` adds ours under the name
"llama4_fast", after which

    AutoModelForCausalLM.from_pretrained(model_id, experts_implementation="llama4_fast")
    AutoModelForCausalLM.from_config(config, experts_implementation="llama4_fast")
    model.set_experts_implementation("llama4_fast")

run the experts through the registry's fused_moe (Triton on CUDA, the torch reference elsewhere).
The call is explicit: `import llama4_fast` does not import transformers (seconds), and
`llama4_fast.patch` concerns Llama 4, whose experts the interface does not dispatch. It is
idempotent; transformers without the interface (4.57) gets a RuntimeError and nothing changes.

What a module declares maps onto fused_moe's options, the weights read in place (no copies):
- is_transposed=False, nn.Linear-style gate_up_proj [E, 2I, H] / down_proj [E, H, I]: their
  `.transpose(1, 2)` views, read through the strides; is_transposed=True: as they are.
- has_bias: gate_up_proj_bias [E, 2I] / down_proj_bias [E, H] as gate_up_bias / down_bias.
- the router weight multiplies the expert output (apply_router_weight_on_input=False).
- `_apply_gate`: transformers' default is act_fn(gate) * up with the concatenated [gate | up]
  columns, act_fn one of silu, gelu, gelu_tanh (recognised by type). gpt-oss's (read where it
  is defined, GptOssExperts) is clamped_swiglu=(limit, alpha) on interleaved columns
  (is_concatenated=False); OpenAIPrivacyFilterExperts' is the same gate on concatenated columns.
- expert parallelism (`_is_expert_parallel`): ids >= E are sentinels (skip_sentinel_ids).
Everything else falls back to transformers' grouped_mm forward, with one warning per experts
class and reason: has_gate=False, has_post_expert_norm, another act_fn or `_apply_gate`, a
declared layout the gate does not read, weights that are not plain float16/bfloat16/float32
tensors (quantized, tensor-parallel DTensors), and transformers' FP8 experts (registered on
its FP8 interface under the same name). The backward covers every option above, so training
never falls back.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch
import torch.nn.functional as F

from llama4_fast import ops

NAME = "llama4_fast"
logger = logging.getLogger("llama4_fast")
_warned: set[tuple[str, str]] = set()

# transformers' `_apply_gate` overrides that fused_moe computes as clamped_swiglu=(self.limit,
# self.alpha): (module, class) that defines the function -> whether it reads gate and up
# interleaved (gate_up[..., ::2], gate_up[..., 1::2]) rather than as [gate | up].
CLAMPED_SWIGLU_GATES = {
    ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts"): True,
    ("transformers.models.openai_privacy_filter.modeling_openai_privacy_filter", "OpenAIPrivacyFilterExperts"): False,
}
_DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def register_experts() -> None:
    """Register "llama4_fast" with transformers' ExpertsInterface (and, as a fallback to its
    grouped_mm, with the FP8 experts' interface). Idempotent."""
    try:
        from transformers.integrations import moe as hf_moe
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("llama4_fast.register_experts needs transformers >= 5 (pip install 'llama4-fast[hf]')") from e
    interface = getattr(hf_moe, "ExpertsInterface", None)
    if interface is None:
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} has no ExpertsInterface (added in 5.0): "
                           "experts_implementation='llama4_fast' needs transformers >= 5; nothing was registered")
    interface.register(NAME, experts_forward)
    try:
        from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    except ImportError:  # pragma: no cover - older 5.x
        return
    FP8ExpertsInterface.register(NAME, _fp8_experts_forward)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ExpertsInterface forward: hidden_states [T, H], top_k_index / top_k_weights [T, k]
    -> [T, H] in hidden_states' dtype."""
    options = _options(self)
    if isinstance(options, str):
        return _fallback(self, options, hidden_states, top_k_index, top_k_weights)
    w13, w2 = self.gate_up_proj, self.down_proj
    if not self.is_transposed:  # nn.Linear-style [E, 2I, H] / [E, H, I]: views, no copies
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    biases = (self.gate_up_proj_bias, self.down_proj_bias) if self.has_bias else (None, None)
    x, w13, w2, b13, b2 = _common_dtype(hidden_states, w13, w2, *biases)
    sentinels = bool(getattr(self, "_is_expert_parallel", False))  # ids >= E: another rank's experts
    out = ops.fused_moe(x, w13, w2, top_k_weights, top_k_index, apply_router_weight_on_input=False,
                        gate_up_bias=b13, down_bias=b2, skip_sentinel_ids=sentinels, **options)
    return out.to(hidden_states.dtype)


def _options(module) -> dict | str:
    """fused_moe's options for this experts module, or why it falls back to grouped_mm."""
    if not getattr(module, "has_gate", True):
        return "has_gate=False (an activation without a gate)"
    if getattr(module, "has_post_expert_norm", False):
        return "has_post_expert_norm=True"
    concatenated = getattr(module, "is_concatenated", True)
    gate = _gate(type(module))
    if isinstance(gate, str):
        return gate
    if gate is None:  # transformers' default: act_fn(gate) * up over [gate | up]
        if not concatenated:
            return "is_concatenated=False with transformers' default _apply_gate, which reads [gate | up]"
        activation = _activation(getattr(module, "act_fn", None))
        if activation is None:
            return f"act_fn {type(getattr(module, 'act_fn', None)).__name__}"
        options = {} if activation == "silu" else {"activation": activation}
    else:
        if gate != (not concatenated):
            return (f"is_concatenated={concatenated} while {type(module).__name__}._apply_gate reads gate and up "
                    f"{'interleaved' if gate else 'concatenated'}")
        options = {"clamped_swiglu": (float(module.limit), float(module.alpha))}
        if gate:
            options["gate_up_interleaved"] = True
    return _weights_problem(module) or options


def _weights_problem(module) -> str | None:
    """Why the module's weights cannot go to fused_moe as they are, or None."""
    names = ["gate_up_proj", "down_proj"] + (["gate_up_proj_bias", "down_proj_bias"] if module.has_bias else [])
    dtypes = set()
    for name in names:
        t = getattr(module, name, None)
        if type(t) not in (torch.Tensor, torch.nn.Parameter):  # quantized or tensor-parallel (DTensor) weights
            return f"{name} of type {type(t).__name__}"
        if t.dtype not in _DENSE_DTYPES:
            return f"{name} in {t.dtype}"
        dtypes.add(t.dtype)
    if len(dtypes) > 1:
        return f"weights of mixed dtypes {sorted(map(str, dtypes))}"
    return None


@functools.lru_cache(maxsize=None)
def _gate(cls) -> bool | str | None:
    """An experts class's `_apply_gate`: None for transformers' default, whether the gate reads
    interleaved columns for one of CLAMPED_SWIGLU_GATES, else why it falls back."""
    from transformers.integrations.moe import _default_apply_gate

    gate = getattr(cls, "_apply_gate", None)
    if gate is _default_apply_gate:
        return None
    for (module, cls_name), interleaved in CLAMPED_SWIGLU_GATES.items():
        try:
            known = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            continue
        if getattr(known, "_apply_gate", None) is gate:
            return interleaved
    return f"a custom _apply_gate ({getattr(gate, '__qualname__', gate)})"


def _activation(act) -> str | None:
    """fused_moe's name for the experts' act_fn (by exact type: a subclass may compute anything)."""
    from transformers import activations as hf

    kind = type(act)
    if act is F.silu or kind in (hf.SiLUActivation, torch.nn.SiLU):
        return "silu"
    if act is F.gelu or kind is hf.GELUActivation:  # torch's gelu, or its erf form in Python
        return "gelu"
    if kind in (hf.GELUTanh, hf.NewGELUActivation, hf.FastGELUActivation):  # the tanh approximation
        return "gelu_tanh"
    if kind is torch.nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return None


def _common_dtype(x, *weights):
    """Under torch.autocast the eager experts' matmuls run in the autocast dtype: cast x and the
    weights alike (differentiable casts); else x takes the weights' dtype, as grouped_mm does."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return (x.to(dtype), *(None if w is None else w.to(dtype) for w in weights))
    return (x.to(weights[0].dtype), *weights)


def _fallback(module, reason: str, hidden_states, top_k_index, top_k_weights):
    from transformers.integrations.moe import grouped_mm_experts_forward

    _warn_once(type(module), reason)
    return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)


def _fp8_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' FP8 experts under "llama4_fast": its own grouped_mm forward, with the warning."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS

    _warn_once(type(self), "transformers' FP8-quantized experts")
    return ALL_FP8_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)


def _warn_once(cls, reason: str):
    key = (f"{cls.__module__}.{cls.__qualname__}", reason)
    if key not in _warned:
        _warned.add(key)
        logger.warning("llama4_fast: %s falls back to transformers' grouped_mm experts: %s is not supported by "
                       "experts_implementation='llama4_fast'", cls.__name__, reason)
