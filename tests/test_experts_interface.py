"""experts_implementation="llama4_fast" (llama4_fast.experts) on transformers' MoE families.

Each family is a tiny random fp32 model (2 layers, hidden 64, small vocab) whose experts and
lm_head are re-drawn at unit scale, so the experts and the clamps of gpt-oss's gate matter; the
same model with experts_implementation="eager" is the reference: logits within 1e-4 on a
left-padded batch and identical greedy tokens, with the torch backend and with the Triton
kernels (the interpreter on CPU); gradients in training; fallbacks with their warning.
"""

import functools
import logging

import pytest
import torch

import llama4_fast
from llama4_fast import experts, registry

transformers = pytest.importorskip("transformers")
hf_moe = pytest.importorskip("transformers.integrations.moe")
if not hasattr(hf_moe, "ExpertsInterface"):
    pytest.skip("transformers without ExpertsInterface (< 5)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=None)
# family: (config class, its MoE arguments); top_k 1, 2 and 8, silu / gelu / gelu_tanh, the
# nn.Linear-style layout and gpt-oss's (transposed, biased, interleaved, clamped gate).
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=1, shared_expert_intermediate_size=32,
                                         hidden_act="gelu")),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=12,
                                         num_experts_per_tok=8, head_dim=16)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8,
                                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                                             kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=16, n_group=2, topk_group=1, num_key_value_heads=4)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                  hidden_act="gelu_pytorch_tanh")),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                     sliding_window=8, swiglu_limit=0.5)),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=1)),
}
FAMILIES = {name: spec for name, spec in FAMILIES.items() if hasattr(transformers, spec[0])}
BACKENDS = ("torch", "triton")


@pytest.fixture(scope="module", autouse=True)
def _registered():
    llama4_fast.register_experts()


def experts_modules(model):
    return [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)]


@functools.lru_cache(maxsize=None)
def _tiny(family: str):
    config_cls, moe = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **moe})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").to(DEVICE).eval()
    with torch.no_grad():
        for m in experts_modules(model):
            for name, p in m.named_parameters(recurse=False):
                fan_in = p.shape[-2] if m.is_transposed else p.shape[-1]
                p.normal_(0.0, 0.3 if name.endswith("bias") else fan_in ** -0.5)
        model.get_output_embeddings().weight.normal_(0.0, COMMON["hidden_size"] ** -0.5)
    return model


@pytest.fixture
def tiny(request):
    """The family's model with its eager experts, restored after the test."""
    model = _tiny(request.param)
    yield model
    model.set_experts_implementation("eager")
    model.eval().zero_grad(set_to_none=True)


def batch():
    """Two prompts of 9 tokens, the first left-padded by 3."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, COMMON["vocab_size"], (2, 9), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids.masked_fill(mask == 0, COMMON["pad_token_id"]), mask


def run(model, implementation: str, backend: str | None, fn):
    """fn() with the model's experts on `implementation` (and the fused_moe backend), and the
    count of fused_moe dispatches per backend."""
    model.set_experts_implementation(implementation)
    with registry.use(**({"fused_moe": backend} if backend else {})), registry.record() as calls:
        result = fn()
    return result, {b: n for (op, b), n in calls.items() if op == "fused_moe"}


@pytest.mark.parametrize("tiny", FAMILIES, indirect=True)
@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_logits_match_eager(tiny, backend):
    ids, mask = batch()
    ref, ref_calls = run(tiny, "eager", None, lambda: tiny(ids, attention_mask=mask).logits)
    logits, calls = run(tiny, "llama4_fast", backend, lambda: tiny(ids, attention_mask=mask).logits)
    assert ref_calls == {} and calls == {backend: len(experts_modules(tiny))}, calls
    real = mask.bool()
    diff = (logits - ref)[real].abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff:.3g} (logits ~{ref[real].abs().max().item():.2g})"


# The interpreter needs seconds per decode step: on CPU the Triton kernels generate for top-1,
# top-2 and gpt-oss's experts (the logits above cover every family); on CUDA for every family.
GREEDY = [(f, b) for f in FAMILIES for b in BACKENDS
          if b == "torch" or DEVICE == "cuda" or f in ("granitemoe", "mixtral", "gpt_oss")]


@pytest.mark.parametrize("tiny,backend", GREEDY, indirect=["tiny"])
@torch.no_grad()
def test_greedy_tokens_match_eager(tiny, backend):
    ids, mask = batch()
    if backend == "triton" and DEVICE == "cpu":
        ids, mask = ids[1:], mask[1:]  # one sequence: half the interpreted programs per step

    def generate():
        return tiny.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)

    ref, _ = run(tiny, "eager", None, generate)
    tokens, calls = run(tiny, "llama4_fast", backend, generate)
    assert calls == {backend: 20 * len(experts_modules(tiny))}, calls  # prefill + 19 decode steps
    assert torch.equal(tokens, ref)


TRAINED = [f for f in ("gpt_oss", "mixtral", "qwen3_moe") if f in FAMILIES]


@pytest.mark.parametrize("tiny", TRAINED, indirect=True)
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_gradients_match_eager(tiny, backend):
    """Every parameter's gradient of the language-model loss (experts' weights and biases, the
    router through the router weights, attention and embeddings) equals eager's."""
    ids, mask = batch()
    tiny.train()

    def grads():
        tiny.zero_grad(set_to_none=True)
        loss = tiny(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}

    (ref_loss, ref), _ = run(tiny, "eager", None, grads)
    (loss, got), calls = run(tiny, "llama4_fast", backend, grads)
    assert calls == {backend: len(experts_modules(tiny))}
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == ref.keys() and any("experts" in n for n in ref)
    for name, g in got.items():
        err = ((g - ref[name]).norm() / ref[name].norm().clamp_min(1e-30)).item()
        assert err < 1e-4, f"{name}: relative gradient error {err:.3g}"


