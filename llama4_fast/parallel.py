"""Expert parallelism for the thin Llama 4 model: each rank holds E/W of the routed experts.

    torch.distributed.init_process_group("nccl")      # "gloo" on CPU
    model = Llama4.from_pretrained(path, device=f"cuda:{local_rank}")
    shard_experts(model)                               # on every rank: keeps only this rank's experts
    logits = model(tokens)                             # each rank its own tokens (data-parallel attention)

Everything but the routed experts stays replicated (attention, router, shared expert, dense
layers): each rank runs the whole model on its own batch, and at every MoE layer the ranks trade
tokens so that each token meets the rank that owns its expert. One MoE layer on rank r
(W ranks, E experts, k = top_k, T local tokens, H hidden):

1. route: weights, ids [T, k] (the router is replicated, so no communication).
2. plan: the T*k (token, expert) pairs are sorted by owner rank `id // (E / W)`; the per-rank
   pair counts [W] go through one `all_to_all_single`, so every rank learns how many rows it
   will receive from each peer (one host sync: the split sizes must be Python ints).
3. dispatch: `all_to_all_single` with those split sizes moves the rows x [N, H] (model dtype)
   and their (local expert id, router weight) pairs [N, 2] float32 (ids are small integers,
   exact in float32).
4. compute: `ops.fused_moe` over the received rows, one expert per row (the registry picks
   the Triton grouped GEMM on CUDA). The shared expert runs here too; with `overlap_shared`
   it runs while the dispatch is in flight (async_op=True).
5. combine: the results travel back with the split sizes swapped and are summed per token.

Contract: every rank of the group calls `forward` the same number of times (a rank with no
tokens for some expert, or whose experts receive none, still joins every exchange), as with any
collective. `shard_experts` checks that all ranks hold the same model before anything else,
so a mismatch or a world size that does not divide E raises ValueError on every rank instead
of hanging in the first exchange. With `Llama4.generate` that means the same number of prefill
pieces on every rank (prompts no longer than `prefill_piece`, or of equal piece counts), the
same max_new_tokens, and no eos_token_id (a rank that stops early would leave the others
waiting).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from llama4_fast import ops
from llama4_fast.model import Experts, Llama4, MoE
from llama4_fast.quant_modules import QuantExperts
from llama4_fast.transaction import all_or_nothing

# What must agree across ranks before sharding; checked with one all_gather.
_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                  "num_experts_per_tok")
# Expert weight kinds, compared across ranks by index (Python's str hash differs per process).
_EXPERT_KINDS = ("torch.float32", "torch.float16", "torch.bfloat16", "fp8_rowwise", "fp8_block", "int4", "int4_asym")


@dataclass
class ExchangePlan:
    """Who sends what to whom in one MoE layer. order [T*k]: pair indices sorted by owner rank;
    send_counts / recv_counts: rows to / from each rank (Python ints, used as split sizes)."""

    order: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]


class ExpertParallelMoE(nn.Module):
    """A thin-model MoE whose routed experts are split across the ranks of `group`.

    Holds the replicated router and shared expert of the MoE it replaces and `experts` with this
    rank's slice only: gate_up_proj [E/W, H, 2I], down_proj [E/W, I, H], experts
    [rank * E/W, (rank + 1) * E/W). forward: x [..., H] -> [..., H], as `model.MoE`.
    """

    def __init__(self, moe: MoE, group=None, overlap_shared: bool = True):
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.top_k = moe.top_k
        self.n_experts = moe.experts.gate_up_proj.shape[0]
        if self.n_experts % self.world_size:  # shard_experts checks this on every rank first
            raise ValueError(f"world size {self.world_size} does not divide the {self.n_experts} experts")
        self.experts_per_rank = self.n_experts // self.world_size
        self.first_expert = self.rank * self.experts_per_rank
        self.overlap_shared = overlap_shared
        self.router = moe.router
        self.shared_expert = moe.shared_expert
        # This rank's experts as a new module: `moe` itself stays whole, so that shard_experts can
        # put it back if a later layer fails.
        local = slice(self.first_expert, self.first_expert + self.experts_per_rank)
        if isinstance(moe.experts, QuantExperts):  # FP8 / INT4 (quantize, or an FP8 checkpoint)
            self.experts = QuantExperts(_local_experts(moe.experts.gate_up_proj, local),
                                        _local_experts(moe.experts.down_proj, local))
        else:
            full_gu, full_down = moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach()
            with torch.device("meta"):  # the shapes only; the parameters come next
                self.experts = Experts(self.experts_per_rank, full_gu.shape[1], full_down.shape[1])
            self.experts.gate_up_proj = nn.Parameter(full_gu[local].clone(), requires_grad=False)
            self.experts.down_proj = nn.Parameter(full_down[local].clone(), requires_grad=False)

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}..{self.first_expert + self.experts_per_rank - 1} of {self.n_experts}, "
                f"rank {self.rank}/{self.world_size}, overlap_shared={self.overlap_shared}")

    # -- phases (separate so that benchmarks/scaling.py can time each) ------------------------
    def route(self, flat: torch.Tensor):
        return ops.route(self.router(flat), self.top_k, "sigmoid")

    def plan(self, ids: torch.Tensor) -> ExchangePlan:
        """Sort the pairs by owner rank and exchange the counts (a collective)."""
        owner = ids.reshape(-1).long() // self.experts_per_rank
        order = torch.argsort(owner, stable=True)
        send = torch.bincount(owner, minlength=self.world_size)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return ExchangePlan(order, send.tolist(), recv.tolist())

    def dispatch(self, flat, weights, ids, plan: ExchangePlan, async_op: bool = False):
        """Send each pair's row and (local expert id, weight) to the expert's owner. Returns
        (rows [N, H], meta [N, 2] float32, works); wait on `works` when async_op."""
        rows = flat[plan.order // self.top_k]
        local_ids = (ids.reshape(-1)[plan.order] % self.experts_per_rank).float()
        meta = torch.stack([local_ids, weights.reshape(-1)[plan.order].float()], dim=1)
        n = sum(plan.recv_counts)
        recv_rows = flat.new_empty(n, flat.shape[1])
        recv_meta = meta.new_empty(n, 2)
        works = [dist.all_to_all_single(out, inp, plan.recv_counts, plan.send_counts, group=self.group,
                                        async_op=async_op) for out, inp in ((recv_rows, rows), (recv_meta, meta))]
        return recv_rows, recv_meta, works

    def run_local_experts(self, rows: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """rows [N, H] routed to this rank's experts -> their outputs [N, H]; N may be 0."""
        if rows.shape[0] == 0:
            return rows.new_empty(0, rows.shape[1])
        weights, local_ids = meta[:, 1:].contiguous(), meta[:, :1].to(torch.int32)
        return ops.fused_moe(rows, self.experts.gate_up_proj, self.experts.down_proj, weights, local_ids)

    def combine(self, results: torch.Tensor, plan: ExchangePlan, n_tokens: int) -> torch.Tensor:
        """Send the results back to the ranks their tokens came from and sum them per token."""
        back = results.new_empty(len(plan.order), results.shape[1])
        dist.all_to_all_single(back, results, plan.send_counts, plan.recv_counts, group=self.group)
        routed = torch.zeros(n_tokens, results.shape[1], dtype=torch.float32, device=results.device)
        routed.index_add_(0, plan.order // self.top_k, back.float())
        return routed.to(results.dtype)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.route(flat)
        plan = self.plan(ids)
        rows, meta, works = self.dispatch(flat, weights, ids, plan, async_op=self.overlap_shared)
        if self.overlap_shared:
            shared = self.shared_expert(flat)  # while the rows travel
            for work in works:
                work.wait()
        results = self.run_local_experts(rows, meta)
        if not self.overlap_shared:
            shared = self.shared_expert(flat)
        return (shared + self.combine(results, plan, flat.shape[0])).view_as(x)


def _local_experts(weight, local: slice):
    """A quantized expert stack (Fp8Weight / Int4Weight, experts first in every tensor) cut to
    the experts `local`. Cloned: a slice would keep the full stack's storage alive."""
    return dataclasses.replace(weight, **{f.name: getattr(weight, f.name)[local].clone()
                                          for f in dataclasses.fields(weight)
                                          if isinstance(getattr(weight, f.name), torch.Tensor)})


def _expert_kind(experts) -> str:
    w = experts.gate_up_proj
    if isinstance(w, torch.Tensor):
        return str(w.dtype)
    return w.kernel_format + ("_asym" if getattr(w, "zero", None) is not None else "")


def shard_experts(model: Llama4, group=None, *, overlap_shared: bool = True) -> Llama4:
    """Turn a thin `Llama4` into its expert-parallel form over `group` (default: the world), in
    place: every MoE layer becomes an `ExpertParallelMoE` holding only this rank's E/W experts.
    Call on every rank of the group, with the same model. Returns the model.

    Quantized experts (`llama4_fast.quantize`, or an FP8 checkpoint) are sharded in their format.
    All or nothing: a failure part-way leaves every layer as it was (the full expert stacks are
    freed when the call completes). Raises ValueError on every rank when the ranks' models
    differ (config fields or expert dtype/format) or when the world size does not divide the
    number of experts.
    """
    if not isinstance(model, Llama4):
        raise TypeError(f"model must be a llama4_fast Llama4, got {type(model).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_experts needs torch.distributed: call init_process_group first")
    world = dist.get_world_size(group)
    _check_same_model(model, group)
    n_experts = model.config.num_local_experts
    if n_experts % world:
        raise ValueError(f"world size {world} does not divide num_local_experts={n_experts}: expert parallelism "
                         f"gives every rank the same number of experts (use a world size among "
                         f"{[w for w in range(1, n_experts + 1) if n_experts % w == 0]})")
    with all_or_nothing() as changes:  # a failure (out of memory, Ctrl-C) puts every layer back
        for layer in model.layers:
            if isinstance(layer.feed_forward, MoE):
                changes.set(layer, "feed_forward", ExpertParallelMoE(layer.feed_forward, group, overlap_shared))
    return model


def _check_same_model(model: Llama4, group) -> None:
    """One all_gather of a few integers describing the model; every rank compares all of them,
    so a mismatch raises the same error everywhere before any token exchange could hang."""
    cfg = model.config
    experts = next((layer.feed_forward.experts for layer in model.layers if isinstance(layer.feed_forward, MoE)), None)
    kind = _expert_kind(experts) if experts is not None else None
    names = (*_CONFIG_FIELDS, "moe_layers", "experts_format")
    values = [int(getattr(cfg, f)) for f in _CONFIG_FIELDS]
    values.append(hash(tuple(cfg.moe_layers)))  # ints hash the same in every process
    values.append(_EXPERT_KINDS.index(kind) if kind in _EXPERT_KINDS else -1)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    differ = [f"{name} (per rank: {table[:, i].tolist()})" for i, name in enumerate(names)
              if bool((table[:, i] != table[0, i]).any())]
    if differ:
        raise ValueError("shard_experts: the ranks hold different models: " + "; ".join(differ) +
                         ". Every rank must load the same checkpoint and config.")
