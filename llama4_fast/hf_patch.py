"""Patch a Hugging Face transformers Llama 4 so its hot paths run through `llama4_fast.ops`.

    model = AutoModelForCausalLM.from_pretrained(...)
    llama4_fast.patch(model)      # in place; returns the model
    llama4_fast.unpatch(model)    # exactly as before

What is replaced, per module instance (the classes stay untouched unless `patch_llama4()`):
- Llama4TextMoe.forward: routed experts by `ops.fused_moe` over the selected experts only
  (transformers runs all experts on all tokens), shared expert as before. It still returns
  `(out, router_logits)`, so `output_router_logits` works.
- Llama4Router.forward: `ops.route` (sigmoid top-k); returns `((weights, ids), router_logits)`,
  keeping the logits at index 1 where transformers' output recorder reads them.
- Llama4TextRMSNorm / Llama4TextL2Norm.forward: `ops.rms_norm`.
- Attention: the text config's attention implementation becomes "llama4_fast", registered in
  transformers' attention interface and in its mask interface. The mask function does not
  build a dense mask: it returns a `MaskLayout` (key positions and chunk size) that the
  attention function hands to `ops.attention`. Without the mask registration transformers
  would skip mask creation for an unknown implementation, and chunked layers would silently
  lose their chunking. Static caches pass their whole buffer and the count of keys filled
  (`kv_len`). Patterns the layout cannot express (packed sequences,
  masks with holes, custom overlays) fall back, with a one-time warning, to a dense mask and
  transformers' own SDPA attention.
- Llama4TextAttention.forward: RoPE, the L2 qk-norm and the NoPE temperature in one
  `ops.qk_prologue` call; the projections, the cache update and the attention interface are
  transformers' own calls. A transformers release whose attention forward has another signature
  keeps its forward (with a warning).

Sharded models (docs/scaling.md): under `tp_plan="auto"` (transformers 5.x, torchrun) the
patched MoE runs the kernel on each rank's expert shards and all-reduces the partial output over
the TP group, as transformers does for its experts; the projections keep their TP hooks, and the
norms and attention see plain local tensors (the local heads). Under `device_map="auto"` modules
keep their accelerate hooks, and the patched MoE runs the experts' hook itself, so offloaded
experts are loaded for the kernel and offloaded again.

Quantized models: experts quantized by `llama4_fast.quantize` expose format objects that the
patched MoE forward passes on; a model loaded by transformers with `fbgemm_fp8` (Maverick FP8)
has its FbgemmFp8Llama4TextExperts and FbgemmFp8Linear weights wrapped, as stored, in
`llama4_fast.quant.Fp8Weight` at patch time (`ops.fused_moe` / `ops.quant_linear`), so the
fbgemm-gpu package is not needed.
"""

from __future__ import annotations

import inspect
import logging
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama4_fast import ops
from llama4_fast.transaction import Changes, all_or_nothing

logger = logging.getLogger("llama4_fast")
ATTN_IMPLEMENTATION = "llama4_fast"
SUPPORTED_TRANSFORMERS = "4.57.x and 5.x"
_warned: set[str] = set()  # one-time warnings already given


def _warn_once(key: str, message: str, *args):
    """logger.warning(message, *args) the first time `key` comes up in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


# -- version gate -------------------------------------------------------------------------------
def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("llama4_fast.patch needs transformers (pip install 'llama4-fast[hf]')") from e
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    if not (major == 5 or (major, minor) == (4, 57)):
        raise RuntimeError(f"llama4_fast.patch supports transformers {SUPPORTED_TRANSFORMERS}; "
                           f"found {transformers.__version__}")
    return transformers


def llama4_classes():
    """transformers' modeling_llama4 module (its Llama4* classes), after the version check."""
    _transformers()
    from transformers.models.llama4 import modeling_llama4 as m

    return m


# -- replacement forwards -----------------------------------------------------------------------
def _router_forward(self, hidden_states):
    logits = F.linear(hidden_states, self.weight, self.bias)
    return ops.route(logits, self.top_k, "sigmoid"), logits


def _moe_forward(self, hidden_states):
    x = hidden_states.reshape(-1, self.hidden_dim)
    (weights, ids), router_logits = self.router(x)
    routed = _routed_experts(self.experts, x, weights, ids)
    out = self.shared_expert(x)
    out.add_(routed)
    return out, router_logits


