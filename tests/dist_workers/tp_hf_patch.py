"""torchrun worker for tests/test_parallel.py: llama4_fast.patch on transformers' tensor parallel.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tp_hf_patch.py MODEL_DIR

Every rank loads the tiny checkpoint with tp_plan="auto" (gloo on CPU), runs the unpatched TP
model, patches it, and checks that logits (fp32, within 1e-4) and greedy tokens are unchanged,
on a left-padded batch whose generation crosses chunk boundaries. Prints "rank R OK" at the end.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import llama4_fast
from llama4_fast import registry
from teardown import end_process


def main(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    experts = model.model.layers[model.config.moe_layers[0]].feed_forward.experts
    assert isinstance(experts.down_proj, DTensor), "tp_plan='auto' did not shard the experts"
    assert experts.down_proj.to_local().shape[1] == model.config.intermediate_size // world
    model.generation_config.eos_token_id = None  # random weights: always the full length

    torch.manual_seed(0)  # the same inputs on every rank, as tensor parallelism requires
    ids = torch.randint(3, model.config.vocab_size, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: the layout carries per-sequence key positions
    ids[mask == 0] = 0

    def run():
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=14, min_new_tokens=14, do_sample=False)
        return logits, tokens

    ref_logits, ref_tokens = run()
    llama4_fast.patch(model)
    with registry.use("torch"), registry.record() as calls:
        logits, tokens = run()
    real = mask.bool()
    scale = ref_logits[real].abs().max().item()
    diff = (logits[real] - ref_logits[real]).abs().max().item()
    assert diff <= 1e-4 * max(scale, 1.0), f"rank {rank}: max |logit diff| {diff:.3g} (scale {scale:.3g})"
    assert torch.equal(tokens, ref_tokens), f"rank {rank}: greedy tokens differ\n{tokens}\n{ref_tokens}"
    n_moe = len(model.config.moe_layers)
    assert calls[("fused_moe", "torch")] == n_moe * 15, calls  # 1 forward + 14 decode steps, every MoE layer
    assert calls[("attention", "torch")] == model.config.num_hidden_layers * 15, calls
    print(f"rank {rank} OK max|diff| {diff:.2e}", flush=True)
    end_process()


if __name__ == "__main__":
    main(sys.argv[1])
