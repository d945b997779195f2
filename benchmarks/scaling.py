"""Expert-parallel MoE layer (llama4_fast.parallel): time split into compute and communication,
per world size, plus the communication-volume model for Maverick (docs/scaling.md).

One Maverick MoE layer (E=128, top-1, H=5120, I=8192, bf16) split over W ranks, each rank with T
tokens of its own (data-parallel attention, random router weights so the load is roughly even).
Phases, each timed on its own with the same number of iterations on every rank (a collective
cannot run a different count per rank, so do_bench's adaptive repeat is not used here):
  compute  route + local experts (ops.fused_moe on the rows received) + shared expert
  comm     counts all-to-all + rows dispatch + results combine (all_to_all_single)
  layer    the whole forward, shared expert overlapped with the dispatch
Each phase reports the slowest rank (max over ranks of the per-rank mean). Bytes sent per rank
come from the actual exchange plan.

    python benchmarks/scaling.py                 # every world size 1, 2, 4, 8 <= GPUs here (torchrun per W)
    python benchmarks/scaling.py --volume-only   # just the Maverick memory / volume model tables
    python benchmarks/scaling.py --quick         # CPU: gloo, toy layer, W = 1 and 2
A single GPU runs W = 1 and prints the volume model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gpu_name, markdown_table, write_results  # noqa: E402

# -- the volume / memory model (docs/scaling.md): computed from the published config ---------------
MAVERICK = dict(hidden=5120, layers=48, moe_layers=24, dense_layers=24, experts=128, top_k=1, expert_inter=8192,
                shared_inter=8192, dense_inter=16384, q_heads=40, kv_heads=8, head_dim=128, vocab=202048,
                chunk=8192, global_every=4)
# bytes per weight: FP8 one scale per output channel; INT4 group 128 with a bf16 scale per group
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5 + 2 / 128}
HBM_GB = 80.0  # H100 SXM, as published
RESERVE_GB = 6.0  # an assumption: activations, workspaces, CUDA context, fragmentation


def parameter_counts(c=MAVERICK) -> dict:
    H = c["hidden"]
    attn = H * (c["q_heads"] + 2 * c["kv_heads"]) * c["head_dim"] + c["q_heads"] * c["head_dim"] * H
    experts = c["moe_layers"] * c["experts"] * 3 * H * c["expert_inter"]
    shared = c["moe_layers"] * (3 * H * c["shared_inter"] + H * c["experts"])  # + router
    dense = c["dense_layers"] * 3 * H * c["dense_inter"]
    return {"attention": c["layers"] * attn, "experts": experts, "shared+router": shared, "dense_ffn": dense,
            "embed+lm_head": 2 * c["vocab"] * H}


def kv_bytes_per_sequence(context: int, c=MAVERICK, kv_bytes: float = 2.0) -> float:
    """K and V of one sequence at `context` tokens: global (NoPE) layers keep every position,
    chunked layers only the current chunk."""
    per_token_layer = 2 * c["kv_heads"] * c["head_dim"] * kv_bytes
    n_global = c["layers"] // c["global_every"]
    return per_token_layer * (n_global * context + (c["layers"] - n_global) * min(context, c["chunk"]))


def memory_table(gpus: int, context: int, c=MAVERICK) -> list[dict]:
    """GB per GPU: weights (TP: everything / gpus; EP+DP: experts / gpus, the rest replicated)
    and the KV cache of one sequence at `context` (TP: KV heads split, at least one per GPU;
    DP attention: the whole sequence on its GPU). Embeddings stay bf16 in every format."""
    p = parameter_counts(c)
    emb = p["embed+lm_head"] * 2
    rest = sum(v for k, v in p.items() if k not in ("experts", "embed+lm_head"))
    rows = []
    for fmt, b in WEIGHT_BYTES.items():
        tp = (p["experts"] * b + rest * b + emb) / gpus
        ep = p["experts"] * b / gpus + rest * b + emb
        rows.append({"format": fmt, "gpus": gpus, "tp_weights_gb": tp / 1e9, "ep_dp_weights_gb": ep / 1e9})
    kv = kv_bytes_per_sequence(context, c)
    heads_per_gpu = max(1, c["kv_heads"] // gpus)
    for r in rows:
        r["kv_seq_tp_gb"] = kv * heads_per_gpu / c["kv_heads"] / 1e9
        r["kv_seq_dp_gb"] = kv / 1e9
        # whole sequences the cluster holds: TP spreads each over all GPUs, DP keeps each on one
        free_tp, free_ep = HBM_GB - RESERVE_GB - r["tp_weights_gb"], HBM_GB - RESERVE_GB - r["ep_dp_weights_gb"]
        r["seqs_tp"] = max(0, int(free_tp / r["kv_seq_tp_gb"]))
        r["seqs_ep_dp"] = gpus * max(0, int(free_ep / r["kv_seq_dp_gb"]))
    return rows


def volume_table(worlds=(8, 16), c=MAVERICK, act_bytes: int = 2) -> list[dict]:
    """Bytes one GPU sends per MoE layer, per token of the global batch (B tokens over all GPUs).

    TP (W-way): every GPU holds every token; a ring all-reduce of the H-vector sends
    2 (W-1)/W * H * b per token: once for the MoE output (routed + shared fused; transformers
    reduces them separately, twice) and once after attention (o_proj).
    EP (W-way, data-parallel attention): a GPU holds B/W tokens and sends each token's k rows to
    their owners and takes them back: 2 * k * (W-1)/W * (H * b + 8) / W per global token (8 bytes
    of expert id + weight ride along the dispatch only; counted twice here, a rounding error).
    Not per token: EP's counts exchange, W * 8 bytes per layer, and its host sync."""
    H, k = c["hidden"], c["top_k"]
    rows = []
    for W in worlds:
        allreduce = 2 * (W - 1) / W * H * act_bytes
        ep = 2 * k * (W - 1) / W * (H * act_bytes + 8) / W
        rows.append({"gpus": W, "tp_moe_allreduce_B": allreduce, "tp_attn_allreduce_B": allreduce,
                     "ep_all_to_all_B": ep, "tp_over_ep": 2 * allreduce / ep})
    return rows


