"""Headline benchmark: Llama 4's routed-expert MoE layer (top-1, bf16, H=5120), ours vs baselines.

For Scout (E=16), Maverick (E=128) and their TP8 shards (I=1024), over batch sizes T, side by
side in one run, each starting from the router logits:
  ours        llama4_fast.kernels.route + fused_moe (also replayed from a CUDA graph, T <= 64)
  dense       transformers' Llama4TextExperts: every expert on every token (bmm), scores from
              the same top-k/sigmoid router
  loop        per active expert: index-select its tokens, two matmuls, index_add back
              (llama4_fast's torch reference backend)
  grouped_mm  torch._grouped_mm over expert-sorted tokens (sm90+, where torch has it)
plus the routing overhead alone (route + dispatch metadata) and a row set with the shared
expert (ours + a plain SwiGLU MLP). The roofline counts the bytes of the experts the routing
actually touched (distinct experts x expert size) plus activations in/out, and the FLOPs
2 * T * top_k * H * 3I; floor = max(bytes / copy bandwidth, FLOPs / matmul peak), both
measured at the start of the run. Writes benchmarks/results/moe_dispatch-<gpu>-<time>.json,
a PNG beside it and a markdown table per shape.

transformers' other MoE models (--shapes qwen3-30b-a3b qwen3-235b-a22b mixtral-8x7b gpt-oss-120b
deepseek-v3; top_k > 1, bf16) run their experts module three ways, each starting from the router
logits (softmax over the experts, top-k, renormalized, as Mixtral and Qwen3 route):
  ours        llama4_fast.kernels.route + experts_implementation="llama4_fast"'s forward
              (llama4_fast.experts: the adapter, then fused_moe on the weights in place)
  grouped_mm  transformers' grouped_mm experts forward (its default), torch routing
  batched_mm  transformers' batched_mm experts forward, torch routing
on the same module and weights (nn.Linear-style SwiGLU experts; gpt-oss's own module, with its
biases, interleaved gate/up and clamped gate). Every answer is checked against the module's
eager forward on the same routing; peak memory above the inputs is recorded per method.

    python benchmarks/moe_dispatch.py                      # Llama 4's shapes (~4 min on an H100)
    python benchmarks/moe_dispatch.py --shapes qwen3-30b-a3b mixtral-8x7b --tokens 1 64 4096
    python benchmarks/moe_dispatch.py --shapes maverick-tp8 --tokens 1 8 64
    python benchmarks/moe_dispatch.py --quick              # toy sizes; runs on CPU (interpreter)
    python benchmarks/moe_dispatch.py --weights int4       # ours with INT4 experts (group 128)

--weights fp8|int4 runs ours on quantized experts (per-channel FP8 with per-token activations,
or symmetric INT4 in groups of 128) against the same bf16 baselines; the roofline then counts
the quantized expert bytes (with scales), and ours is checked against the torch reference on
the same quantized weights instead of the bf16 loop.

Answers, on the first input set of each case: ours is checked first against the loop
(llama4_fast's torch backend, itself tested against float64 in tests/): past
common.WRONG_REL_ERR it is recorded as a wrong answer instead of a time, and the script exits 1
once every table and the JSON are out (as when ours raises). Each baseline is checked against
the bf16 loop: one past WRONG_REL_ERR is flagged (`disagrees` column, JSON) and still timed, and
the exit status stays 0 (ours matched the reference, so the baseline is the suspect);
tests/test_benchmarks.py fails on it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (device, disagreement, exit_status, fp8_ceilings, fp8_peak_tflops, markdown_table,  # noqa: E402
                    measure_ceilings, rel_err, rewrite_results, roofline, rotating, time_us, verdict, wrong_answer)

from llama4_fast.backends import torch_ref  # noqa: E402
from llama4_fast.kernels import fused_moe, route  # noqa: E402
from llama4_fast.kernels.moe import launch_config  # noqa: E402
from llama4_fast.kernels.routing import dispatch_metadata  # noqa: E402
from llama4_fast.quant import expert_kernel_args  # noqa: E402
from llama4_fast.quant import quantize_weight  # noqa: E402

SHAPES = {  # name: (E, H, I)
    "scout": (16, 5120, 8192),
    "maverick": (128, 5120, 8192),
    "scout-tp8": (16, 5120, 1024),
    "maverick-tp8": (128, 5120, 1024),
}
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
SHARED_TOKENS = [1, 8, 64, 512, 4096]
QUICK_SHAPES = {"toy": (4, 64, 32)}
QUICK_TOKENS = [1, 8, 33]
# transformers' MoE models: name -> (E, H, I, top_k, experts module), from their public configs:
#   Qwen3-30B-A3B: hidden 2048, moe_intermediate_size 768, 128 experts, 8 per token
#     (huggingface.co/Qwen/Qwen3-30B-A3B model card; gitcode.com/Ascend/MindSpeed-RL
#     configs/model/qwen3_30b_a3b.yaml)
#   Qwen3-235B-A22B: 4096, 1536, 128, 8 (MindSpeed-RL configs/model/qwen3_235b_a22b.yaml)
#   Mixtral-8x7B: 4096, 14336, 8, 2 (huggingface.co/mistralai/Mixtral-8x7B-Instruct-v0.1 config.json)
#   gpt-oss-120b: 2880, 2880, 128, 4 (openai/gpt-oss-120b original/config.json; transformers'
#     GptOss docs: "routes each token to 4 of 128 experts")
#   DeepSeek-V3: 7168, 2048, 256 routed experts, 8 per token (deepseek-ai/DeepSeek-V3
#     inference/configs/config_671B.json; its group-limited sigmoid routing picks other
#     experts, not other work: the routing here is the same softmax top-k for every shape)
# "swiglu": transformers' MixtralExperts, the layout and math of the Qwen3 and DeepSeek experts
# too ([E, 2I, H] / [E, H, I], silu); "gpt_oss": GptOssExperts.
HF_SHAPES = {
    "qwen3-30b-a3b": (128, 2048, 768, 8, "swiglu"),
    "qwen3-235b-a22b": (128, 4096, 1536, 8, "swiglu"),
    "mixtral-8x7b": (8, 4096, 14336, 2, "swiglu"),
    "gpt-oss-120b": (128, 2880, 2880, 4, "gpt_oss"),
    "deepseek-v3": (256, 7168, 2048, 8, "swiglu"),
}
QUICK_HF_SHAPES = {"toy-top2": (4, 64, 32, 2, "swiglu"), "toy-gpt-oss": (8, 64, 32, 4, "gpt_oss")}
QUICK_HF_TOKENS = [1, 33]
HF_BASELINES = ("grouped_mm", "batched_mm")
TOP_K = 1
GRAPH_MAX_T = 64  # decode sizes: also time ours replayed from a CUDA graph
# CUDA-event timing per case (medians): short, so the full run fits its ~4 minute budget; the
# estimate phase of do_bench already runs each case 5 times, with an L2 flush before each call.
WARMUP_MS, REP_MS = 10, 50
BASELINES = ("dense", "loop", "grouped_mm")
OURS = ("ours", "ours_graph", "routing", "ours_shared")  # the names in a row's "errors" that are our kernels
SEED = 0


# ----------------------------------------------------------------------------------------------
# the implementations under comparison; each maps (x [T, H], router logits [T, E]) -> [T, H]
# ----------------------------------------------------------------------------------------------

def torch_router(logits, top_k):
    """Llama 4's router in torch: top-k of the logits, sigmoid of the selected ones in fp32."""
    top, ids = torch.topk(logits, top_k, dim=-1)
    return torch.sigmoid(top.float()), ids


