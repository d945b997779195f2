"""Quantize while loading (`Llama4.from_pretrained(path, quantize=...)`): the same model as
loading in full precision then quantizing, without ever holding the full-precision experts.

Synthetic checkpoints in the real Llama 4 naming, written by transformers and resharded here:
text-only (`model.layers...`) and the multimodal `language_model.` layout, interleaved MoE and
dense layers, several shards with an index. Peak memory is measured in a subprocess from the
process's anonymous resident memory (RssAnon, sampled while it loads): page-cache pages of the
memory-mapped shards are not allocations and are not counted.
"""

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama4_fast
from llama4_fast import Llama4, checkpoint
from llama4_fast.quant_modules import QuantExperts
from llama4_fast.tiny import tiny_hf_model

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_backend_on_cpu")

SMALL = dict(hidden_size=128, intermediate_size=96, intermediate_size_mlp=192, attention_chunk_size=16,
             interleave_moe_layer_step=2, num_local_experts=4, num_hidden_layers=4)


def reshard(src, dst, *, prefix="", shards=3, multimodal=False):
    """Rewrite the checkpoint in `src` as `shards` files with an index under `dst`, every text
    tensor renamed with `prefix` (the multimodal layout puts the text model under
    `language_model.`), and config.json nested under text_config for a multimodal one."""
    dst.mkdir()
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = {prefix + n: tensors[n] for n in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(dst / fname))
        weight_map.update({k: fname for k in part})
    (dst / checkpoint.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    if multimodal:
        cfg = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": cfg}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    hf = tiny_hf_model(seed=41, **SMALL)
    hf.save_pretrained(root / "saved", safe_serialization=True)
    return {"text": reshard(root / "saved", root / "text"),
            "multimodal": reshard(root / "saved", root / "multimodal", prefix="language_model.", multimodal=True)}


@pytest.mark.parametrize("layout", ["text", "multimodal"])
@pytest.mark.parametrize("scheme, group_size", [("int4", 32), ("fp8", 128), ("fp8_block", 128)])
@torch.no_grad()
def test_streamed_load_equals_load_then_quantize(checkpoints, layout, scheme, group_size):
    path = checkpoints[layout]
    streamed = Llama4.from_pretrained(path, dtype="float32", quantize=scheme, group_size=group_size)
    reference = llama4_fast.quantize(Llama4.from_pretrained(path, dtype="float32"), scheme, group_size)
    experts = [m for m in streamed.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 2  # the MoE layers (1 and 3) of 4; the dense ones stay as they are
    ref_state, state = reference.state_dict(), streamed.state_dict()
    assert state.keys() == ref_state.keys()
    for name, t in state.items():
        assert t.dtype == ref_state[name].dtype and torch.equal(t, ref_state[name]), name
    ids = torch.randint(3, 1024, (2, 21))
    assert torch.equal(streamed(ids), reference(ids))


def test_quantize_arguments_are_checked_before_any_read(checkpoints, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read before the arguments were checked")

    monkeypatch.setattr(checkpoint, "iter_tensors", refuse)
    with pytest.raises(ValueError, match="quantize must be one of"):
        Llama4.from_pretrained(checkpoints["text"], quantize="int3")
    with pytest.raises(ValueError, match=r"down_proj: K=96 is not a multiple of group_size=64"):
        Llama4.from_pretrained(checkpoints["text"], quantize="int4", group_size=64)


def test_a_shard_that_fails_midway_leaves_nothing_allocated(checkpoints, tmp_path, monkeypatch):
    """The second shard becomes unreadable after the headers were checked (a disk error, a
    file replaced underneath): the error names it, and every tensor read so far is freed."""
    path = reshard(checkpoints["text"], tmp_path / "ckpt")
    shards = sorted(path.glob("*.safetensors"))
    read = []
    real_iter = checkpoint.iter_tensors

    def iter_and_break(stored, **kwargs):
        for i, (name, t) in enumerate(real_iter(stored, **kwargs)):
            read.append(weakref.ref(t))
            if i == 0:
                shards[1].write_bytes(shards[1].read_bytes()[:100])  # truncate the next shard
            yield name, t
            del t  # (this wrapper's frame outlives the failure in the traceback)

    monkeypatch.setattr(checkpoint, "iter_tensors", iter_and_break)
    with pytest.raises(ValueError, match=shards[1].name) as failure:
        Llama4.from_pretrained(path, dtype="float32", quantize="int4", group_size=32)
    assert "could not be read" in str(failure.value)
    gc.collect()
    assert read and all(r() is None for r in read), "tensors read before the failure are still alive"


PEAK_SCRIPT = textwrap.dedent("""
    import sys, threading, time, torch
    from llama4_fast import Llama4, loading

    def anon_kib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    peak, done = [0], [False]
    def sample():
        while not done[0]:
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.0005)
    loading.check_checkpoint(Llama4, sys.argv[1])  # the libraries a load imports, before the baseline
    base = anon_kib()
    threading.Thread(target=sample, daemon=True).start()
    model = Llama4.from_pretrained(sys.argv[1], dtype="bfloat16", quantize="int4", group_size=128)
    done[0] = True
    kept = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print((max(peak[0], anon_kib()) - base) * 1024, kept)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_is_the_quantized_model_plus_one_expert_stack(tmp_path):
    """A checkpoint whose experts are 32 MB a stack (bf16), 96 MB in all, loads with an
    anonymous-memory peak under the quantized model + one stack + the quantizer's working set
    (one expert in fp32 and one temporary) + 16 MB of slack, far below the checkpoint's size."""
    E, H, I = 8, 1024, 1024
    big = dict(SMALL, hidden_size=H, intermediate_size=I, intermediate_size_mlp=256, num_local_experts=E,
               vocab_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    tiny_hf_model(seed=42, dtype=torch.bfloat16, **big).save_pretrained(tmp_path / "saved", safe_serialization=True)
    path = reshard(tmp_path / "saved", tmp_path / "ckpt", shards=4)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    # glibc serves large blocks from mmap (returned to the system when freed) only below a
    # threshold it raises as blocks are freed; pinned, freed tensors leave RssAnon at once.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    peak, kept = map(int, run.stdout.split())
    stack = E * H * 2 * I * 2  # the larger stack, gate_up [E, H, 2I] in bf16
    one_expert_fp32 = H * 2 * I * 4
    bound = kept + stack + 2 * one_expert_fp32 + 16 * 2**20
    assert peak < bound, f"peak {peak / 2**20:.0f} MB >= {bound / 2**20:.0f} MB (kept {kept / 2**20:.0f} MB)"
    assert peak < 0.6 * size, f"peak {peak / 2**20:.0f} MB vs checkpoint {size / 2**20:.0f} MB"


@pytest.mark.parametrize("layout", ["text", "multimodal"])
@torch.no_grad()
def test_transformers_model_quantized_while_loading(checkpoints, layout):
    """hf_loading.from_pretrained_quantized: the patched transformers model with INT4 experts,
    equal (state and logits) to quantize(patch(from_pretrained(...))), built without the
    full-precision experts; a multimodal checkpoint gives its language model."""
    from transformers import AutoModelForCausalLM

    from llama4_fast import hf_loading, hf_patch

    path = checkpoints[layout]
    model = hf_loading.from_pretrained_quantized(path, "int4", group_size=32, dtype="float32",
                                                 device_map={"": "cpu", "model.layers.1": "cpu"})
    assert hf_patch.is_patched(model) and isinstance(model.model.layers[1].feed_forward.experts, QuantExperts)
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["text"], dtype=torch.float32)
    reference = llama4_fast.quantize(llama4_fast.patch(reference), "int4", group_size=32)
    state, ref_state = model.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    ids = torch.randint(3, 1024, (2, 21))
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_transformers_quantized_load_checks_first(checkpoints, monkeypatch):
    from llama4_fast import hf_loading

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read before the arguments were checked")

    monkeypatch.setattr(checkpoint, "iter_tensors", refuse)
    with pytest.raises(ValueError, match="K=96 is not a multiple of group_size=64"):
        hf_loading.from_pretrained_quantized(checkpoints["text"], "int4", group_size=64)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device_map='auto' needs CUDA devices"):
            hf_loading.from_pretrained_quantized(checkpoints["text"], "int4", group_size=32, device_map="auto")
