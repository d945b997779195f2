"""Checkpoint loading refuses what does not match the config, before it reads any weight.

Each case starts from a good tiny checkpoint written by transformers and breaks one thing: a
tensor's shape, dtype or name, a stray or missing file, the index, config.json. The load must
fail with an error naming the file and the tensor or field (never load and give other logits),
and it must fail from the file headers alone (`iter_tensors`, the only reader of tensor data,
is made to explode).
"""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama4_fast import Llama4, checkpoint
from llama4_fast.tiny import tiny_hf_model

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_backend_on_cpu")

SMALL = dict(hidden_size=128, intermediate_size=96, intermediate_size_mlp=192, attention_chunk_size=16,
             interleave_moe_layer_step=2, num_local_experts=4)
ROUTER = "model.layers.1.feed_forward.router.weight"


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=31, **SMALL)


@pytest.fixture
def ckpt(tmp_path, hf):
    hf.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    return tmp_path / "ckpt"


@pytest.fixture
def no_reads(monkeypatch):
    """Make reading any tensor data an error: what follows must be refused from headers."""
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read before the checkpoint was validated")

    monkeypatch.setattr(checkpoint, "iter_tensors", refuse)


def edit_weights(path, fn, file="model.safetensors"):
    tensors = load_file(str(path / file))
    fn(tensors)
    save_file(tensors, str(path / file))


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@torch.no_grad()
def test_a_good_checkpoint_loads_and_matches(ckpt, hf):
    model = Llama4.from_pretrained(ckpt, dtype="float32")
    ids = torch.randint(3, 1024, (1, 20))
    torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, shape, what", [
    (ROUTER, (8, 128), r"router.weight \(model.safetensors\) is \[8, 128\], the config implies \[4, 128\]"),
    ("lm_head.weight", (1000, 128), r"lm_head.weight \(model.safetensors\) is \[1000, 128\]"),
    ("model.embed_tokens.weight", (1100, 128), r"embed_tokens.weight \(model.safetensors\) is \[1100, 128\]"),
    ("model.layers.0.self_attn.k_proj.weight", (32, 128), r"k_proj.weight .* is \[32, 128\]"),
    ("model.layers.1.feed_forward.experts.down_proj", (4, 96, 64), r"down_proj .* is \[4, 96, 64\]"),
])
def test_a_tensor_of_another_shape_is_refused(ckpt, no_reads, name, shape, what):
    edit_weights(ckpt, lambda t: t.__setitem__(name, torch.randn(shape)))
    with pytest.raises(ValueError, match=what):
        Llama4.from_pretrained(ckpt)


@pytest.mark.parametrize("dtype, what", [(torch.int8, "is int8"), (torch.float8_e4m3fn, "need a quantization_config")])
def test_a_tensor_of_a_non_float_dtype_is_refused(ckpt, no_reads, dtype, what):
    edit_weights(ckpt, lambda t: t.__setitem__(ROUTER, t[ROUTER].to(dtype)))
    with pytest.raises(ValueError, match=f"router.weight .*{what}"):
        Llama4.from_pretrained(ckpt)


def test_unexpected_and_missing_tensors_are_refused(ckpt, no_reads):
    edit_weights(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(256)))
    with pytest.raises(ValueError, match=r"unexpected \['layers.0.self_attn.q_proj.bias \(model.safetensors\)'\]"):
        Llama4.from_pretrained(ckpt)
    edit_weights(ckpt, lambda t: (t.pop("model.layers.0.self_attn.q_proj.bias"), t.pop("model.norm.weight")))
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\]"):
        Llama4.from_pretrained(ckpt)
    edit_weights(ckpt, lambda t: t.__setitem__("model.norm.weight", torch.ones(128)))
    edit_weights(ckpt, lambda t: t.__setitem__("some_adapter.lora_A", torch.ones(2)))
    with pytest.raises(ValueError, match="not Llama 4's: .*some_adapter.lora_A"):
        Llama4.from_pretrained(ckpt)