def ours(x, logits, w13, w2, out=None, quant_kwargs=None):
    """quant_kwargs: None (w13, w2 in x's dtype) or fused_moe's quantized-weight arguments."""
    weights, ids = route(logits, TOP_K)
    return fused_moe(x, w13, w2, weights, ids, out=out, **(quant_kwargs or {}))


QUANT_SCHEMES = {"fp8": "fp8", "int4": "int4"}  # --weights -> llama4_fast.quantize scheme
INT4_GROUP, QUICK_INT4_GROUP = 128, 32  # the toy shape's I = 32


def quantized_experts(w13, w2, weights: str, group_size: int = INT4_GROUP):
    """(w13 tensor, w2 tensor, fused_moe keyword arguments, bytes per expert) of the experts
    quantized as --weights says; the format objects are built once, outside the timing."""
    q13 = quantize_weight(w13, QUANT_SCHEMES[weights], group_size)
    q2 = quantize_weight(w2, QUANT_SCHEMES[weights], group_size)
    per_expert = sum(t[0].numel() * t.element_size() for q in (q13, q2) for t in q.tensors())
    return q13, q2, expert_kernel_args(q13, q2), per_expert


def dense(x, logits, w13, w2):
    """transformers' Llama4TextMoe + Llama4TextExperts: scores for all experts (0 where not
    chosen), the input scaled per expert, every expert run on every token with bmm."""
    top, ids = torch.topk(logits, TOP_K, dim=-1)
    scores = torch.full_like(logits, float("-inf")).scatter_(1, ids, top)
    scores = torch.sigmoid(scores.float()).to(x.dtype)  # [T, E]
    routed_in = x.unsqueeze(0) * scores.t().unsqueeze(-1)  # [E, T, H]
    gate, up = torch.bmm(routed_in, w13).chunk(2, dim=-1)
    return torch.bmm(up * F.silu(gate), w2).sum(0)