def print_volume_model(context: int = 131072):
    p = parameter_counts()
    print(f"Maverick parameters (computed): {sum(p.values()) / 1e9:.1f} B  " +
          ", ".join(f"{k} {v / 1e9:.2f} B" for k, v in p.items()))
    for gpus in (8, 16):
        print(f"\nmemory per GPU, {gpus} GPUs (computed; KV for one sequence at {context} tokens, bf16 KV)")
        print(markdown_table(memory_table(gpus, context), [
            ("format", "weights", ""), ("tp_weights_gb", "TP GB", ".1f"), ("ep_dp_weights_gb", "EP+DP GB", ".1f"),
            ("kv_seq_tp_gb", "KV/seq TP GB", ".2f"), ("kv_seq_dp_gb", "KV/seq DP GB", ".2f"),
            ("seqs_tp", "seqs TP", ""), ("seqs_ep_dp", "seqs EP+DP", "")]))
    print("\nbytes sent per GPU per MoE layer, per token of the global batch, bf16 activations (computed)")
    print(markdown_table(volume_table(), [
        ("gpus", "GPUs", ""), ("tp_moe_allreduce_B", "TP all-reduce (MoE)", ".0f"),
        ("tp_attn_allreduce_B", "TP all-reduce (attn)", ".0f"), ("ep_all_to_all_B", "EP all-to-all", ".0f"),
        ("tp_over_ep", "TP (MoE+attn) / EP", ".1f")]))


# -- measurement ----------------------------------------------------------------------------------
def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def _phase_us(fn, iters: int, dev: str) -> float:
    """Mean microseconds of fn() over `iters` runs on this rank, then the max over ranks."""
    for _ in range(2):
        fn()
    _sync(dev)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(dev)
    us = torch.tensor([(time.perf_counter() - t0) / iters * 1e6], dtype=torch.float64, device=dev)
    dist.all_reduce(us, op=dist.ReduceOp.MAX)
    return us.item()


def build_layer(E, H, I, dtype, dev, seed=0):
    """An ExpertParallelMoE with random weights; only this rank's experts are materialized."""
    from llama4_fast.config import Llama4Config
    from llama4_fast.model import MoE
    from llama4_fast.parallel import ExpertParallelMoE

    cfg = Llama4Config(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=1)
    with torch.device("meta"):
        layer = ExpertParallelMoE(MoE(cfg))
    gen = torch.Generator(device=dev).manual_seed(seed + dist.get_rank())
    for module in layer.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            fan_in = p.shape[-1] if name == "weight" else p.shape[-2]
            t = torch.randn(p.shape, generator=gen, device=dev, dtype=dtype).mul_(fan_in ** -0.5)
            setattr(module, name, torch.nn.Parameter(t, requires_grad=False))
    return layer