# -- fallbacks: transformers' grouped_mm, a warning naming the feature, the right answer ----------

def _fallback_logits(model, caplog, expect: str):
    """The model under "llama4_fast" gives grouped_mm's logits (transformers' own answer for
    the feature: Mixtral's eager forward, for one, never calls _apply_gate), warns once."""
    ids, mask = batch()
    with torch.no_grad():
        ref, _ = run(model, "grouped_mm", None, lambda: model(ids, attention_mask=mask).logits)
        experts._warned.clear()
        with caplog.at_level(logging.WARNING, logger="llama4_fast"):
            out, calls = run(model, "llama4_fast", None, lambda: model(ids, attention_mask=mask).logits)
            run(model, "llama4_fast", None, lambda: model(ids, attention_mask=mask).logits)
    assert calls == {}, "the fallback must not run fused_moe"
    warnings = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(warnings) == 1 and expect in warnings[0], warnings  # once per class and reason
    assert (out - ref)[mask.bool()].abs().max().item() < 1e-4


@pytest.mark.parametrize("tiny", ["mixtral"], indirect=True)
def test_unknown_activation_falls_back(tiny, caplog):
    modules = experts_modules(tiny)
    saved = [m.act_fn for m in modules]
    try:
        for m in modules:
            m.act_fn = torch.nn.ReLU()
        _fallback_logits(tiny, caplog, "act_fn ReLU")
    finally:
        for m, act in zip(modules, saved):
            m.act_fn = act


@pytest.mark.parametrize("tiny", ["mixtral"], indirect=True)
def test_custom_apply_gate_falls_back(tiny, caplog, monkeypatch):
    cls = type(experts_modules(tiny)[0])

    def squared_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return gate * gate * up

    monkeypatch.setattr(cls, "_apply_gate", squared_gate)
    experts._gate.cache_clear()
    try:
        _fallback_logits(tiny, caplog, "custom _apply_gate (test_custom_apply_gate_falls_back.<locals>.squared_gate)")
    finally:
        experts._gate.cache_clear()


@pytest.mark.parametrize("tiny", ["gpt_oss"], indirect=True)
def test_declared_layout_the_gate_does_not_read_falls_back(tiny, caplog, monkeypatch):
    for m in experts_modules(tiny):
        monkeypatch.setattr(m, "is_concatenated", True)  # gpt-oss's gate reads gate/up interleaved
    _fallback_logits(tiny, caplog, "is_concatenated=True")


def test_features_without_a_kernel_are_named():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = transformers.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4)
    m = MixtralExperts(config)
    assert experts._options(m) == {}
    cases = {"has_gate": (False, "has_gate=False"), "has_post_expert_norm": (True, "has_post_expert_norm"),
             "gate_up_proj": (torch.nn.Parameter(m.gate_up_proj.detach().to(torch.float8_e4m3fn),
                                                 requires_grad=False), "gate_up_proj in torch.float8_e4m3fn")}
    for attr, (value, reason) in cases.items():
        saved = getattr(m, attr)
        setattr(m, attr, value)
        assert reason in experts._options(m), attr
        setattr(m, attr, saved)