def loop(x, logits, w13, w2):
    """llama4_fast's torch backend: per active expert, gather its tokens, two matmuls,
    index_add back (a host sync on the per-expert counts)."""
    weights, ids = torch_ref.route(logits, TOP_K)
    return torch_ref.fused_moe(x, w13, w2, weights, ids)


def grouped_mm(x, logits, w13, w2):
    """torch._grouped_mm on a permuted copy of the tokens, sorted by expert (no host sync)."""
    weights, ids = torch_router(logits, TOP_K)
    E, inter = w13.shape[0], w2.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    rows = order // TOP_K
    xs = (x[rows].float() * weights.reshape(-1)[order, None]).to(x.dtype)
    gate_up = torch._grouped_mm(xs, w13, offs=offs)
    y = torch._grouped_mm(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2, offs=offs)
    return torch.zeros_like(x).index_add_(0, rows, y)


def grouped_mm_available(dev: str, dtype) -> str | None:
    """None if torch._grouped_mm can run here, else why not (sm90+ on CUDA; a probe call)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm"
    if dev == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        return "torch._grouped_mm needs sm90+"
    try:
        a = torch.randn(32, 64, device=dev, dtype=dtype)
        b = torch.randn(2, 64, 32, device=dev, dtype=dtype)
        torch._grouped_mm(a, b, offs=torch.tensor([16, 32], device=dev, dtype=torch.int32))
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        return f"torch._grouped_mm failed: {type(e).__name__}: {e}"
    return None


def shared_mlp(x, wg_u, wd):
    """A plain SwiGLU MLP (the shared expert): wg_u [H, 2I] (gate then up), wd [I, H]."""
    gate, up = (x @ wg_u).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ wd


# -- transformers' MoE models: (module, x [T, H], router logits [T, E], top_k) -> [T, H] --------

def hf_experts_module(kind: str, E: int, H: int, I: int, top_k: int, dtype, dev):
    """transformers' experts module of `kind` with random weights (0.02 scale, biases 0.1) in
    dtype on dev, frozen; built on the meta device first, so no float32 copy is ever made."""
    import transformers

    with torch.device("meta"):
        if kind == "gpt_oss":
            from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
            config = transformers.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                               num_experts_per_tok=top_k)
            module = GptOssExperts(config)
        else:
            from transformers.models.mixtral.modeling_mixtral import MixtralExperts
            config = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                                num_experts_per_tok=top_k)
            module = MixtralExperts(config)
    gen = torch.Generator(device=dev).manual_seed(SEED)
    for name, p in list(module.named_parameters()):
        w = torch.randn(p.shape, device=dev, dtype=dtype, generator=gen).mul_(0.1 if name.endswith("bias") else 0.02)
        setattr(module, name, torch.nn.Parameter(w, requires_grad=False))
    return module


def hf_router(logits, top_k):
    """Mixtral's / Qwen3's router in torch: softmax over the experts in fp32, top-k, renormalized."""
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(logits.dtype), ids


def hf_ours(module, x, logits, top_k):
    from llama4_fast.experts import experts_forward

    weights, ids = route(logits, top_k, "softmax", renormalize=True)
    return experts_forward(module, x, ids, weights)


def hf_baseline(name: str):
    """transformers' `name` experts forward behind the torch router."""
    from transformers.integrations import moe as hf_moe

    forward = {"grouped_mm": hf_moe.grouped_mm_experts_forward, "batched_mm": hf_moe.batched_mm_experts_forward}[name]

    def run(module, x, logits, top_k):
        weights, ids = hf_router(logits, top_k)
        return forward(module, x, ids, weights)
    return run


def hf_eager(module, x, ids, weights):
    """The experts module's own (eager) forward, which `@use_experts_implementation` wraps."""
    return type(module).forward.__wrapped__(module, x, ids, weights)


def hf_available() -> str | None:
    try:
        from transformers.integrations import moe as hf_moe
    except ImportError as e:
        return f"transformers is not installed ({e})"
    if not hasattr(hf_moe, "ExpertsInterface"):
        return "this transformers has no ExpertsInterface (transformers >= 5 needed)"
    return None


# ----------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------

