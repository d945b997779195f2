"""llama4_fast.quantize on the thin model and on a patched transformers model; INT4 save/load.

The reference for a quantized model is the same model with each quantized weight replaced
by its dequantized float weight: INT4 (weight-only) must match it to fp32 rounding; FP8 also
quantizes activations, so it is compared loosely there and exactly at the op level elsewhere.
"""

import copy

import pytest
import torch

import llama4_fast
from llama4_fast import Llama4, hf_patch, registry
from llama4_fast.quant_modules import QuantExperts, QuantLinear
from llama4_fast.tiny import tiny_hf_model

pytest.importorskip("transformers")

SMALL = dict(hidden_size=128, intermediate_size=192, intermediate_size_mlp=256, attention_chunk_size=16,
             interleave_moe_layer_step=2)  # MoE and dense FFN layers
ALL = dict(shared_expert=True, dense_ffn=True, attention=True)


def dequantized_twin(original, quantized):
    """`original` (untouched, full precision) with every weight that `quantized` quantized
    replaced by its dequantized value."""
    twin = copy.deepcopy(original)
    for name, m in quantized.named_modules():
        if isinstance(m, QuantExperts):
            t = twin.get_submodule(name)
            t.gate_up_proj.data = m.gate_up_proj.dequantize(t.gate_up_proj.dtype)
            t.down_proj.data = m.down_proj.dequantize(t.down_proj.dtype)
        elif isinstance(m, QuantLinear):
            t = twin.get_submodule(name)
            t.weight.data = m.weight_format.dequantize(t.weight.dtype).t()
    return twin


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.usefixtures("torch_backend_on_cpu")
@torch.no_grad()
@pytest.mark.parametrize("scheme,options,tol", [("int4", {}, 1e-5), ("int4_asym", ALL, 1e-5),
                                                ("fp8", {}, 0.05), ("fp8_block", ALL, 0.15)])
def test_thin_model_matches_its_dequantized_twin(scheme, options, tol):
    original = Llama4.from_hf(tiny_hf_model(seed=3, **SMALL))
    model = llama4_fast.quantize(copy.deepcopy(original), scheme, group_size=64, **options)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "QuantExperts" in kinds and ("QuantLinear" in kinds) == bool(options)
    n_linear = sum(isinstance(m, QuantLinear) for m in model.modules())
    # 4 layers x 4 attention + 2 MoE layers x 3 shared-expert + 2 dense layers x 3
    assert n_linear == (28 if options else 0)
    assert type(model.layers[1].feed_forward.router) is torch.nn.Linear  # the router stays
    assert type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(3, 1024, (2, 21))
    ref = dequantized_twin(original, model)(ids)
    out = model(ids)
    assert rel(out, ref) < tol
    assert rel(out, original(ids)) > 1e-4  # it really is a different (quantized) model
    assert torch.equal(model.generate(ids[:1, :5], 4), model.generate(ids[:1, :5], 4))


@pytest.mark.usefixtures("torch_backend_on_cpu")
@torch.no_grad()
def test_patched_transformers_model_quantizes_and_matches():
    hf = tiny_hf_model(seed=4, **SMALL)
    twin_source = copy.deepcopy(hf)
    llama4_fast.quantize(hf, "int4", group_size=64, attention=True)
    assert llama4_fast.hf_patch.is_patched(hf)
    assert isinstance(hf.model.layers[1].feed_forward.experts, QuantExperts)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, QuantLinear)
    ids = torch.randint(3, 1024, (1, 17))
    twin = llama4_fast.patch(dequantized_twin(twin_source, hf))
    with registry.record() as calls:
        out = hf(ids).logits
    assert calls[("fused_moe", "torch")] and calls[("quant_linear", "torch")]
    assert rel(out, twin(ids).logits) < 1e-5


@pytest.mark.usefixtures("torch_backend_on_cpu")
@torch.no_grad()
def test_int4_save_and_reload_gives_identical_outputs(tmp_path):
    model = llama4_fast.quantize(Llama4.from_hf(tiny_hf_model(seed=5, **SMALL)), "int4_asym", group_size=32,
                                 shared_expert=True)
    llama4_fast.save_quantized(model, tmp_path)
    fresh = Llama4.from_hf(tiny_hf_model(seed=6, **SMALL))  # other random weights, full precision
    llama4_fast.load_quantized(fresh, tmp_path)
    ids = torch.randint(3, 1024, (2, 19))
    assert torch.equal(fresh(ids), model(ids))
    e = fresh.layers[1].feed_forward.experts
    assert e.gate_up_qweight.dtype == torch.uint8 and e.gate_up_zero is not None
    with pytest.raises(ValueError, match="no quantized modules"):
        llama4_fast.save_quantized(Llama4.from_hf(tiny_hf_model(seed=6, **SMALL)), tmp_path / "x")