# -- module level: expert-parallel sentinels, layouts ----------------------------------------------

@pytest.mark.parametrize("tiny", ["gpt_oss", "mixtral"], indirect=True)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_parallel_sentinels_contribute_nothing(tiny, backend):
    """Ids >= num_experts (another rank's experts, weight 0) as transformers' grouped_mm sees them."""
    m = experts_modules(tiny)[0]
    E, T = m.num_experts, 6
    x = torch.randn(T, COMMON["hidden_size"], device=DEVICE)
    ids = torch.tensor([[0, E], [E + 2, 1], [2, 3], [E, E], [1, 0], [3, E + 1]], device=DEVICE)
    weights = torch.rand(T, 2, device=DEVICE).masked_fill(ids >= E, 0.0)
    m._is_expert_parallel = True
    try:
        ref = hf_moe.grouped_mm_experts_forward(m, x, ids, weights)
        with torch.no_grad(), registry.use(fused_moe=backend), registry.record() as calls:
            out = experts.experts_forward(m, x, ids, weights)
    finally:
        m._is_expert_parallel = False
    assert calls[("fused_moe", backend)] == 1
    assert (out - ref).abs().max().item() < 1e-5
    assert out[3].abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_privacy_filter_gate_on_concatenated_columns(backend):
    """OpenAIPrivacyFilterExperts: gpt-oss's clamped gate over [gate | up] (is_concatenated=True)."""
    modeling = pytest.importorskip("transformers.models.openai_privacy_filter.modeling_openai_privacy_filter")
    config = transformers.OpenAIPrivacyFilterConfig(hidden_size=64, intermediate_size=32, num_local_experts=4,
                                                    num_experts_per_tok=2, swiglu_limit=0.5)
    m = modeling.OpenAIPrivacyFilterExperts(config).to(DEVICE)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0.0, 0.3 if name.endswith("bias") else 0.125)
    x = torch.randn(9, 64, device=DEVICE)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(9)]).to(DEVICE)
    weights = torch.rand(9, 2, device=DEVICE)
    assert experts._options(m) == {"clamped_swiglu": (0.5, config.swiglu_alpha)}
    with torch.no_grad(), registry.use(fused_moe=backend):
        out = experts.experts_forward(m, x, ids, weights)
        ref = type(m).forward.__wrapped__(m, x, ids, weights)  # its own (eager) forward
    assert (out - ref).abs().max().item() < 1e-5


def test_weights_are_read_in_place(monkeypatch):
    """No expert weight is copied: fused_moe receives views of the parameters' storage."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    m = MixtralExperts(transformers.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4))
    seen = {}

    def spy(x, w13, w2, weights, ids, **kw):
        seen.update(w13=w13, w2=w2)
        return torch.zeros_like(x)

    monkeypatch.setattr(experts.ops, "fused_moe", spy)
    experts.experts_forward(m, torch.randn(3, 64), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    assert seen["w13"].data_ptr() == m.gate_up_proj.data_ptr() and seen["w13"].shape == (4, 64, 64)
    assert seen["w2"].data_ptr() == m.down_proj.data_ptr() and seen["w2"].shape == (4, 32, 64)


# -- registration -----------------------------------------------------------------------------------

def test_registration_is_idempotent_and_covers_fp8_experts():
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS

    llama4_fast.register_experts()
    llama4_fast.register_experts()
    assert hf_moe.ALL_EXPERTS_FUNCTIONS["llama4_fast"] is experts.experts_forward
    assert "llama4_fast" in ALL_FP8_EXPERTS_FUNCTIONS  # FP8 experts fall back instead of a KeyError


def test_from_config_and_set_experts_implementation():
    config = transformers.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="llama4_fast")
    assert model.config._experts_implementation == "llama4_fast"
    model.set_experts_implementation("eager")
    model.set_experts_implementation("llama4_fast")
    assert model.get_experts_implementation()[""] == "llama4_fast"


def test_transformers_without_experts_interface_registers_nothing(monkeypatch):
    monkeypatch.delitem(hf_moe.ExpertsInterface._global_mapping, "llama4_fast", raising=False)
    interface = hf_moe.ExpertsInterface
    monkeypatch.delattr(hf_moe, "ExpertsInterface")
    with pytest.raises(RuntimeError, match="no ExpertsInterface"):
        llama4_fast.register_experts()
    assert "llama4_fast" not in interface._global_mapping