def _estimates_ms(name, T, E, H, I, touched, elem, ceilings):
    """Rough time of a baseline, to skip the hopeless ones: dense runs every expert on every
    token (E times the useful FLOPs, all weights, [E, T, *] temporaries); loop pays per
    active expert a few launches on top of the useful work."""
    bw, peak = ceilings["hbm_tbps"] * 1e12, ceilings["matmul_tflops"] * 1e12
    useful = 2 * T * TOP_K * H * 3 * I
    if name == "dense":  # temporaries written and read back
        return max(E * useful / peak, (E * 3 * H * I * elem + 2 * _dense_temp_bytes(T, E, H, I, elem)) / bw) * 1e3
    if name == "loop":
        return (useful / peak + touched * 3 * H * I * elem / bw) * 1e3 + touched * 0.05
    return 0.0


def _dense_temp_bytes(T, E, H, I, elem):
    """The dense baseline's [E, T, *] temporaries: scaled input, gate_up, SwiGLU, output."""
    return E * T * (2 * H + 3 * I) * elem


def input_sets(T, E, H, I, top_k, expert_bytes, dtype, dev):
    """The (x [T, H], router logits [T, E]) sets a case rotates through, enough of them that
    their experts (expert_bytes each, the experts a set's routing touches) overflow L2; with
    the experts touched per set (mean), the bytes a call must move and its useful FLOPs."""
    elem = dtype.itemsize
    gen = torch.Generator(device=dev).manual_seed(SEED + T)

    def make_set():
        return (torch.randn(T, H, device=dev, dtype=dtype, generator=gen),
                torch.randn(T, E, device=dev, dtype=dtype, generator=gen))

    expected_touched = E * (1 - (1 - 1 / E) ** (T * top_k))
    nxt = rotating(make_set, int(expected_touched * expert_bytes + 2 * T * H * elem))
    first = nxt()
    sets = [first]
    while (s := nxt()) is not first:
        sets.append(s)
    touched = sum(torch.topk(lg, top_k, dim=-1).indices.unique().numel() for _, lg in sets) / len(sets)
    bytes_moved = touched * expert_bytes + T * (2 * H + E) * elem
    return sets, touched, bytes_moved, 2 * T * top_k * H * 3 * I