def _routed_experts(experts, x, weights, ids):
    """`ops.fused_moe` on the experts as this process holds them. The patched MoE reads the
    experts' weights without calling the experts module, so it does here what that call would:

    - accelerate (device_map="auto", offload): the experts' own hook loads offloaded weights
      onto its execution device and moves the inputs there before, and offloads after.
    - transformers tensor parallel (tp_plan="auto", style "moe_tp_experts"): the weights are
      DTensors holding a slice of every expert's intermediate dimension on each rank (gate_up
      [E, H, 2I/tp] as [gate slice | up slice], down [E, I/tp, H]). The kernel runs on the local
      slices and its output, a partial sum, is all-reduced over the TP group, as transformers'
      MoeExpertsParallel does for the unpatched experts.
    """
    hook = getattr(experts, "_hf_hook", None)
    if hook is None:
        return _local_fused_moe(experts, x, weights, ids)
    args, _ = hook.pre_forward(experts, x, weights, ids)
    return hook.post_forward(experts, _local_fused_moe(experts, *args))


def _autocast(x, *weights):
    """Under torch.autocast the unpatched experts' bmm runs in the autocast dtype: cast x and
    the full-precision weights alike (differentiable casts; quantized weights stay as they are)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return (x, *weights)
    dtype = torch.get_autocast_dtype(device)
    return (x.to(dtype), *(w.to(dtype) if isinstance(w, torch.Tensor) else w for w in weights))


def _local_fused_moe(experts, x, weights, ids):
    # transformers' fbgemm_fp8 experts carry Fp8Weight views set at patch time
    gate_up, down = getattr(experts, _FP8_WEIGHTS, None) or (experts.gate_up_proj, experts.down_proj)
    if not _is_dtensor(down):
        return ops.fused_moe(*_autocast(x, gate_up, down), weights, ids)
    placements = tuple(down.placements)
    if all(p.is_replicate() for p in placements):
        group = None
    elif len(placements) == 1 and placements[0].is_shard(dim=1):
        group = down.device_mesh.get_group()
    else:
        raise NotImplementedError(f"llama4_fast: experts down_proj sharded as {placements}; the patch supports "
                                  "transformers' tensor-parallel plan (Shard(1): a slice of the intermediate "
                                  "dimension per rank) or replicated experts")
    gate_up, down = gate_up.to_local(), down.to_local()
    if gate_up.shape[-1] != 2 * down.shape[1]:
        raise NotImplementedError(f"llama4_fast: local expert shards do not pair up: gate_up_proj "
                                  f"{tuple(gate_up.shape)} vs down_proj {tuple(down.shape)}")
    routed = ops.fused_moe(x, gate_up, down, weights, ids)
    if group is not None:
        torch.distributed.all_reduce(routed, group=group)
    return routed


def _is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _fp8_linear_forward(self, x):
    y = ops.quant_linear(x.reshape(-1, self.in_features), getattr(self, _FP8_WEIGHTS))
    y = y.view(*x.shape[:-1], self.out_features)
    return y if self.bias is None else y + self.bias.to(y.dtype)


# transformers' fbgemm_fp8 modules: the attribute that holds their weights as Fp8Weight
_FP8_WEIGHTS = "_llama4_fast_fp8"


def _fbgemm_weights(module):
    """Fp8Weight views of an FbgemmFp8Linear ([N, K] weight, [N, 1] scale) or of
    FbgemmFp8Llama4TextExperts' gate_up ([E, H, 2I], scale [E, 1, 2I]) and down ([E, I, H],
    scale [E, H, 1]); the activation bound is the module's input_scale_ub (read once, here)."""
    from llama4_fast.quant import Fp8Weight

    ub = float(module.input_scale_ub.reshape(-1)[0])
    ub = ub if ub > 0 else None
    if hasattr(module, "gate_up_proj_scale"):
        E = module.gate_up_proj.shape[0]
        return (Fp8Weight(module.gate_up_proj, module.gate_up_proj_scale.float().reshape(E, -1), "channel", ub),
                Fp8Weight(module.down_proj, module.down_proj_scale.float().reshape(E, -1), "channel", ub))
    return Fp8Weight(module.weight.t(), module.weight_scale.float().reshape(-1), "channel", ub)


def _rms_norm_forward(self, x):
    return ops.rms_norm(x, self.weight, self.eps)


def _l2_norm_forward(self, x):
    return ops.rms_norm(x, None, self.eps)


def _forwards(m) -> dict[type, types.FunctionType]:
    forwards = {m.Llama4TextMoe: _moe_forward, m.Llama4Router: _router_forward,
                m.Llama4TextRMSNorm: _rms_norm_forward, m.Llama4TextL2Norm: _l2_norm_forward}
    if _known_attention_signature(m.Llama4TextAttention.forward):
        forwards[m.Llama4TextAttention] = _attention_forward
    return forwards