@pytest.mark.usefixtures("torch_backend_on_cpu")
@pytest.mark.parametrize("scheme", ["fp8", "fp8_block"])
@torch.no_grad()
def test_fp8_save_and_reload_gives_identical_outputs(tmp_path, scheme):
    model = llama4_fast.quantize(Llama4.from_hf(tiny_hf_model(seed=5, **SMALL)), scheme, attention=True)
    llama4_fast.save_quantized(model, tmp_path)
    fresh = Llama4.from_hf(tiny_hf_model(seed=6, **SMALL))
    llama4_fast.load_quantized(fresh, tmp_path)
    ids = torch.randint(3, 1024, (2, 19))
    assert torch.equal(fresh(ids), model(ids))
    saved, loaded = model.layers[1].feed_forward.experts, fresh.layers[1].feed_forward.experts
    assert loaded.gate_up_qweight.dtype == torch.float8_e4m3fn
    assert loaded.gate_up_qweight.stride() == saved.gate_up_qweight.stride()  # K-contiguous kept


@pytest.mark.usefixtures("torch_backend_on_cpu")
@torch.no_grad()
def test_int4_transformers_model_save_and_reload(tmp_path):
    hf = llama4_fast.quantize(tiny_hf_model(seed=9, **SMALL), "int4", group_size=64, attention=True)
    llama4_fast.save_quantized(hf, tmp_path)  # tied embeddings: stored once each, reloaded tied
    fresh = llama4_fast.load_quantized(tiny_hf_model(seed=10, **SMALL), tmp_path)
    assert isinstance(fresh.model.layers[0].self_attn.o_proj, QuantLinear)
    ids = torch.randint(3, 1024, (1, 15))
    assert torch.equal(fresh(ids).logits, hf(ids).logits)


@torch.no_grad()
def test_quantized_thin_model_on_the_triton_backend():
    """The quantized ops reached through the model run the Triton kernels (interpreter on CPU)
    and agree with the torch backend."""
    narrow = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=64, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                  attention_chunk_size=8, num_hidden_layers=2, interleave_moe_layer_step=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for scheme in ("int4", "fp8"):
        model = llama4_fast.quantize(Llama4.from_hf(tiny_hf_model(seed=7, device=device, **narrow)), scheme,
                                     group_size=32, attention=True)
        ids = torch.randint(3, 1024, (1, 6), device=device)
        with registry.use("torch"):
            ref = model(ids)
        with registry.record() as calls:
            out = model(ids)
        assert calls[("fused_moe", "triton")] == 2 and calls[("quant_linear", "triton")] == 8
        assert rel(out, ref) < 1e-4


def test_bad_arguments():
    model = Llama4.from_hf(tiny_hf_model(seed=8, **SMALL))
    with pytest.raises(ValueError, match="scheme"):
        llama4_fast.quantize(model, "int3")
    with pytest.raises(ValueError, match="act_scale_ub"):
        llama4_fast.quantize(model, "int4", act_scale_ub=1200.0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        llama4_fast.quantize(model, "int4", group_size=128)  # I = 192
    for bad in (16, 96):  # the kernels' INT4 steps are powers of two of at least 32 rows
        with pytest.raises(ValueError, match="power of two >= 32"):
            llama4_fast.quantize(model, "int4_asym", group_size=bad)
    with pytest.raises(TypeError, match="Llama 4"):
        llama4_fast.quantize(torch.nn.Linear(4, 4), "fp8")


def test_a_refused_quantize_changes_nothing():
    """K = 192 (the experts' down_proj) is no multiple of 128: the error names the module, and
    neither the attention projections checked before it nor the transformers model are touched."""
    hf = tiny_hf_model(seed=8, **SMALL)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.experts\.down_proj: K=192"):
        llama4_fast.quantize(hf, "int4", group_size=128, attention=True)
    assert not hf_patch.is_patched(hf)
    assert not any(isinstance(m, (QuantLinear, QuantExperts)) for m in hf.modules())
    assert all(torch.equal(v, before[k]) for k, v in hf.state_dict().items())


def test_quantize_frees_the_full_precision_modules_when_it_completes():
    """The replaced modules stay alive until the call completes (so that a failure can put them
    back), and nothing keeps them after it: the undo log goes with the call."""
    import gc
    import weakref

    model = Llama4.from_hf(tiny_hf_model(seed=8, **SMALL))
    originals = [weakref.ref(m) for name, m in model.named_modules() if name.endswith(("experts", "q_proj"))]
    assert len(originals) == 6  # 4 q_proj + 2 experts
    llama4_fast.quantize(model, "fp8", attention=True)
    gc.collect()
    assert all(ref() is None for ref in originals)