def bench_case(T, E, H, I, w13, w2, dtype, dev, ceilings, args, gmm_reason, quant=None):
    """Time every implementation at one batch size; returns one result row. quant: None, or
    quantized_experts(...) for ours (the baselines keep the bf16 w13, w2)."""
    elem = dtype.itemsize
    ours_w13, ours_w2, ours_kw = (w13, w2, None) if quant is None else (quant[0].tensors()[0], quant[1].tensors()[0],
                                                                          quant[2])
    expert_bytes = 3 * H * I * elem if quant is None else quant[3]
    sets, touched, bytes_moved, flops = input_sets(T, E, H, I, TOP_K, expert_bytes, dtype, dev)
    row = {"T": T, "experts_touched": touched, "bytes": bytes_moved, "flops": flops, "errors": {}, "disagrees": {}}
    # The baselines read the bf16 experts: their floor is the bf16 one, whatever ours reads.
    base_bytes = touched * 3 * H * I * elem + T * (2 * H + E) * elem
    if quant is not None:
        row["baseline_bytes"] = base_bytes
    # FP8 experts multiply in FP8 (activations quantized per token): ours' compute floor is the
    # measured FP8 peak where there is one.
    ours_ceilings = fp8_ceilings(ceilings) if args.weights == "fp8" else ceilings

    def failed(name, e):  # one failing implementation must not stop the run
        row["errors"][name] = f"{type(e).__name__}: {e}"
        print(f"    {name} failed at T={T}: {row['errors'][name]}", flush=True)
        if args.verbose:
            traceback.print_exc()

    def timed(name, fn):
        try:
            cyc = itertools.cycle(sets)
            t = time_us(lambda: fn(*next(cyc)), warmup_ms=WARMUP_MS, rep_ms=REP_MS)
            row[f"{name}_us"] = t
            return t
        except Exception as e:  # noqa: BLE001
            failed(name, e)
            return None

    # A number for a wrong answer is worthless: ours is checked against the loop baseline
    # (quantized: the torch reference on the same quantized experts) before it is timed.
    t_ours = None
    x0, lg0 = sets[0]
    base_ref = loop(x0, lg0, w13, w2)  # the baselines' reference: they read the bf16 experts
    ref = base_ref if quant is None else loop(x0, lg0, quant[0], quant[1])
    try:
        got = ours(x0, lg0, ours_w13, ours_w2, quant_kwargs=ours_kw)
    except Exception as e:  # noqa: BLE001
        failed("ours", e)
    else:
        row["rel_err_vs_loop"] = rel_err(got, ref)
        wrong = wrong_answer(row["rel_err_vs_loop"])
        if wrong:
            row["errors"]["ours"] = wrong
        else:
            t_ours = timed("ours", lambda x, lg: ours(x, lg, ours_w13, ours_w2, quant_kwargs=ours_kw))
    if t_ours is not None:
        row.update({f"ours_{k}": v for k, v in roofline(t_ours, bytes_moved, flops, ours_ceilings).items()})
    row["roofline_us"] = roofline(1.0, bytes_moved, flops, ours_ceilings)["roofline_us"]  # time-independent

    # Routing overhead alone: what fused_moe adds before its GEMMs.
    cfg = launch_config(sets[0][0], ours_w13, ours_w2, TOP_K)

    def routing_only(x, lg):
        _, ids = route(lg, TOP_K)
        if not cfg.direct(T * TOP_K):
            dispatch_metadata(ids, E, cfg.block_m)

    timed("routing", routing_only)
    row["block_m"], row["direct"] = cfg.block_m, cfg.direct(T * TOP_K)
    row["split_k"] = [cfg.gate_up.split_k, cfg.down.split_k]

    if dev == "cuda" and T <= GRAPH_MAX_T and t_ours is not None:
        try:
            graphs = []
            for x, lg in sets:
                out = torch.empty_like(x)
                ours(x, lg, ours_w13, ours_w2, out, ours_kw)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    ours(x, lg, ours_w13, ours_w2, out, ours_kw)
                graphs.append(g)
            replays = itertools.cycle(graphs)
            t = timed("ours_graph", lambda *_: next(replays).replay())
            if t is not None:
                row["ours_graph_pct_roofline"] = roofline(t, bytes_moved, flops, ours_ceilings)["pct_roofline"]
            del graphs, replays
        except Exception as e:  # noqa: BLE001
            row["errors"]["ours_graph"] = f"{type(e).__name__}: {e}"
            print(f"    ours_graph failed at T={T}: {row['errors']['ours_graph']}", flush=True)

    impls = {"dense": dense, "loop": loop, "grouped_mm": grouped_mm}
    for name in BASELINES:
        if name == "grouped_mm" and gmm_reason:
            row["errors"][name] = gmm_reason
            continue
        est = _estimates_ms(name, T, E, H, I, touched, elem, ceilings)
        if est > args.max_baseline_ms:
            row["errors"][name] = f"skipped: estimated {est:.0f} ms > --max-baseline-ms"
            continue
        free = torch.cuda.mem_get_info()[0] if dev == "cuda" else float("inf")
        if name == "dense" and _dense_temp_bytes(T, E, H, I, elem) > 0.8 * free:
            row["errors"][name] = "skipped: [E, T, *] temporaries do not fit in free memory"
            continue
        try:
            row[f"{name}_rel_err"] = rel_err(impls[name](x0, lg0, w13, w2), base_ref)
        except Exception as e:  # noqa: BLE001
            failed(name, e)
            continue
        if flag := disagreement(row[f"{name}_rel_err"], "the loop"):
            row["disagrees"][name] = flag
        t = timed(name, lambda x, lg, f=impls[name]: f(x, lg, w13, w2))
        if t is not None:
            row[f"{name}_pct_roofline"] = roofline(t, base_bytes, flops, ceilings)["pct_roofline"]
            if t_ours is not None:
                row[f"speedup_vs_{name}"] = t / t_ours
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_shared(T, E, H, I, w13, w2, dtype, dev, ceilings, quant=None):
    """ours + the shared expert (a plain SwiGLU MLP of the same intermediate size, bf16)."""
    elem = dtype.itemsize
    if quant is not None:
        w13, w2 = quant[0].tensors()[0], quant[1].tensors()[0]
    expert_bytes = 3 * H * I * elem if quant is None else quant[3]
    kw = None if quant is None else quant[2]
    gen = torch.Generator(device=dev).manual_seed(SEED + 7 * T)
    wg_u = torch.randn(H, 2 * I, device=dev, dtype=dtype, generator=gen).mul_(0.02)
    wd = torch.randn(I, H, device=dev, dtype=dtype, generator=gen).mul_(0.02)
    x = torch.randn(T, H, device=dev, dtype=dtype, generator=gen)
    logits = torch.randn(T, E, device=dev, dtype=dtype, generator=gen)
    touched = torch.topk(logits, TOP_K, dim=-1).indices.unique().numel()
    bytes_moved = touched * expert_bytes + 3 * H * I * elem + T * (2 * H + E) * elem
    flops = 2 * T * (TOP_K + 1) * H * 3 * I
    row = {"T": T, "experts_touched": touched, "bytes": bytes_moved, "flops": flops, "errors": {}}
    try:
        row["shared_only_us"] = time_us(lambda: shared_mlp(x, wg_u, wd), warmup_ms=WARMUP_MS, rep_ms=REP_MS)
        t = time_us(lambda: shared_mlp(x, wg_u, wd) + ours(x, logits, w13, w2, quant_kwargs=kw), warmup_ms=WARMUP_MS,
                    rep_ms=REP_MS)
        row["ours_shared_us"] = t
        row.update({f"ours_shared_{k}": v for k, v in roofline(t, bytes_moved, flops, ceilings).items()})
    except Exception as e:  # noqa: BLE001
        row["errors"]["ours_shared"] = f"{type(e).__name__}: {e}"
        print(f"    ours+shared failed at T={T}: {row['errors']['ours_shared']}", flush=True)
    return row


