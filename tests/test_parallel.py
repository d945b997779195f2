"""Scale-out: llama4_fast.patch under transformers' tensor parallel and accelerate's device_map,
and expert parallelism of the thin model (llama4_fast.parallel).

The distributed cases run 2 processes with torchrun (gloo on CPU) from here, under a timeout, so
a hang fails the test instead of stalling CI; the workers live in tests/dist_workers/. On CPU
they pin the torch backend, as the other whole-model tests do.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama4_fast
from llama4_fast import registry
from llama4_fast.tiny import tiny_hf_model

pytest.importorskip("transformers")
if not torch.distributed.is_available():  # pragma: no cover - every CI torch build has it
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKERS = Path(__file__).parent / "dist_workers"
# Maverick-like: dense FFN on even layers, MoE on odd ones
SMALL = dict(hidden_size=128, intermediate_size=192, intermediate_size_mlp=256, attention_chunk_size=16,
             interleave_moe_layer_step=2)


def torchrun(worker: str, *args, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run tests/dist_workers/<worker> on `nproc` local processes; a hang fails at `timeout`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on CPU, also on a GPU box
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           str(WORKERS / worker), *map(str, args)]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{worker} {args} hung: no exit within {timeout} s\n{(e.stdout or b'')[-3000:]!r}")


def assert_every_rank_ok(run, what, nproc=2):
    log = run.stdout[-4000:] + run.stderr[-6000:]
    assert run.returncode == 0, log
    for rank in range(nproc):
        assert f"rank {rank} OK{what}" in run.stdout, log


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama4")
    tiny_hf_model(seed=1, **SMALL).save_pretrained(path)
    return path


def test_patch_under_tensor_parallel_equals_unpatched(tiny_checkpoint):
    assert_every_rank_ok(torchrun("tp_hf_patch.py", tiny_checkpoint), "")


def test_expert_parallel_thin_model():
    """EP on 2 ranks equals the 1-rank model (logits, greedy tokens); a rank whose experts get no
    tokens still joins the exchange; bad setups raise ValueError on every rank."""
    assert_every_rank_ok(torchrun("ep_thin_model.py", "check"), " check")


def test_mismatched_ranks_fail_fast_on_every_rank():
    run = torchrun("ep_thin_model.py", "mismatch", timeout=90)
    assert run.returncode != 0
    message = "ValueError: shard_experts: the ranks hold different models: num_local_experts (per rank: [16, 3])"
    for rank in range(2):
        assert f"[rank{rank}]: {message}" in run.stderr, run.stderr[-4000:]


@pytest.mark.usefixtures("torch_backend_on_cpu")
@torch.no_grad()
def test_patch_with_device_map_auto_and_disk_offload(tiny_checkpoint, tmp_path):
    """device_map="auto" with too little memory puts some layers on disk; accelerate's hooks then
    load each module's weights just before its forward. The patched MoE reads the experts'
    weights without calling the experts module, so it must run their hook itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, device_map="auto", max_memory={"cpu": "7MB"},
                                                 offload_folder=tmp_path / "offload", dtype=torch.float32)
    placement = model.hf_device_map
    assert placement.get("model.layers.0") == "cpu" and placement.get("model.layers.1") == "disk", placement
    model.generation_config.eos_token_id = None
    experts = model.model.layers[1].feed_forward.experts
    ids = torch.randint(3, 1024, (1, 20))
    mask = torch.ones_like(ids)
    ref_logits = model(ids).logits
    ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    llama4_fast.patch(model)
    with registry.record() as calls:
        logits = model(ids).logits
    assert sum(n for (op, _), n in calls.items() if op == "fused_moe") == 2
    assert experts.gate_up_proj.device.type == "meta"  # offloaded again after the forward
    scale = ref_logits.abs().max().item()
    assert (logits - ref_logits).abs().max().item() <= 1e-4 * max(scale, 1.0)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, ref_tokens)


def test_shard_experts_needs_a_thin_model_and_a_process_group():
    from llama4_fast.model import Llama4
    from llama4_fast.parallel import shard_experts

    with pytest.raises(TypeError, match="model must be a llama4_fast Llama4"):
        shard_experts(tiny_hf_model(seed=0, **SMALL))
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="call init_process_group first"):
            shard_experts(Llama4.from_hf(tiny_hf_model(seed=0, **SMALL)))
