"""transformers' contract for the attention implementation, kept by patched models.

Small cases for what transformers' own Llama 4 model tests (tests/models/llama4 with the common
mixins) check and the patch once broke: a model built under `patch_llama4()` keeps an explicit
"eager" attention (the one that returns attention weights), and `set_attn_implementation`
switches it; our attention, like transformers' sdpa, says that it returns no attention weights.
Tiny fp32 models on the torch backend.
"""

import logging
import tempfile

import pytest
import torch

import llama4_fast
from llama4_fast import hf_patch, registry
from llama4_fast.tiny import TINY_TEXT_CONFIG, tiny_hf_model

pytest.importorskip("transformers")
from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_backend_on_cpu")

SMALL = dict(hidden_size=64, intermediate_size=96, intermediate_size_mlp=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, attention_chunk_size=8)
LAYERS = TINY_TEXT_CONFIG["num_hidden_layers"]


def _calls(counts, op):
    """Dispatches of `op` on any backend (torch on CPU, triton where a GPU is)."""
    return sum(n for (name, _), n in counts.items() if name == op)


def _text_config(**overrides):
    return Llama4TextConfig(**dict(TINY_TEXT_CONFIG, **SMALL, **overrides))


@pytest.fixture
def class_patched():
    llama4_fast.patch_llama4()
    try:
        yield
    finally:
        llama4_fast.unpatch_llama4()


def _eager_model(how, seed=0):
    """A Llama4ForCausalLM whose user asked for eager attention, in the ways transformers' tests do."""
    torch.manual_seed(seed)
    if how == "from_config":
        return Llama4ForCausalLM._from_config(_text_config(), attn_implementation="eager").eval()
    if how == "config_attr":
        config = _text_config()
        config._attn_implementation = "eager"
        return Llama4ForCausalLM(config).eval()
    if how == "output_attentions":
        config = _text_config()
        config.output_attentions = True  # selects eager when nothing else is chosen
        return Llama4ForCausalLM(config).eval()
    assert how == "from_pretrained"
    with tempfile.TemporaryDirectory() as tmp:
        Llama4ForCausalLM(_text_config()).save_pretrained(tmp)
        return Llama4ForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()


@pytest.mark.parametrize("how", ["from_config", "config_attr", "output_attentions", "from_pretrained"])
@torch.no_grad()
def test_class_patch_keeps_an_explicit_eager_and_its_attention_weights(class_patched, how):
    """transformers' test_attention_outputs / test_retain_grad_hidden_states_attentions: the
    class patch used to switch every model to "llama4_fast", so output_attentions returned no
    weights, without a word."""
    model = _eager_model(how)
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(3, 1024, (2, 20))
    with registry.record() as calls:
        out = model(ids, output_attentions=True)
    assert _calls(calls, "fused_moe") == LAYERS and _calls(calls, "attention") == 0  # patched, eager kept
    assert len(out.attentions) == LAYERS
    assert all(a.shape == (2, SMALL["num_attention_heads"], 20, 20) for a in out.attentions)
    llama4_fast.unpatch_llama4()
    reference = _eager_model(how)
    want = reference(ids, output_attentions=True)
    for got, ref in zip(out.attentions, want.attentions):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, want.logits, atol=1e-4, rtol=1e-4)


def test_class_patch_says_when_it_keeps_eager(class_patched, caplog):
    hf_patch._warned.discard("class-eager")
    with caplog.at_level(logging.WARNING, logger=hf_patch.logger.name):
        _eager_model("config_attr")
    assert "keeps it" in caplog.text and "set_attn_implementation('llama4_fast')" in caplog.text


@torch.no_grad()
def test_set_attn_implementation_switches_a_class_patched_model(class_patched):
    """transformers' test_can_set_attention_dynamically: eager at construction, then sdpa,
    then back; and our own implementation can be selected the same way."""
    model = _eager_model("config_attr", seed=1)
    assert model.config._attn_implementation == model.model.config._attn_implementation == "eager"
    ids = torch.randint(3, 1024, (2, 20))
    ref = model(ids).logits
    for name, attention_calls in (("sdpa", 0), ("llama4_fast", LAYERS), ("eager", 0)):
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == model.model.config._attn_implementation == name
        with registry.record() as calls:
            out = model(ids, output_attentions=name == "eager")
        assert _calls(calls, "attention") == attention_calls
        assert (len(out.attentions) == LAYERS) if name == "eager" else not out.attentions
        torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match='attn_implementation="foo"'):
        model.set_attn_implementation("foo")
    assert model.config._attn_implementation == "eager"