def _peak_mb(fn, dev) -> float | None:
    """Memory one call of fn allocates above what was allocated before it (CUDA), in MB."""
    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@torch.no_grad()
def bench_hf_case(T, E, H, I, top_k, module, dtype, dev, ceilings, args):
    """One batch size of a transformers MoE shape: ours and transformers' experts forwards,
    each from the router logits; returns one result row."""
    from llama4_fast.experts import experts_forward

    elem = dtype.itemsize
    expert_bytes = sum(p[0].numel() for p in module.parameters()) * elem
    sets, touched, bytes_moved, flops = input_sets(T, E, H, I, top_k, expert_bytes, dtype, dev)
    row = {"T": T, "experts_touched": touched, "bytes": bytes_moved, "flops": flops, "errors": {}, "disagrees": {},
           "roofline_us": roofline(1.0, bytes_moved, flops, ceilings)["roofline_us"]}
    impls = {"ours": hf_ours, **{name: hf_baseline(name) for name in HF_BASELINES}}

    # Answers on the first set, all on the torch router's choice (ours routes with its own kernel,
    # which ties may break differently), against the module's eager forward.
    x0, lg0 = sets[0]
    weights0, ids0 = hf_router(lg0, top_k)
    ref = hf_eager(module, x0, ids0, weights0)
    answers = {"ours": lambda: experts_forward(module, x0, ids0, weights0)}
    answers.update({name: lambda f=impls[name]: f(module, x0, lg0, top_k) for name in HF_BASELINES})
    t_ours = None
    for name in impls:
        try:
            err = rel_err(answers[name](), ref)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the run
            row["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"    {name} failed at T={T}: {row['errors'][name]}", flush=True)
            continue
        row[f"{name}_rel_err"] = err
        if name == "ours" and (wrong := wrong_answer(err)):
            row["errors"]["ours"] = wrong
            continue
        if name != "ours" and (flag := disagreement(err, "the eager experts")):
            row["disagrees"][name] = flag
        fn = impls[name]
        cyc = itertools.cycle(sets)
        try:
            t = time_us(lambda: fn(module, *next(cyc), top_k), warmup_ms=WARMUP_MS, rep_ms=REP_MS)
            row[f"{name}_peak_mb"] = _peak_mb(lambda: fn(module, x0, lg0, top_k), dev)
        except Exception as e:  # noqa: BLE001
            row["errors"][name] = f"{type(e).__name__}: {e}"
            continue
        row[f"{name}_us"] = t
        if name == "ours":
            t_ours = t
            row.update({f"ours_{k}": v for k, v in roofline(t, bytes_moved, flops, ceilings).items()})
        else:
            row[f"{name}_pct_roofline"] = roofline(t, bytes_moved, flops, ceilings)["pct_roofline"]
            if t_ours is not None:
                row[f"speedup_vs_{name}"] = t / t_ours
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

COLUMNS = [
    ("T", "T", ""), ("experts_touched", "experts", ".1f"), ("block_m", "BM", ""),
    ("roofline_us", "floor us", ".1f"), ("ours_us", "ours us", ".1f"), ("ours_graph_us", "graph us", ".1f"),
    ("ours_tbps", "TB/s", ".2f"), ("ours_tflops", "TFLOP/s", ".1f"), ("ours_pct_roofline", "% roof", ".1f"),
    ("ours_graph_pct_roofline", "graph % roof", ".1f"),
    ("routing_us", "routing us", ".1f"), ("rel_err_vs_loop", "err vs loop", ".1e"), ("dense_us", "dense us", ".1f"),
    ("loop_us", "loop us", ".1f"), ("grouped_mm_us", "grouped_mm us", ".1f"), ("speedup_vs_dense", "x dense", ".2f"),
    ("speedup_vs_loop", "x loop", ".2f"), ("speedup_vs_grouped_mm", "x grouped_mm", ".2f"),
    ("disagrees", "disagrees", ""),
]
HF_COLUMNS = [
    ("T", "T", ""), ("experts_touched", "experts", ".1f"), ("roofline_us", "floor us", ".1f"),
    ("ours_us", "ours us", ".1f"), ("ours_tbps", "TB/s", ".2f"), ("ours_pct_roofline", "% roof", ".1f"),
    ("ours_rel_err", "err vs eager", ".1e"), ("grouped_mm_us", "grouped_mm us", ".1f"),
    ("batched_mm_us", "batched_mm us", ".1f"), ("speedup_vs_grouped_mm", "x grouped_mm", ".2f"),
    ("speedup_vs_batched_mm", "x batched_mm", ".2f"), ("ours_peak_mb", "ours MB", ".1f"),
    ("grouped_mm_peak_mb", "grouped_mm MB", ".1f"), ("disagrees", "disagrees", ""),
]
SHARED_COLUMNS = [
    ("T", "T", ""), ("experts_touched", "experts", ""), ("shared_only_us", "shared MLP us", ".1f"),
    ("ours_shared_us", "ours+shared us", ".1f"), ("ours_shared_roofline_us", "floor us", ".1f"),
    ("ours_shared_tbps", "TB/s", ".2f"), ("ours_shared_tflops", "TFLOP/s", ".1f"),
    ("ours_shared_pct_roofline", "% roof", ".1f"),
]


def plot(results: dict, path: Path) -> None:
    """% of roofline and speed-up vs T, one row of panels per shape."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    shapes = [s for s in results["shapes"] if s["rows"]]
    if not shapes:
        return
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 3.4 * len(shapes)), squeeze=False)
    for (ax_pct, ax_x), shape in zip(axes, shapes):
        rows = shape["rows"]
        for color, name in enumerate(("ours", "ours_graph") + BASELINES + ("batched_mm",)):  # a color per method
            key = f"{name}_pct_roofline"
            pts = [(r["T"], r[key]) for r in rows if key in r]
            if pts:
                ax_pct.plot(*zip(*pts), "-o" if name.startswith("ours") else "--", color=f"C{color}", label=name)
            key = f"speedup_vs_{name}"
            pts = [(r["T"], r[key]) for r in rows if key in r]
            if pts:
                ax_x.plot(*zip(*pts), "-o", color=f"C{color}", label=f"vs {name}")
        ax_pct.set(xscale="log", ylabel="% of roofline", title=f"{shape['name']}: % of roofline")
        ax_x.set(xscale="log", yscale="log", ylabel="speed-up of ours", title=f"{shape['name']}: speed-up")
        ax_x.axhline(1.0, color="gray", lw=0.8)
        for ax in (ax_pct, ax_x):
            ax.set_xlabel("tokens T")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def run_verdict(results: dict) -> dict:
    """common.verdict of the run: an entry of ours failed, or a baseline disagrees."""
    ours, baselines = [], []
    for shape in results["shapes"]:
        for row in shape["rows"] + shape["shared_rows"]:
            case = f"{shape['name']} T={row['T']}"
            ours += [(f"{case} {name}", e) for name, e in row["errors"].items() if name in OURS]
            baselines += [(f"{case} {name}", flag) for name, flag in row.get("disagrees", {}).items()]
    return verdict(ours, baselines)


def main(argv=None):
    """Returns the exit status (common.exit_status): 1 when ours failed or gave a wrong answer."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (CPU-runnable through the Triton interpreter)")
    p.add_argument("--shapes", nargs="+", help="shapes to run: " + ", ".join([*SHAPES, *HF_SHAPES]),
                   choices=[*SHAPES, *QUICK_SHAPES, *HF_SHAPES, *QUICK_HF_SHAPES])
    p.add_argument("--tokens", nargs="+", type=int, help="batch sizes T")
    p.add_argument("--max-baseline-ms", type=float, default=100.0,
                   help="skip a baseline case whose estimated time exceeds this (printed as '-')")
    p.add_argument("--no-shared", action="store_true", help="skip the with-shared-expert row set")
    p.add_argument("--weights", choices=("bf16", "fp8", "int4"), default="bf16",
                   help="expert weights of ours (the baselines stay bf16)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing cases")
    args = p.parse_args(argv)

    dev = device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16  # the interpreter has no bf16 dot
    shape_table = {**SHAPES, **QUICK_SHAPES}
    quick_names = list(QUICK_SHAPES) + (list(QUICK_HF_SHAPES) if args.weights == "bf16" else [])
    names = args.shapes or (quick_names if args.quick else list(SHAPES))
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    ceilings = measure_ceilings(quick=args.quick)
    if args.weights == "fp8":
        ceilings["fp8_matmul_tflops"] = fp8_peak_tflops(dev, args.quick)
    print(f"device {dev}, {dtype}; ceilings: copy {ceilings['hbm_tbps']:.2f} TB/s, "
          f"matmul {ceilings['matmul_tflops']:.1f} TFLOP/s ({ceilings['matmul_dtype']})", flush=True)
    gmm_reason = grouped_mm_available(dev, dtype)
    if gmm_reason:
        print(f"grouped_mm baseline off: {gmm_reason}")

    results = {"ceilings": ceilings, "top_k": TOP_K, "dtype": str(dtype), "weights": args.weights, "quick": args.quick,
               "max_baseline_ms": args.max_baseline_ms, "shapes": []}
    path = None
    for name in names:
        if name not in shape_table:  # a transformers MoE shape
            path = run_hf_shape(name, results, path, dev, dtype, ceilings, args)
            continue
        E, H, I = shape_table[name]
        print(f"\n## {name}: E={E}, H={H}, I={I}, top-{TOP_K}, {str(dtype).replace('torch.', '')}, "
              f"ours with {args.weights} experts", flush=True)
        gen = torch.Generator(device=dev).manual_seed(SEED)
        w13 = torch.randn(E, H, 2 * I, device=dev, dtype=dtype, generator=gen).mul_(0.02)
        w2 = torch.randn(E, I, H, device=dev, dtype=dtype, generator=gen).mul_(0.02)
        quant = None if args.weights == "bf16" else \
            quantized_experts(w13, w2, args.weights, QUICK_INT4_GROUP if args.quick else INT4_GROUP)
        shape = {"name": name, "E": E, "H": H, "I": I, "rows": [], "shared_rows": []}
        results["shapes"].append(shape)
        for T in tokens:
            row = bench_case(T, E, H, I, w13, w2, dtype, dev, ceilings, args, gmm_reason, quant)
            shape["rows"].append(row)
            print(f"  T={T}: ours {row.get('ours_us', float('nan')):.1f} us "
                  f"({row.get('ours_pct_roofline', float('nan')):.0f}% of roofline)", flush=True)
        if not args.no_shared:
            for T in [t for t in tokens if t in SHARED_TOKENS] or tokens[:1]:
                shape["shared_rows"].append(bench_shared(T, E, H, I, w13, w2, dtype, dev, ceilings, quant))
        print()
        print(markdown_table(shape["rows"], COLUMNS))
        if shape["shared_rows"]:
            print(f"\nwith the shared expert ({name}):\n")
            print(markdown_table(shape["shared_rows"], SHARED_COLUMNS))
        del w13, w2, quant
        if dev == "cuda":
            torch.cuda.empty_cache()
        # Written after every shape (replacing the previous file), so a run cut short by a
        # time limit still leaves its finished shapes.
        results["verdict"] = run_verdict(results)
        path = rewrite_results("moe_dispatch" if args.weights == "bf16" else f"moe_dispatch_{args.weights}", results,
                               path)
        plot(results, path.with_suffix(".png"))
    print(f"\nresults: {path}")
    return exit_status(run_verdict(results))