@torch.no_grad()
def measure(shape, tokens, iters, dev, dtype) -> list[dict]:
    E, H, I = shape
    layer = build_layer(E, H, I, dtype, dev)
    W, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for T in tokens:
        x = torch.randn(T, H, device=dev, dtype=dtype, generator=torch.Generator(device=dev).manual_seed(T + rank))
        weights, ids = layer.route(x)
        plan = layer.plan(ids)
        rows_in, meta, _ = layer.dispatch(x, weights, ids, plan)
        results = layer.run_local_experts(rows_in, meta)
        compute = (_phase_us(lambda: layer.route(x), iters, dev)
                   + _phase_us(lambda: layer.run_local_experts(rows_in, meta), iters, dev)
                   + _phase_us(lambda: layer.shared_expert(x), iters, dev))
        comm = (_phase_us(lambda: layer.plan(ids), iters, dev)
                + _phase_us(lambda: layer.dispatch(x, weights, ids, plan), iters, dev)
                + _phase_us(lambda: layer.combine(results, plan, T), iters, dev))
        total = _phase_us(lambda: layer(x), iters, dev)
        remote = sum(n for r, n in enumerate(plan.send_counts) if r != rank)
        sent = torch.tensor([2 * remote * (H * x.element_size() + 8)], dtype=torch.float64, device=dev)
        dist.all_reduce(sent, op=dist.ReduceOp.MAX)
        rows.append({"world": W, "E": E, "H": H, "I": I, "T_per_rank": T, "compute_us": compute, "comm_us": comm,
                     "layer_us": total, "max_bytes_sent_per_rank": sent.item(),
                     "comm_gbps": sent.item() / comm / 1e3 if comm else None})
    return rows


def child(args):
    """One world size, under torchrun (or alone for W = 1): rank 0 writes rows to --rows-out."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if dev == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=120)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout)
    from llama4_fast import registry

    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    shape = (8, 64, 32) if args.quick else (128, 5120, 8192)
    tokens = args.tokens or ([4, 32] if args.quick else [1, 8, 64, 512, 4096])
    iters = 3 if args.quick else 20
    # CPU: the torch backend (the interpreter would time Python); CUDA: the registry's pick (Triton)
    with registry.use("torch") if dev == "cpu" else _nullcontext():
        rows = measure(shape, tokens, iters, dev, dtype)
    if dist.get_rank() == 0:
        Path(args.rows_out).write_text(json.dumps(rows))
    dist.destroy_process_group()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def world_sizes(quick: bool) -> list[int]:
    if quick or not torch.cuda.is_available():
        return [1, 2] if quick else [1]
    n = torch.cuda.device_count()
    return [w for w in (1, 2, 4, 8, 16) if w <= n]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-sized layer, W = 1 and 2 (gloo)")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per rank")
    parser.add_argument("--volume-only", action="store_true", help="print the Maverick model tables and stop")
    parser.add_argument("--rows-out", help=argparse.SUPPRESS)  # set by the parent for one world size
    args = parser.parse_args(argv)
    if args.rows_out:
        return child(args)
    print_volume_model()
    if args.volume_only:
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for W in world_sizes(args.quick):
            out = Path(tmp) / f"w{W}.json"
            passthrough = ["--rows-out", str(out)] + (["--quick"] if args.quick else []) + \
                (["--tokens", *map(str, args.tokens)] if args.tokens else [])
            if W == 1:
                cmd = [sys.executable, __file__, *passthrough]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(W),
                       __file__, *passthrough]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            subprocess.run(cmd, check=True, env=env, timeout=900)
            rows += json.loads(out.read_text())
    columns = [("world", "W", ""), ("T_per_rank", "T/rank", ""), ("compute_us", "compute us", ".0f"),
               ("comm_us", "comm us", ".0f"), ("layer_us", "layer us (overlap)", ".0f"),
               ("max_bytes_sent_per_rank", "bytes sent/rank", ".0f"), ("comm_gbps", "comm GB/s", ".2f")]
    E, H, I = rows[0]["E"], rows[0]["H"], rows[0]["I"]
    print(f"\nexpert-parallel MoE layer E={E} H={H} I={I} top-1, {gpu_name()} (measured; slowest rank)")
    print(markdown_table(rows, columns))
    path = write_results("scaling", {"shape": {"E": E, "H": H, "I": I, "top_k": 1}, "cases": rows,
                                     "volume_model": {"memory_8": memory_table(8, 131072),
                                                      "memory_16": memory_table(16, 131072),
                                                      "bytes_per_token_layer": volume_table()}})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
