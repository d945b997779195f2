"""FP8 checkpoints as transformers writes them: fbgemm_fp8 (Maverick FP8) and compressed-tensors
FP8-dynamic, each written here for the tiny config, loaded by the thin model as stored; and a
transformers model holding fbgemm_fp8 modules, patched.

The reference is the same model quantized by `llama4_fast.quantize("fp8")`, which computes the
same per-channel e4m3 values and scales: loading must reproduce it (same bytes, same outputs),
and both stay close to the dequantized-weight model.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import llama4_fast
from llama4_fast import Llama4
from llama4_fast.quant import Fp8Weight
from llama4_fast.quant_modules import QuantExperts, QuantLinear
from llama4_fast.tiny import tiny_hf_model

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_backend_on_cpu")

SMALL = dict(hidden_size=128, intermediate_size=96, intermediate_size_mlp=192, attention_chunk_size=16,
             interleave_moe_layer_step=2, num_local_experts=4)
UB = 1200.0


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def write_checkpoint(path, hf, tensors, quantization_config):
    config = hf.config.to_dict()
    config["quantization_config"] = quantization_config
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def fp8_rows(w):
    """e4m3 per output row of an [N, K] weight: (q [N, K], scale [N, 1]) as fbgemm's
    quantize_fp8_per_row and compressed-tensors' channel strategy store them."""
    W = Fp8Weight.quantize(w.t())
    return W.qweight.t(), W.scale[:, None]


def base_tensors(hf):
    return {k: v for k, v in hf.state_dict().items() if "experts" not in k and "shared_expert" not in k}


@torch.no_grad()
def test_fbgemm_fp8_checkpoint_loads_as_stored(tmp_path):
    hf = tiny_hf_model(seed=12, **SMALL)
    tensors = base_tensors(hf)
    stored = {}
    for i in (1, 3):  # the MoE layers
        p = f"model.layers.{i}.feed_forward."
        experts = hf.model.layers[i].feed_forward.experts
        gu = Fp8Weight.quantize(experts.gate_up_proj)       # per column of [E, H, 2I]
        down = Fp8Weight.quantize(experts.down_proj)
        tensors[p + "experts.gate_up_proj"] = gu.qweight    # [E, H, 2I] e4m3
        tensors[p + "experts.gate_up_proj_scale"] = gu.scale[:, None, :]  # [E, 1, 2I]
        tensors[p + "experts.down_proj"] = down.qweight
        tensors[p + "experts.down_proj_scale"] = down.scale[:, :, None]   # [E, H, 1]
        stored[i] = gu.qweight.contiguous()
        for proj in ("gate_proj", "up_proj", "down_proj"):
            q, s = fp8_rows(getattr(hf.model.layers[i].feed_forward.shared_expert, proj).weight)
            tensors[p + f"shared_expert.{proj}.weight"], tensors[p + f"shared_expert.{proj}.weight_scale"] = q, s
    write_checkpoint(tmp_path / "ckpt", hf, tensors, {"quant_method": "fbgemm_fp8", "activation_scale_ub": UB,
                                                      "modules_to_not_convert": ["self_attn", "router"]})

    model = Llama4.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    experts = model.layers[1].feed_forward.experts
    assert isinstance(experts, QuantExperts) and isinstance(model.layers[1].feed_forward.shared_expert.up_proj, QuantLinear)
    assert experts.gate_up_proj.act_scale_ub == UB and experts.gate_up_proj.qweight.dtype == torch.float8_e4m3fn
    assert torch.equal(experts.gate_up_proj.qweight.view(torch.uint8), stored[1].view(torch.uint8))  # as stored

    original = Llama4.from_hf(hf)
    ours = llama4_fast.quantize(copy.deepcopy(original), "fp8", shared_expert=True, act_scale_ub=UB)
    ids = torch.randint(3, 1024, (2, 13))
    out = model(ids)
    assert rel(out, ours(ids)) < 1e-5
    assert rel(out, original(ids)) < 0.05


