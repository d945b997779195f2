"""torchrun worker for tests/test_parallel.py: expert parallelism of the thin model (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 --standalone ep_thin_model.py MODE

MODE
  check     every rank: (1) the EP model on its own prompt (different lengths per rank) gives the
            1-rank model's logits and greedy tokens, also with FP8 and INT4 experts; (2) a MoE layer whose router sends every token
            to rank 0's experts, so rank 1 receives none and still joins every exchange; (3) bad
            setups raise ValueError on every rank: world size not dividing the experts, and
            mismatched configs. Prints "rank R OK check".
  mismatch  rank 1 loads a model with 3 experts, rank 0 with 16: shard_experts must raise on
            both ranks (uncaught: the launch exits non-zero, fast, with the error on each rank).
"""

import datetime
import sys

import torch
import torch.distributed as dist

from llama4_fast import quantize, registry
from llama4_fast.model import Llama4
from llama4_fast.parallel import ExpertParallelMoE, shard_experts
from llama4_fast.tiny import tiny_hf_model
from teardown import end_process

SMALL = dict(hidden_size=128, intermediate_size=192, intermediate_size_mlp=256, attention_chunk_size=16)


def thin(seed=0, **overrides):
    return Llama4.from_hf(tiny_hf_model(seed=seed, **dict(SMALL, **overrides)))


def close(got, ref, what):
    scale = ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4 * max(scale, 1.0), f"rank {dist.get_rank()} {what}: max |diff| {diff:.3g} (scale {scale:.3g})"


def expect_value_error(fn, match):
    try:
        fn()
    except ValueError as e:
        assert match in str(e), f"rank {dist.get_rank()}: unexpected message: {e}"
        return
    raise AssertionError(f"rank {dist.get_rank()}: no ValueError ({match!r})")


@torch.no_grad()
def ep_equals_one_rank(rank):
    model = thin(seed=0, interleave_moe_layer_step=2)  # dense and MoE layers, as Maverick
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own prompt and length
    prompt = torch.randint(3, 1024, (2 - rank, 9 + 8 * rank), generator=gen)
    ref_logits = model(prompt)
    # one prefill piece on every rank (the ranks' prompts differ in length): the same number of
    # forward calls everywhere, as the EP contract requires; the decode crosses chunk boundaries
    ref_tokens = model.generate(prompt, 12, prefill_piece=32)
    shard_experts(model, overlap_shared=True)
    moe = model.layers[1].feed_forward
    assert isinstance(moe, ExpertParallelMoE) and moe.experts.gate_up_proj.shape[0] == 16 // dist.get_world_size()
    model.clear_caches()
    close(model(prompt), ref_logits, "EP logits")
    assert torch.equal(model.generate(prompt, 12, prefill_piece=32), ref_tokens), f"rank {rank}: EP greedy tokens differ"


@torch.no_grad()
def quantized_ep_equals_one_rank(rank):
    prompt = torch.randint(3, 1024, (1, 7 + 5 * rank), generator=torch.Generator().manual_seed(30 + rank))
    for scheme in ("fp8", "int4_asym"):
        model = quantize(thin(seed=4, interleave_moe_layer_step=2), scheme, group_size=32)
        ref_logits = model(prompt)
        shard_experts(model)
        experts = model.layers[1].feed_forward.experts
        assert experts.gate_up_proj.shape[0] == 16 // dist.get_world_size(), experts
        model.clear_caches()
        close(model(prompt), ref_logits, f"EP logits with {scheme} experts")


@torch.no_grad()
def rank_without_tokens(rank):
    moe = thin(seed=1).layers[0].feed_forward
    E, H = moe.experts.gate_up_proj.shape[:2]
    half = E // dist.get_world_size()
    # Tokens carry a large positive feature 0; rank 0's experts read it with +1, the others with -1,
    # so every token of every rank routes to an expert of rank 0 (which one varies with the noise).
    torch.manual_seed(20 + rank)
    w = moe.router.weight
    w.normal_(0, 0.05)
    w[:half, 0] = 1.0
    w[half:, 0] = -1.0
    x = torch.randn(1 + 4 * rank, H) * 0.1  # rank 0: a single token
    x[:, 0] = 4.0
    ref = moe(x)
    ep = ExpertParallelMoE(moe, overlap_shared=False)
    weights, ids = ep.route(x)
    assert bool((ids < half).all())
    plan = ep.plan(ids)
    if rank == 0:  # 1 row of its own, 5 from rank 1
        assert plan.recv_counts == [1, 5], plan.recv_counts
    else:
        assert sum(plan.recv_counts) == 0, plan.recv_counts
    close(ep(x), ref, "MoE with an idle rank")


def bad_setups(rank):
    # every rank: 3 experts cannot split over 2 ranks
    expect_value_error(lambda: shard_experts(thin(seed=2, num_local_experts=3)), "does not divide num_local_experts=3")
    # rank 1 holds a wider expert than rank 0
    wrong = thin(seed=2, intermediate_size=192 + 64 * rank)
    expect_value_error(lambda: shard_experts(wrong), "intermediate_size (per rank: [192, 256])")
    # a failed check leaves the model whole
    assert not any(isinstance(m, ExpertParallelMoE) for m in wrong.modules())


def main(mode):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    with registry.use("torch"):
        if mode == "check":
            ep_equals_one_rank(rank)
            quantized_ep_equals_one_rank(rank)
            rank_without_tokens(rank)
            bad_setups(rank)
        elif mode == "mismatch":
            shard_experts(thin(seed=3, num_local_experts=16 if rank == 0 else 3))
        else:
            raise ValueError(f"unknown mode {mode!r}")
    print(f"rank {rank} OK {mode}", flush=True)
    end_process()


if __name__ == "__main__":
    main(sys.argv[1])