@torch.no_grad()
def test_a_stray_file_beside_model_safetensors_is_not_read(ckpt, hf, caplog):
    """Without an index only model.safetensors is read: a stray file with other weights (an old
    shard, a LoRA merge) used to be merged in and override them."""
    save_file({ROUTER: torch.randn(4, 128), "model.norm.weight": torch.full((128,), 3.0)},
              str(ckpt / "extra.safetensors"))
    with caplog.at_level(logging.WARNING, logger="llama4_fast"):
        model = Llama4.from_pretrained(ckpt, dtype=torch.float32)
    assert "not reading ['extra.safetensors']" in caplog.text
    ids = torch.randint(3, 1024, (1, 12))
    torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither model.safetensors nor .* \(found \['extra.safetensors'\]"):
        Llama4.from_pretrained(ckpt)


def test_sharded_checkpoints_read_only_what_the_index_assigns(tmp_path, hf, no_reads):
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    # a tensor stored in a shard that the index assigns elsewhere
    edit_weights(tmp_path, lambda t: t.__setitem__(ROUTER, torch.zeros(4, 128)), file=shards[0])
    if index["weight_map"][ROUTER] == shards[0]:
        index["weight_map"][ROUTER] = shards[1]
        index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not assign to it|lacks tensors"):
        Llama4.from_pretrained(tmp_path)
    index_file.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="index.json: weight_map must map"):
        Llama4.from_pretrained(tmp_path)
    index_file.write_text(json.dumps({"weight_map": {ROUTER: "model-09-of-09.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-09-of-09.safetensors"):
        Llama4.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, error, what", [
    (lambda c: c.pop("num_attention_heads"), ValueError, "config.json: missing num_attention_heads"),
    (lambda c: c.pop("num_key_value_heads"), ValueError, "config.json: missing num_key_value_heads"),
    (lambda c: c.pop("head_dim"), ValueError, "config.json: missing head_dim"),
    (lambda c: c.pop("hidden_size"), ValueError, "config.json: missing hidden_size"),
    (lambda c: c.update(dtype="int8"), ValueError, "config.json: dtype must be"),
    (lambda c: c.update(num_experts_per_tok=9), ValueError, "num_experts_per_tok=9 exceeds"),
    (lambda c: c.update(num_attention_heads=5), ValueError, "multiple of num_key_value_heads"),
    (lambda c: c.update(hidden_act="gelu"), ValueError, "hidden_act='gelu' is not supported"),
    (lambda c: c.update(moe_layers=[1, 7]), ValueError, "moe_layers must be a list of layers < 4"),
])
def test_a_bad_config_is_refused_naming_the_file_and_field(ckpt, no_reads, edit, error, what):
    edit_config(ckpt, edit)
    with pytest.raises(error, match=what):
        Llama4.from_pretrained(ckpt)


def test_config_json_that_is_not_an_object(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        Llama4.from_pretrained(ckpt)
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json must hold a JSON object, got a list"):
        Llama4.from_pretrained(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: no such file"):
        Llama4.from_pretrained(ckpt)


def test_path_and_dtype_arguments(ckpt):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        Llama4.from_pretrained(ckpt / "nope")
    with pytest.raises(NotADirectoryError, match="is a file: pass the checkpoint directory"):
        Llama4.from_pretrained(ckpt / "config.json")
    with pytest.raises(TypeError, match="dtype must be"):
        Llama4.from_pretrained(ckpt, dtype=torch.int8)
    with pytest.raises(TypeError, match="dtype must be"):
        Llama4.from_pretrained(ckpt, dtype="int8")
    assert Llama4.from_pretrained(ckpt, dtype="float16").lm_head.weight.dtype == torch.float16


def test_a_corrupt_file_is_refused_naming_it(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        Llama4.from_pretrained(ckpt)


def test_from_hf_of_a_text_model_without_lm_head(hf):
    with pytest.raises(ValueError, match="Llama4TextModel has no lm_head"):
        Llama4.from_hf(hf.model)