@torch.no_grad()
def test_compressed_tensors_fp8_dynamic_checkpoint_loads_as_stored(tmp_path):
    hf = tiny_hf_model(seed=13, **SMALL)
    tensors = base_tensors(hf)
    for i in (1, 3):
        p = f"model.layers.{i}.feed_forward."
        ffn = hf.model.layers[i].feed_forward
        E, H, two_i = ffn.experts.gate_up_proj.shape
        inter = two_i // 2
        for e in range(E):  # llm-compressor unrolls the experts into per-expert linears
            weights = {"gate_proj": ffn.experts.gate_up_proj[e, :, :inter].t(),
                       "up_proj": ffn.experts.gate_up_proj[e, :, inter:].t(),
                       "down_proj": ffn.experts.down_proj[e].t()}
            for proj, w in weights.items():
                q, s = fp8_rows(w)
                tensors[p + f"experts.{e}.{proj}.weight"] = q
                tensors[p + f"experts.{e}.{proj}.weight_scale"] = s.to(torch.bfloat16).float()
        for proj in ("gate_proj", "up_proj", "down_proj"):  # shared expert: per-tensor strategy
            w = getattr(ffn.shared_expert, proj).weight
            W = Fp8Weight.quantize(w.t(), "tensor")
            tensors[p + f"shared_expert.{proj}.weight"] = W.qweight.t()
            tensors[p + f"shared_expert.{proj}.weight_scale"] = W.scale
    config = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}},
        "ignore": ["re:.*self_attn.*", "re:.*router", "lm_head"]}
    write_checkpoint(tmp_path / "ckpt", hf, tensors, config)

    model = Llama4.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    experts = model.layers[3].feed_forward.experts
    assert isinstance(experts, QuantExperts) and experts.gate_up_proj.shape == (4, 128, 192)
    assert model.layers[1].feed_forward.shared_expert.gate_proj.weight_format.granularity == "tensor"

    original = Llama4.from_hf(hf)
    ours = copy.deepcopy(original)
    llama4_fast.quantize(ours, "fp8")
    for i in (1, 3):  # the checkpoint's shared expert is per-tensor: give ours the same weights
        ours.layers[i].feed_forward.shared_expert = model.layers[i].feed_forward.shared_expert
    for i in (1, 3):  # scales went through bf16 in the checkpoint: give ours the same
        q = ours.layers[i].feed_forward.experts
        for prefix in ("gate_up_", "down_"):
            s = getattr(q, prefix + "scale")
            s.copy_(s.to(torch.bfloat16).float())
        q._cache.clear()
    ids = torch.randint(3, 1024, (2, 13))
    out = model(ids)
    assert rel(out, ours(ids)) < 1e-5
    assert rel(out, original(ids)) < 0.05


def test_unsupported_quantization_configs_raise(tmp_path):
    hf = tiny_hf_model(seed=14, **SMALL)
    for i, qcfg in enumerate([{"quant_method": "gptq"},
                              {"quant_method": "compressed-tensors", "format": "pack-quantized"},
                              {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
                                  "g": {"weights": {"num_bits": 8, "type": "float", "strategy": "block"}}}}]):
        write_checkpoint(tmp_path / f"c{i}", hf, base_tensors(hf), qcfg)
        with pytest.raises(ValueError, match="not supported|not FP8"):
            Llama4.from_pretrained(tmp_path / f"c{i}")


@torch.no_grad()
def test_patch_runs_transformers_fbgemm_fp8_modules():
    """A transformers model as its fbgemm_fp8 quantizer leaves it (FbgemmFp8Llama4TextExperts,
    FbgemmFp8Linear, input_scale_ub filled): the patch reads those weights as stored."""
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear, FbgemmFp8Llama4TextExperts

    hf = tiny_hf_model(seed=15, **SMALL)
    reference = llama4_fast.quantize(copy.deepcopy(hf), "fp8", shared_expert=True, act_scale_ub=UB)
    for i in (1, 3):
        ffn = hf.model.layers[i].feed_forward
        fb = FbgemmFp8Llama4TextExperts(hf.config)
        gu, down = Fp8Weight.quantize(ffn.experts.gate_up_proj), Fp8Weight.quantize(ffn.experts.down_proj)
        fb.gate_up_proj.data, fb.gate_up_proj_scale.data = gu.qweight.contiguous(), gu.scale[:, None, :]
        fb.down_proj.data, fb.down_proj_scale.data = down.qweight.contiguous(), down.scale[:, :, None]
        fb.input_scale_ub.fill_(UB)
        ffn.experts = fb
        for proj in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(ffn.shared_expert, proj)
            new = FbgemmFp8Linear(lin.in_features, lin.out_features, False)
            new.weight.data, new.weight_scale.data = fp8_rows(lin.weight)
            new.input_scale_ub.fill_(UB)
            setattr(ffn.shared_expert, proj, new)
    llama4_fast.patch(hf)
    ids = torch.randint(3, 1024, (1, 11))
    assert rel(hf(ids).logits, reference(ids).logits) < 1e-5
    llama4_fast.unpatch(hf)
    assert not hasattr(hf.model.layers[1].feed_forward.experts, "_llama4_fast_fp8")
