"""The thin Llama4 model: loading, equality with transformers, the static KV cache, generate."""

import json

import pytest
import torch

from llama4_fast import Llama4, Llama4Config
from llama4_fast.config import rope_inv_freq
from llama4_fast.tiny import TINY_TEXT_CONFIG, tiny_hf_model

pytest.importorskip("transformers")

SMALL = dict(hidden_size=128, intermediate_size=192, intermediate_size_mlp=256, attention_chunk_size=16)


pytestmark = pytest.mark.usefixtures("torch_backend_on_cpu")


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=11, **SMALL, interleave_moe_layer_step=2)  # MoE and dense FFN layers


def _close(a, b):
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-4 * max(scale, 1.0)


@torch.no_grad()
def test_from_hf_shares_weights_and_matches(hf):
    model = Llama4.from_hf(hf)
    assert model.layers[0].self_attn.q_proj.weight.data_ptr() == hf.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert model.layers[1].feed_forward.experts.gate_up_proj.data_ptr() == \
        hf.model.layers[1].feed_forward.experts.gate_up_proj.data_ptr()
    ids = torch.randint(3, 1024, (2, 37))
    _close(model(ids), hf(ids).logits)


@pytest.mark.parametrize("shard", [None, "1MB"])
@torch.no_grad()
def test_from_pretrained_safetensors(tmp_path, hf, shard):
    kwargs = {} if shard is None else {"max_shard_size": shard}
    hf.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    model = Llama4.from_pretrained(tmp_path)
    assert model.config.moe_layers == [1, 3]
    ids = torch.randint(3, 1024, (1, 40))
    _close(model(ids), hf(ids).logits)


@torch.no_grad()
def test_from_pretrained_multimodal_checkpoint(tmp_path):
    from transformers import Llama4Config as HFConfig
    from transformers import Llama4ForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, image_size=28, patch_size=14)
    config = HFConfig(text_config=dict(TINY_TEXT_CONFIG, **SMALL), vision_config=vision)
    torch.manual_seed(12)
    mm = Llama4ForConditionalGeneration(config).eval()
    mm.save_pretrained(tmp_path, safe_serialization=True)
    model = Llama4.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(3, 1024, (1, 21))
    _close(model(ids), mm.language_model(input_ids=ids).logits)


