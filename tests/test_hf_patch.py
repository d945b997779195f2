"""llama4_fast.patch on transformers' Llama 4 (tiny random configs, fp32) against unpatched.

On CPU these pin the torch backend (the interpreter would run the Triton kernels, too slowly
for whole-model generation); tests/test_triton_backend.py covers the Triton backend.
"""

import logging

import pytest
import torch

import llama4_fast
from llama4_fast import hf_patch, registry
from llama4_fast.tiny import tiny_hf_model

pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("torch_backend_on_cpu")


SMALL = dict(hidden_size=128, intermediate_size=192, intermediate_size_mlp=256, attention_chunk_size=16)

CASES = {
    "scout_like_E16_top1": dict(num_local_experts=16, num_experts_per_tok=1),
    "E4_top2_no_qk_norm": dict(num_local_experts=4, num_experts_per_tok=2, use_qk_norm=False),
    "E1_top1": dict(num_local_experts=1, num_experts_per_tok=1),
    "maverick_like_interleaved_dense_top2": dict(num_local_experts=16, num_experts_per_tok=2,
                                                 interleave_moe_layer_step=2, use_qk_norm=False),
    "no_temperature_tuning_head_dim_64": dict(attn_temperature_tuning=False, head_dim=64),
}


def _generate(model, ids, mask=None, n=40, **kwargs):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)


def _assert_logits_close(got, ref):
    scale = ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4 * max(scale, 1.0), f"max |logit diff| {diff:.3g} (logit scale {scale:.3g})"


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_patched_equals_unpatched(case):
    model = tiny_hf_model(seed=1, **SMALL, **CASES[case])
    ids = torch.randint(3, 1024, (1, 20))  # prefill crosses a chunk boundary (16)
    ref_logits = model(ids).logits
    ref_tokens = _generate(model, ids)  # 40 new tokens: decode crosses 3 more boundaries
    llama4_fast.patch(model)
    with registry.record() as calls:
        logits = model(ids).logits
        tokens = _generate(model, ids)
    _assert_logits_close(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    moe_layers = len(model.config.moe_layers)
    assert sum(n for (op, _), n in calls.items() if op == "fused_moe") == moe_layers * 41
    assert sum(n for (op, _), n in calls.items() if op == "attention") == 4 * 41
    # every layer's RoPE / qk-norm / temperature in one prologue call (NoPE layers without
    # temperature tuning have nothing to do)
    cfg = model.config
    busy = sum(1 for use_rope in cfg.no_rope_layers if use_rope or cfg.attn_temperature_tuning)
    assert busy < 4 if not cfg.attn_temperature_tuning else busy == 4
    assert sum(n for (op, _), n in calls.items() if op == "qk_prologue") == busy * 41


@torch.no_grad()
def test_left_padded_batch():
    model = tiny_hf_model(seed=2, **SMALL)
    ids = torch.randint(3, 1024, (3, 30))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :19] = 0  # the padding shifts this sequence's chunk boundaries
    ids[mask == 0] = 0
    ref_logits = model(ids, attention_mask=mask).logits
    ref_tokens = _generate(model, ids, mask)
    llama4_fast.patch(model)
    logits = model(ids, attention_mask=mask).logits
    real = mask.bool()
    _assert_logits_close(logits[real], ref_logits[real])
    assert torch.equal(_generate(model, ids, mask), ref_tokens)


@torch.no_grad()
def test_an_explicit_eager_attention_is_kept_for_its_weights(caplog):
    """eager is the implementation that returns attention weights: patch keeps it (and says so),
    so output_attentions still works, while the MoE, norms and prologue are patched."""
    model = tiny_hf_model(seed=3, **SMALL)
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 1024, (2, 24))
    ref = model(ids, output_attentions=True)
    hf_patch._warned.discard("eager")
    with caplog.at_level(logging.WARNING, logger=hf_patch.logger.name):
        llama4_fast.patch(model)
    assert "kept as chosen" in caplog.text and model.config._attn_implementation == "eager"
    with registry.record() as calls:
        out = model(ids, output_attentions=True)
    assert calls[("fused_moe", "torch")] == 4 and calls[("qk_prologue", "torch")] == 4
    assert len(out.attentions) == 4
    for got, want in zip(out.attentions, ref.attentions):
        assert got.shape == want.shape == (2, model.config.num_attention_heads, 24, 24)
        assert torch.allclose(got, want, atol=1e-6)
    _assert_logits_close(out.logits, ref.logits)
    llama4_fast.unpatch(model)


@torch.no_grad()
def test_unpatch_restores_exactly():
    model = tiny_hf_model(seed=3, **SMALL)
    ids = torch.randint(3, 1024, (2, 24))
    before = model(ids).logits
    implementation = model.config._attn_implementation
    llama4_fast.patch(model)
    llama4_fast.patch(model)  # a second patch is a no-op
    assert hf_patch.is_patched(model)
    assert model.config._attn_implementation == "llama4_fast"
    llama4_fast.unpatch(model)
    assert not hf_patch.is_patched(model)
    assert model.config._attn_implementation == implementation
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(ids).logits, before)


def test_a_model_patched_through_a_parent_or_child_is_refused():
    """patch(m.model) then patch(m) (or the reverse) would leave two undo records, and unpatching
    both would restore the first patch's forwards: refused, naming what is patched."""
    model = tiny_hf_model(seed=3, **SMALL)
    for first, second in ((model.model, model), (model, model.model)):
        llama4_fast.patch(first)
        with pytest.raises(ValueError, match="already patched through another model object"):
            llama4_fast.patch(second)
        llama4_fast.unpatch(first)
        assert all("forward" not in m.__dict__ for m in model.modules())
    assert llama4_fast.unpatch(model) is model  # unpatching an unpatched model is harmless