# The two Llama4TextAttention.forward signatures _attention_forward stands in for (5.x, 4.57).
_ATTENTION_SIGNATURES = (("self", "hidden_states", "position_embeddings", "attention_mask", "cache", "kwargs"),
                         ("self", "hidden_states", "position_embeddings", "attention_mask", "past_key_values",
                          "cache_position", "kwargs"))


def _known_attention_signature(forward) -> bool:
    """A transformers release whose attention forward takes other arguments keeps its own
    forward (RoPE and temperature as transformers runs them), rather than a guessed one."""
    names = tuple(inspect.signature(forward).parameters)
    if names in _ATTENTION_SIGNATURES:
        return True
    _warn_once("attention", "llama4_fast: transformers' Llama4TextAttention.forward%s is not one the patch "
               "knows; its q/k prologue (RoPE, qk-norm, temperature) stays transformers' own", names[1:])
    return False


# -- attention and its mask ---------------------------------------------------------------------
@dataclass(frozen=True)
class MaskLayout:
    """What the "llama4_fast" mask interface returns instead of a dense mask.

    kv_start: position of key 0 (int, or [B] tensor when sequences are left-padded; the
    padding then sits at negative positions). chunk_size: None on global layers.
    kv_len: None when the queries are the last keys handed over; with a static cache, the
    [B] int32 count of the buffer's keys that exist (the rest of the buffer is not filled yet).
    """

    kv_start: int | torch.Tensor
    chunk_size: int | None
    kv_len: torch.Tensor | None = None


def _fallback(reason: str, **mask_kwargs):
    _warn_once(reason, "llama4_fast: %s; this attention mask falls back to a dense mask with SDPA", reason)
    from transformers.masking_utils import sdpa_mask

    mask_kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(**mask_kwargs)


def _is_plain_pattern(mask_function, chunked: bool) -> bool:
    """True when transformers asked for exactly causal (or chunked-causal) masking, with no
    overlay (images, packed sequences, custom and/or functions) that a layout cannot carry."""
    from transformers import masking_utils as mu

    if not chunked:
        return mask_function is mu.causal_mask_function
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return False
    cells = [c.cell_contents for c in (mask_function.__closure__ or ())]
    parts = next((c for c in cells if isinstance(c, tuple)), ())
    return (len(parts) == 2 and getattr(parts[0], "__qualname__", "") == "chunked_overlay.<locals>.inner_mask"
            and parts[1] is mu.causal_mask_function)


def llama4_fast_mask(batch_size, kv_length, kv_offset=0, mask_function=None, attention_mask=None,
                     local_size=None, q_length=None, q_offset=None, cache_position=None, **kwargs):
    """Mask interface for "llama4_fast" (transformers 4.57 passes cache_position; 5.x passes
    q_length and q_offset). Returns a MaskLayout, or a dense bool mask for other patterns."""
    dense_kwargs = dict(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
                        attention_mask=attention_mask, local_size=local_size, **kwargs)
    device = kwargs.get("device") or (cache_position.device if cache_position is not None else "cpu")
    if cache_position is not None:  # transformers 4.57
        dense_kwargs["cache_position"] = cache_position
        q_length = cache_position.shape[0]
        q_offset = int(cache_position[0])
    else:
        dense_kwargs.update(q_length=q_length, q_offset=q_offset)
        if isinstance(q_offset, torch.Tensor):
            q_offset = int(q_offset)
    if kwargs.get("use_vmap") or not _is_plain_pattern(mask_function, chunked=local_size is not None):
        return _fallback("the mask has a custom pattern (overlay or packed sequences)", **dense_kwargs)
    kv_len = None
    if q_offset + q_length < kv_offset + kv_length:
        # A static cache hands over its whole buffer; only the keys up to the last query exist.
        kv_len = torch.full((batch_size,), q_offset + q_length - kv_offset, dtype=torch.int32,
                            device=device)
    elif q_offset + q_length != kv_offset + kv_length:
        return _fallback("the queries are past the keys", **dense_kwargs)
    kv_start: int | torch.Tensor = kv_offset
    if attention_mask is not None:
        pad = attention_mask.to(torch.bool)
        left = (~pad).int().cumprod(dim=-1).sum(dim=-1)  # leading padding tokens per sequence
        positions = torch.arange(pad.shape[-1], device=pad.device)
        if not bool((pad == (positions[None] >= left[:, None])).all()):
            return _fallback("the padding mask is not pure left padding", **dense_kwargs)
        if bool(left.any()):
            kv_start = kv_offset - left.to(torch.int32)
    return MaskLayout(kv_start=kv_start, chunk_size=local_size, kv_len=kv_len)