def test_from_pretrained_errors(tmp_path, hf):
    with pytest.raises(FileNotFoundError):
        Llama4.from_pretrained(tmp_path / "missing")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    cfg.pop("no_rope_layers", None)
    cfg.pop("layer_types", None)
    cfg.pop("moe_layers", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing.*layers.4"):
        Llama4.from_pretrained(tmp_path)


def test_config_from_multimodal_dict_and_rope_scaling(hf):
    cfg = Llama4Config.from_hf({"model_type": "llama4", "text_config": hf.config.to_dict()})
    assert cfg.num_local_experts == 16 and cfg.attention_chunk_size == 16
    assert [cfg.is_chunked(i) for i in range(4)] == [True, True, True, False]
    torch.testing.assert_close(rope_inv_freq(cfg), hf.model.rotary_emb.inv_freq, rtol=0, atol=0)
    # A multimodal config keeps the dtype at its top level; text_config's is unset.
    text = dict(hf.config.to_dict(), dtype=None, torch_dtype=None)
    assert Llama4Config.from_hf({"dtype": "float32", "text_config": text}).dtype() == torch.float32


def test_config_without_chunk_size_attends_globally(hf):
    """attention_chunk_size: null means no chunked layers (as transformers reads it), not the
    default 8192; a config that omits the key keeps Llama 4's 8192."""
    stated = Llama4Config.from_hf(dict(hf.config.to_dict(), attention_chunk_size=None))
    assert stated.attention_chunk_size is None and not any(stated.is_chunked(i) for i in range(4))
    omitted = {k: v for k, v in hf.config.to_dict().items() if k != "attention_chunk_size"}
    assert Llama4Config.from_hf(omitted).attention_chunk_size == 8192


@torch.no_grad()
def test_cached_decode_equals_full_forward(hf):
    model = Llama4.from_hf(hf)
    ids = torch.randint(3, 1024, (2, 45))
    full = model(ids)
    model.setup_caches(2, 64)
    # prefill 10 (inside chunk 0), then 11 (crosses into chunk 1), then one token at a time
    steps = [model(ids[:, :10], 0), model(ids[:, 10:21], 10)]
    steps += [model(ids[:, p:p + 1], p) for p in range(21, 45)]
    _close(torch.cat(steps, dim=1), full)
    chunked = model.layers[0].self_attn.kv_cache
    assert chunked.k.shape[2] == 16  # a chunked layer keeps one chunk
    assert model.layers[3].self_attn.kv_cache.k.shape[2] == 64


@torch.no_grad()
def test_generate_greedy_matches_transformers(hf):
    model = Llama4.from_hf(hf)
    ids = torch.randint(3, 1024, (2, 20))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert torch.equal(model.generate(ids, 40), ref)
    assert torch.equal(model.generate(ids[0], 5), ref[0, :25])  # 1-D prompt


@torch.no_grad()
def test_generate_sampling_is_seeded_and_stops_at_eos(hf):
    model = Llama4.from_hf(hf)
    ids = torch.randint(3, 1024, (3, 8))
    a = model.generate(ids, 12, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(0))
    b = model.generate(ids, 12, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (3, 20)
    greedy = model.generate(ids, 12)
    eos = int(greedy[0, 8])  # make sequence 0's first greedy token the eos
    stopped = model.generate(ids, 12, eos_token_id=eos)
    assert torch.all(stopped[0, 8:] == eos)
    top1 = model.generate(ids, 6, temperature=1.0, top_k=1)  # top-1 sampling is greedy
    assert torch.equal(top1, greedy[:, :14])


def test_model_errors(hf):
    model = Llama4.from_hf(hf)
    with pytest.raises(ValueError, match="needs a KV cache"):
        model(torch.randint(3, 1024, (1, 4)), 5)
    with pytest.raises(ValueError, match=r"tokens must be an int64 \[B, S\] tensor"):
        model(torch.randint(3, 1024, (4,)))
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match="exceed the caches"):
        model(torch.randint(3, 1024, (1, 9)), 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.randint(3, 1024, (1, 4)), 0)
    model.clear_caches()


@torch.no_grad()
def test_decode_step_with_device_position_equals_full_forward(hf):
    """The graph-ready step (0-d position tensor, whole static cache, kv_len on the device)
    gives the full forward's logits, across chunk boundaries of the one-chunk caches."""
    model = Llama4.from_hf(hf)
    ids = torch.randint(3, 1024, (2, 40))
    full = model(ids)
    model.setup_caches(3, 48)  # larger than needed: stale slots past kv_len must not be read
    logits = model.prefill(ids[:, :7], piece=5)
    _close(logits, full[:, 6])
    step = model.decode_step(2)
    assert step is model.decode_step(2) and step.graph is None  # CPU: eager, reused
    for p in range(7, 40):
        _close(step(ids[:, p], p), full[:, p])


@torch.no_grad()
def test_generate_reuses_caches_and_trims_at_eos(hf):
    model = Llama4.from_hf(hf)
    ids = torch.randint(3, 1024, (1, 9))
    greedy = model.generate(ids, 40)
    k_buffer = model.layers[3].self_attn.kv_cache.k
    assert torch.equal(model.generate(ids, 20), greedy[:, :29])
    assert model.layers[3].self_attn.kv_cache.k is k_buffer  # big enough: not reallocated
    eos = int(greedy[0, 9 + 20])  # stop at the first occurrence of this token, past 16 steps
    n = int((greedy[0, 9:] == eos).int().argmax()) + 1
    assert torch.equal(model.generate(ids, 40, eos_token_id=eos), greedy[:, :9 + n])
    absent = next(t for t in range(3, 1024) if t not in greedy[0, 9:].tolist())
    assert torch.equal(model.generate(ids, 40, eos_token_id=[absent, eos]), greedy[:, :9 + n])  # any of a list


def test_decode_errors(hf):
    model = Llama4.from_hf(hf)
    with pytest.raises(ValueError, match="tensor start_pos is for decode steps"):
        model(torch.randint(3, 1024, (1, 1)), torch.tensor(3))
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match="tensor start_pos is for decode steps"):
        model(torch.randint(3, 1024, (1, 2)), torch.tensor(3))
    with pytest.raises(ValueError, match="past the caches"):
        model.decode_step(1)(torch.tensor([5]), 8)
    with pytest.raises(ValueError, match="piece"):
        model.prefill(torch.randint(3, 1024, (1, 4)), piece=-1)
    with pytest.raises(ValueError, match="pad counts leading padding tokens"):
        model(torch.randint(3, 1024, (1, 4)), pad=torch.tensor([-3]))
    for top_k in (0, -2):
        with pytest.raises(ValueError, match="top_k must be None or >= 1"):
            model.generate(torch.randint(3, 1024, (1, 4)), 2, temperature=1.0, top_k=top_k)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(torch.randint(3, 1024, (1, 4)), 2, eos_token_id=[])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
            model.decode_step(1, cuda_graph=True)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_cuda_graph_decode_equals_eager():
    from llama4_fast.tiny import tiny_hf_model as make

    model = Llama4.from_hf(make(seed=5, dtype=torch.bfloat16, device="cuda"))
    ids = torch.randint(3, 1024, (4, 50), device="cuda")
    eager = model.generate(ids, 24, cuda_graph=False)
    graphed = model.generate(ids, 24, cuda_graph=True)
    assert model.decode_step(4, True).graph is not None
    assert torch.equal(graphed, eager)
    prompts = [ids[0, :50], ids[1, :7], ids[2, :33]]  # left-padded batch: pad rides in the graph
    for e, g in zip(model.generate(prompts, 24, cuda_graph=False), model.generate(prompts, 24, cuda_graph=True)):
        assert torch.equal(g, e)


