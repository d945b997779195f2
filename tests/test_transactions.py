"""`patch`, `quantize`, `load_quantized` and `shard_experts` complete or change nothing.

Each call is first run with its steps counted (every assignment through the undo log and
every unit of work that can fail: quantizing a weight, building a stored module, slicing a
layer's experts), then once per step with a failure injected at that step. After every failed
call the model must be exactly as it was: the same module objects of the same classes, the same
parameter and buffer objects holding the same values, the same instance forwards and patch
attributes, the same attention implementation.
"""

import json

import pytest
import torch
import torch.distributed as dist

import llama4_fast
from llama4_fast import Llama4, hf_patch, parallel, quant_model
from llama4_fast.tiny import tiny_hf_model
from llama4_fast.transaction import Changes

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_backend_on_cpu")

SMALL = dict(hidden_size=128, intermediate_size=96, intermediate_size_mlp=192, attention_chunk_size=16,
             interleave_moe_layer_step=2, num_local_experts=4)


class Injected(Exception):
    pass


class Faults:
    """Wraps functions so that the `at`-th call among all of them raises Injected (at=None:
    only count)."""

    def __init__(self, monkeypatch, targets):
        self.calls, self.at = 0, None
        for owner, name in targets:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, fn):
        def wrapped(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                raise Injected(f"step {self.calls}")
            return fn(*args, **kwargs)

        return wrapped

    def steps(self, call) -> int:
        """Run `call` once without a fault; the number of steps it took."""
        self.calls, self.at = 0, None
        call()
        return self.calls

    def fail_at(self, step, call):
        self.calls, self.at = 0, step
        with pytest.raises(Injected):
            call()


def snapshot(model):
    modules = list(model.named_modules(remove_duplicate=False))
    configs = [c for c in (model.config, getattr(model.config, "text_config", None)) if c is not None]
    return dict(
        modules=[(name, type(m), id(m)) for name, m in modules],
        tensors={k: (id(t), t.dtype, tuple(t.shape), t.detach().clone())
                 for k, t in model.state_dict(keep_vars=True).items()},
        instance=[(name, {k: v for k, v in vars(m).items() if k in ("forward", "_old_forward")
                          or k.startswith("_llama4_fast")}) for name, m in modules],
        attention=[getattr(c, "_attn_implementation", None) for c in configs],
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["instance"] == before["instance"]
    assert after["attention"] == before["attention"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, (ident, dtype, shape, value) in before["tensors"].items():
        ident2, dtype2, shape2, value2 = after["tensors"][k]
        assert (ident2, dtype2, shape2) == (ident, dtype, shape), k
        assert torch.equal(value2.view(torch.uint8), value.view(torch.uint8)), k


def check_all_or_nothing(monkeypatch, make, call, targets, at_least):
    """For each step k of `call(model)`: a fresh model from `make()`, a failure at k, the model
    unchanged. Then the call without faults succeeds. Returns that last model."""
    faults = Faults(monkeypatch, targets)
    n = faults.steps(lambda: call(make()))
    assert n >= at_least, f"only {n} steps counted"
    model = make()
    before = snapshot(model)
    for step in range(1, n + 1):
        faults.fail_at(step, lambda: call(model))
        assert_unchanged(model, before)
    call(model)
    return model


def thin():
    return Llama4.from_hf(tiny_hf_model(seed=41, **SMALL))


def test_quantize_thin_model_all_or_nothing(monkeypatch):
    targets = [(quant_model, "quantize_weight"), (Changes, "set")]
    call = lambda m: llama4_fast.quantize(m, "int4", group_size=32, attention=True, shared_expert=True)  # noqa: E731
    model = check_all_or_nothing(monkeypatch, thin, call, targets, at_least=20)
    assert isinstance(model.layers[1].feed_forward.experts, quant_model.QuantExperts)


def test_quantize_transformers_model_all_or_nothing_and_unpatched(monkeypatch):
    targets = [(quant_model, "quantize_weight"), (Changes, "set")]
    make = lambda: tiny_hf_model(seed=42, **SMALL)  # noqa: E731
    model = check_all_or_nothing(monkeypatch, make, lambda m: llama4_fast.quantize(m, "fp8"), targets, at_least=10)
    assert hf_patch.is_patched(model)


def test_quantize_refusals_change_nothing():
    model = thin()
    # a NaN in the last expert of the last MoE layer: found after three modules were quantized
    model.layers[3].feed_forward.experts.down_proj.data[-1, 5, 7] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layers\.3\.feed_forward\.experts\.down_proj holds NaN or inf"):
        llama4_fast.quantize(model, "int4", group_size=32, attention=True)
    assert_unchanged(model, before)
    model.layers[3].feed_forward.experts.down_proj.data[-1, 5, 7] = 0.0
    before = snapshot(model)
    with pytest.raises(ValueError, match="act_scale_ub must be a positive finite number"):
        llama4_fast.quantize(model, "fp8", act_scale_ub=float("inf"))
    hf = tiny_hf_model(seed=43, **SMALL)
    hf_before = snapshot(hf)
    with pytest.raises(ValueError, match="act_scale_ub must be a positive finite number"):
        llama4_fast.quantize(hf, "fp8", act_scale_ub=-1.0)
    assert_unchanged(hf, hf_before)
    assert_unchanged(model, before)


def test_quantize_again_in_another_scheme_is_refused():
    model = llama4_fast.quantize(thin(), "fp8")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already quantized in another scheme: \['fp8 \(layers"):
        llama4_fast.quantize(model, "int4", group_size=32, attention=True)
    assert_unchanged(model, before)
    llama4_fast.quantize(model, "fp8", attention=True)  # the same scheme adds what is missing
    assert isinstance(model.layers[0].self_attn.q_proj, quant_model.QuantLinear)


def test_quantize_a_model_on_the_meta_device_is_refused():
    config = llama4_fast.Llama4Config.from_hf(tiny_hf_model(seed=1, **SMALL).config)
    with torch.device("meta"):
        model = Llama4(config)
    with pytest.raises(ValueError, match="weights on the meta device"):
        llama4_fast.quantize(model, "fp8")


@torch.no_grad()
def test_a_quantized_model_survives_a_dtype_cast():
    """.to(torch.float16) casts the model, not the FP8 format: float8 weights and float32 scales
    keep their dtypes (they used to become float16 and fail at the first forward)."""
    model = llama4_fast.quantize(thin(), "fp8", attention=True)
    experts = model.layers[1].feed_forward.experts
    model.to(torch.float16)
    assert experts.gate_up_qweight.dtype == torch.float8_e4m3fn and experts.gate_up_scale.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.float16
    logits = model(torch.randint(3, 1024, (1, 9)))
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("int4")
    llama4_fast.save_quantized(llama4_fast.quantize(thin(), "int4", group_size=32, attention=True), path)
    return path


def test_load_quantized_all_or_nothing(monkeypatch, saved):
    targets = [(quant_model, "_stored_module"), (Changes, "set")]
    check_all_or_nothing(monkeypatch, thin, lambda m: llama4_fast.load_quantized(m, saved), targets, at_least=10)


def test_load_quantized_into_transformers_all_or_nothing(monkeypatch, tmp_path):
    hf = llama4_fast.quantize(tiny_hf_model(seed=44, **SMALL), "int4", group_size=32)
    llama4_fast.save_quantized(hf, tmp_path)
    targets = [(quant_model, "_stored_module"), (Changes, "set")]
    make = lambda: tiny_hf_model(seed=45, **SMALL)  # noqa: E731
    loaded = check_all_or_nothing(monkeypatch, make, lambda m: llama4_fast.load_quantized(m, tmp_path), targets,
                                  at_least=10)
    ids = torch.randint(3, 1024, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hf(ids).logits)


def edit_manifest(path, fn):
    manifest = json.loads((path / "quantization.json").read_text())
    fn(manifest)
    (path / "quantization.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, what", [
    (lambda m: m["modules"]["layers.1.feed_forward.experts"]["formats"]["down_"].update(group_size=64),
     r"layers.1.feed_forward.experts.down_ does not match its format"),
    (lambda m: m["modules"]["layers.1.feed_forward.experts"]["formats"]["down_"].update(
        kind="fp8", granularity="channel", act_scale_ub=None),
     r"layers.1.feed_forward.experts.down_ does not match its format"),
    (lambda m: m["modules"]["layers.1.feed_forward.experts"].update(module="QuantMystery"),
     "must be a QuantLinear .* or QuantExperts"),
    (lambda m: m["modules"]["layers.0.self_attn.q_proj"]["formats"][""].update(kind="int3"),
     "format must be"),
    (lambda m: m["modules"].update({"layers.9.self_attn.q_proj": m["modules"]["layers.0.self_attn.q_proj"]}),
     "lists layers.9.self_attn.q_proj, which the model does not have"),
    (lambda m: m.update(format="gptq"), "is not a llama4_fast manifest"),
])
def test_load_quantized_refuses_a_manifest_that_does_not_match(tmp_path, saved, edit, what):
    import shutil

    shutil.copytree(saved, tmp_path / "q")
    edit_manifest(tmp_path / "q", edit)
    model = thin()
    before = snapshot(model)
    with pytest.raises(ValueError, match=what):
        llama4_fast.load_quantized(model, tmp_path / "q")
    assert_unchanged(model, before)


def test_a_refused_load_leaves_a_transformers_model_unpatched(saved):
    hf = tiny_hf_model(seed=46, **SMALL)
    before = snapshot(hf)
    with pytest.raises(ValueError, match="lists layers.0.self_attn.q_proj, which the model does not have"):
        llama4_fast.load_quantized(hf, saved)  # a thin model's names
    assert_unchanged(hf, before)
    assert not hf_patch.is_patched(hf)


def test_load_quantized_refuses_a_tampered_tensor(tmp_path, saved):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(saved, tmp_path / "q")
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    state["layers.2.post_attention_layernorm.weight"] = torch.ones(64)
    save_file(state, str(tmp_path / "q" / "model.safetensors"))
    model = thin()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"post_attention_layernorm.weight \[64\] vs the model's \[128\]"):
        llama4_fast.load_quantized(model, tmp_path / "q")
    assert_unchanged(model, before)


def test_patch_all_or_nothing(monkeypatch):
    check_all_or_nothing(monkeypatch, lambda: tiny_hf_model(seed=47, **SMALL), hf_patch.patch,
                         [(Changes, "set")], at_least=10)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shard_experts_all_or_nothing(monkeypatch, one_rank_group):
    targets = [(parallel.ExpertParallelMoE, "__init__"), (Changes, "set")]
    model = check_all_or_nothing(monkeypatch, thin, parallel.shard_experts, targets, at_least=4)
    assert isinstance(model.layers[1].feed_forward, parallel.ExpertParallelMoE)