def llama4_fast_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention interface for "llama4_fast": q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] ->
    ([B, Sq, Hq, D], None), as transformers' attention functions return."""
    if not isinstance(attention_mask, MaskLayout):  # a dense fallback mask, or a user's 4D mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout and module.training:
        raise NotImplementedError("llama4_fast attention is inference-only (attention dropout > 0 in training)")
    if kwargs.get("output_attentions", False):  # as transformers' sdpa and flash attention say it
        _warn_once("output_attentions", "llama4_fast attention does not return attention weights "
                   "(output_attentions=True); model.set_attn_implementation('eager') gives them")
    # device_map: the mask is built once on the first device, the layer may sit on another
    kv_start, kv_len = (t.to(query.device) if isinstance(t, torch.Tensor) and t.device != query.device else t
                        for t in (attention_mask.kv_start, attention_mask.kv_len))
    out = ops.attention(query, key, value, chunk_size=attention_mask.chunk_size, scale=scaling, kv_start=kv_start,
                        kv_len=kv_len)
    return out.transpose(1, 2), None


def _attention_forward(self, hidden_states, position_embeddings, attention_mask, **kwargs):
    """Llama4TextAttention.forward with everything between the projections and the cache in
    one `ops.qk_prologue` call: RoPE from transformers' complex freqs_cis (its real and
    imaginary parts are the cos/sin tables), the L2 qk-norm, and the NoPE layers' temperature
    at transformers' positions. transformers runs these as about ten small ops per layer
    (complex multiplies, casts, the log/floor chain), which a decode step pays for in launches.
    The cache update and the attention interface are transformers' own calls; 5.x hands the
    cache as `cache`, 4.57 as `past_key_values` with `cache_position`."""
    B, S = hidden_states.shape[:2]
    D = self.head_dim
    q = self.q_proj(hidden_states).view(B, S, -1, D)
    k = self.k_proj(hidden_states).view(B, S, -1, D)
    v = self.v_proj(hidden_states).view(B, S, -1, D).transpose(1, 2)
    new_api = "cache" in kwargs  # transformers 5.x; 4.57 passes past_key_values and cache_position
    cache = kwargs.pop("cache") if new_api else kwargs.pop("past_key_values", None)
    cache_position = None if new_api else kwargs.pop("cache_position", None)

    prologue = {}
    if self.use_rope:
        table = torch.view_as_real(position_embeddings.to(q.device))  # [B or 1, S, D/2, (cos, sin)]
        prologue.update(cos=table[..., 0], sin=table[..., 1])
    if hasattr(self, "qk_norm"):  # transformers builds it only for use_qk_norm on RoPE layers
        prologue["qk_norm_eps"] = self.qk_norm.eps
    if self.attn_temperature_tuning and not self.use_rope:
        if new_api:  # the same count of past tokens for every sequence
            past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
            positions = torch.arange(S, device=q.device) + past  # past may be traced: fixed size S
        else:
            positions = cache_position
        prologue.update(positions=positions, temperature=(float(self.floor_scale), float(self.attn_scale)))
    if prologue:
        q, k = ops.qk_prologue(q, k, **prologue)
    q, k = q.transpose(1, 2), k.transpose(1, 2)

    if cache is not None:
        if new_api:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        else:
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": cache_position})
    implementation = self.config._attn_implementation
    if implementation == ATTN_IMPLEMENTATION:
        interface = llama4_fast_attention
    else:  # the user switched the implementation after patching
        from transformers.models.llama4 import modeling_llama4 as m

        interface = (m.eager_attention_forward if implementation == "eager"
                     else m.ALL_ATTENTION_FUNCTIONS[implementation])
    out, weights = interface(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                             scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(B, S, -1).contiguous()), weights


def _register_attention():
    _transformers()
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, llama4_fast_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, llama4_fast_mask)


# -- per-instance patching ----------------------------------------------------------------------
_PATCH_STATE = "_llama4_fast_patch"  # attribute on the patched top-level model


def _forward_attr(module) -> str:
    """The instance attribute the patch sets: modules wrapped by accelerate hooks (device_map)
    keep their hook, and the wrapped `_old_forward` is what gets replaced."""
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


def _set_forward(changes: Changes, module, fn):
    """Replace one module instance's forward (see _forward_attr) through the undo log."""
    changes.set(module, _forward_attr(module), types.MethodType(fn, module))