def test_class_patch_still_selects_its_attention_when_eager_is_not_asked_for(class_patched):
    config = _text_config()
    assert Llama4ForCausalLM(config).config._attn_implementation == "llama4_fast"  # unset
    config = _text_config()
    config._attn_implementation = "sdpa"
    assert Llama4ForCausalLM(config).config._attn_implementation == "llama4_fast"  # as patch(model) does


def _tiny_composite_config(attn_implementation):
    vision = dict(vision_output_dim=32, hidden_size=32, image_size=8, patch_size=2, num_channels=3,
                  projection_dim=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  pixel_shuffle_ratio=0.5, projector_input_dim=32, projector_output_dim=32)
    config = Llama4Config(text_config=dict(TINY_TEXT_CONFIG, **SMALL), vision_config=vision)
    config._attn_implementation = attn_implementation
    return config


@torch.no_grad()
def test_class_patch_keeps_eager_in_a_multimodal_model(class_patched):
    """transformers' test_attn_implementation_composite_models: eager asked for per sub-config."""
    config = _tiny_composite_config({"": "eager", "text_config": "eager", "vision_config": "eager"})
    model = Llama4ForConditionalGeneration(config).eval()
    assert model.config.text_config._attn_implementation == "eager"
    assert model.language_model.config._attn_implementation == "eager"
    out = model.language_model(torch.randint(3, 1024, (1, 12)), output_attentions=True)
    assert len(out.attentions) == LAYERS
    model.set_attn_implementation("sdpa")
    assert model.config.text_config._attn_implementation == model.config.vision_config._attn_implementation == "sdpa"
    # unset: the text model gets ours, the vision model keeps transformers' default
    model = Llama4ForConditionalGeneration(_tiny_composite_config(None))
    assert model.config.text_config._attn_implementation == "llama4_fast"
    assert model.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("chosen", [None, "sdpa", "eager"])
def test_patch_keeps_only_an_eager_attention(chosen, caplog):
    """patch(model): an eager model stays eager (with a warning); an unset (resolved to sdpa by
    transformers) or sdpa one gets "llama4_fast"."""
    if chosen is None:
        model = Llama4ForCausalLM(_text_config()).eval()
        assert model.config._attn_implementation == "sdpa"  # transformers' default
    else:
        model = tiny_hf_model(seed=2, **SMALL)  # asks for sdpa
        if chosen == "eager":
            model.set_attn_implementation("eager")
    hf_patch._warned.discard("eager")
    with caplog.at_level(logging.WARNING, logger=hf_patch.logger.name):
        llama4_fast.patch(model)
    try:
        expected = "eager" if chosen == "eager" else "llama4_fast"
        assert model.config._attn_implementation == expected
        assert ("kept as chosen" in caplog.text) == (chosen == "eager")
    finally:
        llama4_fast.unpatch(model)
    assert model.config._attn_implementation == ("eager" if chosen == "eager" else "sdpa")


@torch.no_grad()
def test_our_attention_says_it_returns_no_attention_weights(caplog):
    """output_attentions=True with "llama4_fast" returns no weights, as with transformers' sdpa, and
    says so, as sdpa does (it used to be silent)."""
    model = llama4_fast.patch(tiny_hf_model(seed=4, **SMALL))
    hf_patch._warned.discard("output_attentions")
    try:
        with caplog.at_level(logging.WARNING, logger=hf_patch.logger.name):
            out = model(torch.randint(3, 1024, (1, 12)), output_attentions=True)
        assert not out.attentions
        assert "does not return attention weights" in caplog.text and "set_attn_implementation('eager')" in caplog.text
    finally:
        llama4_fast.unpatch(model)