@torch.no_grad()
def test_router_logits_still_returned():
    model = tiny_hf_model(seed=4, **SMALL)
    ids = torch.randint(3, 1024, (1, 12))
    moe = model.model.layers[0].feed_forward
    x = torch.randn(1, 5, model.config.hidden_size)
    ref_moe = moe(x)
    ref = getattr(model(ids, output_router_logits=True), "router_logits", None)  # None on transformers 4.57
    llama4_fast.patch(model)
    out, router_logits = moe(x)  # the MoE still returns (output, router_logits)
    torch.testing.assert_close(out, ref_moe[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(router_logits, ref_moe[1])
    got = getattr(model(ids, output_router_logits=True), "router_logits", None)
    assert (got is None) == (ref is None)
    for g, r in zip(got or (), ref or ()):
        torch.testing.assert_close(g, r)


@torch.no_grad()
def test_patch_text_model_directly():
    model = tiny_hf_model(seed=5, **SMALL).model  # a bare Llama4TextModel
    ids = torch.randint(3, 1024, (2, 18))
    ref = model(ids).last_hidden_state
    llama4_fast.patch(model)
    torch.testing.assert_close(model(ids).last_hidden_state, ref, atol=1e-5, rtol=1e-4)


def _tiny_multimodal():
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from llama4_fast.tiny import TINY_TEXT_CONFIG

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, image_size=28, patch_size=14)
    config = Llama4Config(text_config=dict(TINY_TEXT_CONFIG, **SMALL), vision_config=vision)
    config._attn_implementation = "sdpa"
    torch.manual_seed(6)
    return Llama4ForConditionalGeneration(config).eval()


@torch.no_grad()
def test_patch_multimodal_model_text_path():
    model = _tiny_multimodal()
    text = model.language_model  # transformers 5.24's text-only multimodal forward is broken upstream
    ids = torch.randint(3, 1024, (1, 25))
    ref = text(input_ids=ids).logits
    llama4_fast.patch(model)
    with registry.record() as calls:
        got = text(input_ids=ids).logits
    assert calls[("attention", "torch" if not torch.cuda.is_available() else "triton")] == 4
    _assert_logits_close(got, ref)
    llama4_fast.unpatch(model)
    assert torch.equal(text(input_ids=ids).logits, ref)


@torch.no_grad()
def test_patch_llama4_classes_for_models_built_later():
    from transformers.models.llama4 import modeling_llama4 as m

    original = m.Llama4TextMoe.forward
    reference = tiny_hf_model(seed=7, **SMALL)
    ids = torch.randint(3, 1024, (1, 20))
    ref = reference(ids).logits
    llama4_fast.patch_llama4()
    try:
        model = tiny_hf_model(seed=7, **SMALL)
        assert model.config._attn_implementation == "llama4_fast"
        with registry.record() as calls:
            got = model(ids).logits
        assert sum(calls.values()) > 0
        _assert_logits_close(got, ref)
    finally:
        llama4_fast.unpatch_llama4()
    assert m.Llama4TextMoe.forward is original
    assert tiny_hf_model(seed=7, **SMALL).config._attn_implementation == "sdpa"


@torch.no_grad()
def test_static_cache_runs_natively(caplog):
    """A static cache hands the whole buffer to attention: the layout carries the filled count
    (kv_len), no dense fallback. Chunk 16 with 20 + 20 tokens: the chunked layers' static
    window fills, rolls and crosses chunk boundaries; sequence 1 is left-padded."""
    model = tiny_hf_model(seed=8, **SMALL)
    ids = torch.randint(3, 1024, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ref = _generate(model, ids, mask, n=20)
    llama4_fast.patch(model)
    hf_patch._warned.clear()
    with caplog.at_level(logging.WARNING, logger="llama4_fast"), llama4_fast.registry.record() as calls:
        got = _generate(model, ids, mask, n=20, cache_implementation="static")
    assert torch.equal(got, ref)
    assert "falls back" not in caplog.text
    assert sum(n for (op, _), n in calls.items() if op == "attention") == 4 * 20


@torch.no_grad()
def test_unknown_attention_signature_keeps_transformers_forward(monkeypatch, caplog):
    """A transformers release with another attention forward keeps its own q/k prologue: the
    patch warns and still patches the rest, with unchanged outputs."""
    from transformers.models.llama4 import modeling_llama4 as m

    original = m.Llama4TextAttention.forward

    def forward(self, hidden_states, position_embeddings, attention_mask, new_cache_argument=None, **kwargs):
        return original(self, hidden_states, position_embeddings, attention_mask, **kwargs)

    monkeypatch.setattr(m.Llama4TextAttention, "forward", forward)
    model = tiny_hf_model(seed=9, **SMALL)
    ids = torch.randint(3, 1024, (1, 20))
    ref = model(ids).logits
    hf_patch._warned.clear()
    with caplog.at_level(logging.WARNING, logger="llama4_fast"):
        llama4_fast.patch(model)
    assert "q/k prologue (RoPE, qk-norm, temperature) stays transformers' own" in caplog.text
    with registry.record() as calls:
        got = model(ids).logits
    _assert_logits_close(got, ref)
    assert not any(op == "qk_prologue" for op, _ in calls) and any(op == "attention" for op, _ in calls)


def test_patch_rejects_other_models():
    with pytest.raises(TypeError, match="model must be a transformers Llama4ForCausalLM"):
        llama4_fast.patch(torch.nn.Linear(2, 2))


def test_patch_rejects_unsupported_transformers(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.51.3")
    with pytest.raises(RuntimeError, match="supports transformers 4.57.x and 5.x; found 4.51.3"):
        llama4_fast.patch(torch.nn.Linear(2, 2))