def _instance_forward(module):
    """The function behind a forward set on this instance (None: the class's own)."""
    bound = module.__dict__.get(_forward_attr(module))
    return getattr(bound, "__func__", None)


def _text_configs(model):
    cfg = model.config
    return [cfg.text_config] if hasattr(cfg, "text_config") else [cfg]


def patch(model):
    """Patch a loaded Llama4ForCausalLM, Llama4TextModel or Llama4ForConditionalGeneration in
    place and return it. Patching twice is a no-op; `unpatch` restores it exactly. All or
    nothing: if any step fails (an fbgemm module without its scales, an interrupt), the model
    is left exactly as it was."""
    m = llama4_classes()
    if not isinstance(model, (m.Llama4ForCausalLM, m.Llama4TextModel, m.Llama4ForConditionalGeneration)):
        raise TypeError(f"model must be a transformers Llama4ForCausalLM, Llama4TextModel or "
                        f"Llama4ForConditionalGeneration, got {type(model).__name__}")
    if hasattr(model, _PATCH_STATE):
        return model
    forwards = _forwards(m)
    ours = {*forwards.values(), _attention_forward, _fp8_linear_forward}
    inside = next((name for name, module in model.named_modules() if _instance_forward(module) in ours), None)
    if inside is not None:  # patched through a parent or a child: two undo records would fight
        raise ValueError(f"part of this model ({inside or 'the model itself'}) is already patched through another "
                         "model object holding it; unpatch that one first")
    _register_attention()
    with all_or_nothing() as changes:
        for module in model.modules():
            fn = forwards.get(type(module))
            if fn is not None:
                _set_forward(changes, module, fn)
            kind = type(module).__name__
            if kind in ("FbgemmFp8Linear", "FbgemmFp8Llama4TextExperts"):
                changes.set(module, _FP8_WEIGHTS, _fbgemm_weights(module))
                if kind == "FbgemmFp8Linear":
                    _set_forward(changes, module, _fp8_linear_forward)
        for cfg in _text_configs(model):
            if cfg._attn_implementation == "eager":  # chosen on purpose: the one that returns attention weights
                _warn_once("eager", "llama4_fast: the model's attention is 'eager', kept as chosen (output_attentions "
                           "needs it); for the fast attention call model.set_attn_implementation('sdpa') before patch")
                continue
            changes.set(cfg, "_attn_implementation", ATTN_IMPLEMENTATION)
        changes.set(model, _PATCH_STATE, changes)  # unpatch rolls the log back, this entry last
    return model


def unpatch(model):
    """Undo `patch(model)`; a model that was not patched is returned unchanged."""
    state = model.__dict__.get(_PATCH_STATE)
    if state is not None:
        state.rollback()
    return model


def is_patched(model) -> bool:
    return hasattr(model, _PATCH_STATE)


# -- class-level patching -----------------------------------------------------------------------
_CLASS_STATE: dict = {}


def patch_llama4():
    """Patch the transformers Llama 4 classes so models built afterwards use llama4_fast:
    module forwards are replaced on the classes, and every Llama4TextModel built selects the
    "llama4_fast" attention, as `patch` does: unless its attention is "eager", chosen on purpose
    (`attn_implementation="eager"`, or `output_attentions` in the config), which is kept, since
    it is the one that returns attention weights. `set_attn_implementation` switches a built
    model as usual. `unpatch_llama4()` restores the classes."""
    m = llama4_classes()
    if _CLASS_STATE:
        return
    _register_attention()
    for cls, fn in _forwards(m).items():
        _CLASS_STATE[cls] = cls.forward
        cls.forward = fn
    original_init = m.Llama4TextModel.__init__

    def init(self, config, *args, **kwargs):
        original_init(self, config, *args, **kwargs)
        if self.config._attn_implementation != "eager":
            self.config._attn_implementation = ATTN_IMPLEMENTATION
        else:
            _warn_once("class-eager", "llama4_fast: a Llama 4 built with attention 'eager' keeps it (output_attentions "
                       "needs it); model.set_attn_implementation('%s') selects the fast attention", ATTN_IMPLEMENTATION)

    _CLASS_STATE["init"] = original_init
    m.Llama4TextModel.__init__ = init


def unpatch_llama4():
    m = llama4_classes()
    if not _CLASS_STATE:
        return
    m.Llama4TextModel.__init__ = _CLASS_STATE.pop("init")
    for cls, fn in _CLASS_STATE.items():
        cls.forward = fn
    _CLASS_STATE.clear()