def run_hf_shape(name, results, path, dev, dtype, ceilings, args):
    """Every batch size of one transformers MoE shape (ours on bf16 experts only); returns the
    results file, rewritten with this shape."""
    E, H, I, top_k, kind = {**HF_SHAPES, **QUICK_HF_SHAPES}[name]
    shape = {"name": name, "E": E, "H": H, "I": I, "top_k": top_k, "experts": kind, "rows": [], "shared_rows": []}
    print(f"\n## {name}: E={E}, H={H}, I={I}, top-{top_k}, {kind} experts, {str(dtype).replace('torch.', '')}",
          flush=True)
    reason = hf_available() or (f"--weights {args.weights}: transformers' shapes run bf16 experts only"
                                if args.weights != "bf16" else None)
    if reason:
        print(f"  skipped: {reason}")
        return path
    import llama4_fast

    llama4_fast.register_experts()
    results["shapes"].append(shape)
    module = hf_experts_module(kind, E, H, I, top_k, dtype, dev)
    tokens = args.tokens or (QUICK_HF_TOKENS if args.quick else TOKENS)
    for T in tokens:
        row = bench_hf_case(T, E, H, I, top_k, module, dtype, dev, ceilings, args)
        shape["rows"].append(row)
        print(f"  T={T}: ours {row.get('ours_us', float('nan')):.1f} us, grouped_mm "
              f"{row.get('grouped_mm_us', float('nan')):.1f} us", flush=True)
    print()
    print(markdown_table(shape["rows"], HF_COLUMNS))
    del module
    if dev == "cuda":
        torch.cuda.empty_cache()
    results["verdict"] = run_verdict(results)
    path = rewrite_results("moe_dispatch" if args.weights == "bf16" else f"moe_dispatch_{args.weights}", results, path)
    plot(results, path.with_suffix(".png"))
    return path


if __name__ == "__main__":
    sys.exit(main())