@torch.no_grad()
def test_padded_batch_equals_each_prompt_alone(hf):
    """Prompts of different lengths decode as one left-padded batch: each sequence has its own
    positions, RoPE, temperature and chunk boundaries (chunk 16; prefill pieces of 12 cross
    them at different columns per sequence), and gets exactly what it gets alone."""
    model = Llama4.from_hf(hf)
    prompts = [torch.randint(3, 1024, (n,)) for n in (5, 23, 40)]
    alone = [model(p[None])[0] for p in prompts]
    together = model.generate(prompts, 30, prefill_piece=12)
    for p, a, t in zip(prompts, alone, together):
        assert t.shape == (p.numel() + 30,) and torch.equal(t[:p.numel()], p)
        full = model(t[None])[0]
        _close(full[:p.numel()], a)  # the continuation is consistent with a full forward
        assert torch.equal(t, model.generate(p, 30)), "batched decode differs from decoding alone"


@torch.no_grad()
def test_padded_prefill_and_decode_logits(hf):
    model = Llama4.from_hf(hf)
    prompts = [torch.randint(3, 1024, (n,)) for n in (17, 3)]
    conts = torch.randint(3, 1024, (2, 20))
    S = 17
    batch = torch.zeros(2, S, dtype=torch.long)
    batch[0], batch[1, 14:] = prompts[0], prompts[1]
    pad = torch.tensor([0, 14])
    model.setup_caches(2, 40)
    logits = model.prefill(batch, piece=5, pad=pad)
    step = model.decode_step(2)
    got = [logits]
    for i in range(20):
        got.append(step(conts[:, i], S + i, pad))
    for b, p in enumerate(prompts):
        ref = model(torch.cat([p, conts[b]])[None])[0]
        _close(torch.stack([g[b] for g in got]), ref[p.numel() - 1:])
    with pytest.raises(ValueError, match="pad must be an int64 tensor"):
        model(batch, 0, pad=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        model.generate([prompts[0], torch.tensor([], dtype=torch.long)], 3)


@pytest.mark.parametrize("prompt, kwargs, error, what", [
    (torch.tensor([], dtype=torch.long), {}, ValueError, r"prompt must be a non-empty \[S\] or \[B, S\]"),
    (torch.zeros(2, 0, dtype=torch.long), {}, ValueError, "prompt must be a non-empty"),
    ([], {}, ValueError, "prompt is an empty list"),
    (torch.tensor([[5, 1024]]), {}, ValueError, r"prompt holds token ids outside the vocabulary \[0, 1024\)"),
    (torch.tensor([[5, -1]]), {}, ValueError, "outside the vocabulary"),
    (torch.tensor([[5.0, 6.0]]), {}, TypeError, "prompt must hold int64"),
    ([torch.tensor([5, 6]), torch.tensor([7, 2000])], {}, ValueError, r"prompt\[1\] holds token ids outside"),
    (torch.tensor([[5, 6]]), dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (torch.tensor([[5, 6]]), dict(max_new_tokens=None), TypeError, "max_new_tokens must be an int"),
    (torch.tensor([[5, 6]]), dict(temperature=float("nan")), ValueError, "temperature must be a finite number"),
    (torch.tensor([[5, 6]]), dict(temperature=-1.0), ValueError, "temperature must be a finite number"),
    (torch.tensor([[5, 6]]), dict(prefill_piece=0), ValueError, "prefill_piece must be None or >= 1"),
    (torch.tensor([[5, 6]]), dict(eos_token_id=[5000, 2]), ValueError, r"eos_token_id must be .* in \[0, 1024\)"),
    (torch.tensor([[5, 6]]), dict(eos_token_id=-1), ValueError, "eos_token_id must be"),
    (torch.tensor([[5, 6]]), dict(generator=0), TypeError, "generator must be a torch.Generator"),
])
def test_generate_checks_every_argument_first(hf, prompt, kwargs, error, what):
    model = Llama4.from_hf(hf)
    kwargs = dict(dict(max_new_tokens=3), **kwargs)
    with pytest.raises(error, match=what):
        model.generate(prompt, kwargs.pop("max_new_tokens"), **kwargs)
    assert model.max_batch_size == 0  # refused before the caches were set up


@torch.no_grad()
def test_a_padded_batch_cuts_each_sequence_at_its_own_eos(hf):
    """Each sequence of a list ends at its own first eos, as it does decoded alone, not at the
    batch's last (it used to come back padded with eos to the batch's length)."""
    model = Llama4.from_hf(hf)
    prompts = [torch.randint(3, 1024, (n,)) for n in (6, 11)]
    greedy = [model.generate(p, 24) for p in prompts]
    eos = int(greedy[0][6 + 4])  # sequence 0 emits it early; sequence 1 later or never
    together = model.generate(prompts, 24, eos_token_id=eos)
    for p, t in zip(prompts, together):
        assert torch.equal(t, model.generate(p, 24, eos_token_id=eos))
    assert together[0].numel() <= 6 + 5 and int(together[0][-1]) == eos
