"""Training step of one MoE layer and one chunked attention layer: forward + backward, ours
against the torch implementations a transformers user trains with, at Llama 4 sizes (bf16).

    python benchmarks/train_step.py               # GPU: Scout and Maverick MoE, T 2k..16k; attention S 8k..32k
    python benchmarks/train_step.py --quick       # toy sizes (fp32 on CPU: the ops' torch backend)
    python benchmarks/train_step.py --layers moe --shapes scout --tokens 4096

MoE layer (top-1; the router logits are a leaf, so the step also gives their gradient), each
implementation on the same x, logits, gate_up_proj [E, H, 2I] and down_proj [E, I, H], with
gradients to all four:
  ours          llama4_fast.ops.route + ops.fused_moe (the registry picks the backend)
  transformers  Llama4TextMoe unpatched: the router's top-k/sigmoid scores for all E experts (0
                where not chosen), the input scaled per expert, and transformers' own
                Llama4TextExperts module (bmm over every expert) on our tensors
  grouped_mm    the grouped_mm experts algorithm of transformers' integrations/moe.py: pairs
                sorted by expert, torch._grouped_mm with offsets for gate_up, SwiGLU,
                torch._grouped_mm for down, un-sorted; the router weight scales the input, as
                Llama 4 does (the generic version scales the output). Skipped, with the
                reason, where torch._grouped_mm is missing or fails a forward + backward probe.
Attention layer (Hq=40, Hkv=8, D=128, chunk C=8192, causal, batch 1), gradients to q, k, v:
  ours   llama4_fast.ops.attention(chunk_size=C)
  sdpa   scaled_dot_product_attention on the chunks as independent causal sequences ([B, H, S, D]
         reshaped to [B*S/C, H, C, D], the copies timed), grouped KV through enable_gqa (K/V
         repeated where no fused SDPA kernel takes it); only when C divides S
  flex   flex_attention (compiled on a GPU) with a chunked-causal block mask; skipped where it
         cannot run backward (CPU) or past the budget its compile needs

Per row: time of forward + backward (median, CUDA events through common.time_us), TFLOP/s on 3x
the forward FLOPs (MoE: 2 * T * top_k * 3 * H * I, the routed tokens only; attention: 4 * D per
visible (query, key) pair and query head), % of the bf16 matmul peak measured in the same run,
the peak memory of one step above what was allocated before it (inputs, weights), gradients
included ("n/a" on CPU), and the time relative to ours. Baselines that would take longer than
--max-baseline-ms (transformers' dense experts at large E * T) or whose temporaries do not fit
in free memory are skipped and say so.

Answers, on the step's output and every gradient (common.rel_err per tensor, the worst one
against common.WRONG_REL_ERR): ours first, against a reference that shares none of its kernels
(MoE: llama4_fast's torch backend, route and fused_moe, through autograd in the same dtype, its
weight gradients on up to 16 experts spread over E plus the norm of every expert's gradient;
attention: the fp32 definition through autograd on the first and last chunk, which see no other
chunk). A wrong answer or an exception of ours (or of its reference: ours is then not run) is
recorded instead of a time, and the script exits 1 once the tables and the JSON are out. Each
baseline is checked against ours (against the reference when ours has no answer): past the
tolerance it is flagged (`disagrees`) and still timed, exit status 0.

Writes benchmarks/results/train_step-<gpu>-<time>.json (after each MoE shape and after the
attention cases, so a run cut short keeps what finished) and prints a markdown table per layer.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from llama4_fast import ops, registry  # noqa: E402
from llama4_fast.backends import sdpa as sdpa_backend  # noqa: E402

MOE_SHAPES = {"scout": (16, 5120, 8192), "maverick": (128, 5120, 8192)}  # name: (E, H, I)
QUICK_MOE_SHAPES = {"toy": (4, 64, 32)}
TOKENS, QUICK_TOKENS = [2048, 4096, 8192, 16384], [8, 33]
ATTENTION = dict(heads=(40, 8), head_dim=128, chunk=8192, seqs=[8192, 16384, 32768])
QUICK_ATTENTION = dict(heads=(4, 2), head_dim=16, chunk=32, seqs=[64])
TOP_K = 1
CHECK_EXPERTS = 16  # weight gradients compared on this many experts, spread over E
WARMUP_MS, REP_MS = 25, 100
FLEX_FIRST_S, FLEX_NEXT_S = 60.0, 10.0  # budget a flex case needs before it starts (the first compiles)
SEED = 0


@dataclass
class Run:
    """What every case needs to know about the run."""
    dev: str
    dtype: torch.dtype
    ceilings: dict
    budget: common.Budget
    max_baseline_ms: float
    verbose: bool


# ----------------------------------------------------------------------------------------------
# MoE implementations: (x [T, H], logits [T, E], w13 [E, H, 2I], w2 [E, I, H]) -> [T, H]
# ----------------------------------------------------------------------------------------------

def ours_moe(x, logits, w13, w2):
    weights, ids = ops.route(logits, TOP_K)
    return ops.fused_moe(x, w13, w2, weights, ids)


def reference_moe(x, logits, w13, w2):
    """ours' reference: the same ops on llama4_fast's torch backend (per-expert loop)."""
    with registry.use(route="torch", fused_moe="torch"):
        weights, ids = ops.route(logits, TOP_K)
        return ops.fused_moe(x, w13, w2, weights, ids)


def transformers_experts(E, H, I):
    """(transformers' Llama4TextExperts for these sizes with meta parameters, None), or (None, why
    not). transformers_moe swaps the benchmark's tensors in per call."""
    try:
        from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
        from transformers.models.llama4.modeling_llama4 import Llama4TextExperts
    except ImportError as e:
        return None, f"unavailable: transformers' Llama 4 does not import ({e})"
    config = Llama4TextConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, hidden_act="silu")
    with torch.device("meta"):
        return Llama4TextExperts(config), None


def transformers_moe(experts):
    """Llama4TextMoe's routed path after the router's linear layer, unpatched: scores for all
    experts (sigmoid of the top-k logits, 0 elsewhere), the input repeated per expert and
    scaled by its score, then the experts module on every (expert, token) row."""
    def run(x, logits, w13, w2):
        E, T = logits.shape[1], x.shape[0]
        top, ids = torch.topk(logits, TOP_K, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter(1, ids, top)
        scores = torch.sigmoid(scores.float()).to(x.dtype)  # [T, E]
        routed_in = x.repeat(E, 1) * scores.t().reshape(-1, 1)  # [E * T, H], expert-major
        out = torch.func.functional_call(experts, {"gate_up_proj": w13, "down_proj": w2}, (routed_in,))
        return out.view(E, T, -1).sum(0)

    return run


def grouped_mm_moe(x, logits, w13, w2):
    """Expert-sorted (token, choice) pairs through torch._grouped_mm (offsets = running ends of
    the per-expert counts, built on the device), the router weight on the input."""
    T, H = x.shape
    E, inter = w13.shape[0], w2.shape[1]
    top, ids = torch.topk(logits, TOP_K, dim=-1)
    weights = torch.sigmoid(top.float()).reshape(-1)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = (x[order // TOP_K].float() * weights[order, None]).to(x.dtype)
    gate_up = torch._grouped_mm(xs, w13, offs=ends)
    y = torch._grouped_mm(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2, offs=ends)
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(order.numel(), device=x.device)
    return y[unsort].view(T, TOP_K, H).sum(1)


def grouped_mm_unavailable(dev: str, dtype) -> str | None:
    """None where torch._grouped_mm runs forward and backward on this device and dtype, else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"unavailable: torch {torch.__version__} has no _grouped_mm"
    try:
        a = torch.randn(32, 64, device=dev, dtype=dtype, requires_grad=True)
        b = torch.randn(2, 64, 32, device=dev, dtype=dtype, requires_grad=True)
        y = torch._grouped_mm(a, b, offs=torch.tensor([16, 32], device=dev, dtype=torch.int32))
        torch.autograd.grad(y, (a, b), torch.randn_like(y))
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        return f"unavailable: torch._grouped_mm forward + backward failed ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------------------------
# attention implementations: (q [B, Hq, S, D], k, v [B, Hkv, S, D]) -> [B, Hq, S, D]
# ----------------------------------------------------------------------------------------------

def visible_pairs(S: int, chunk: int) -> int:
    """(query, key) pairs one head of a chunked causal layer computes over S positions."""
    full, rest = divmod(S, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


def to_chunks(t, chunk):
    """[B, H, S, D] -> [B * S/C, H, C, D] (a copy): each chunk an independent sequence."""
    B, H, S, D = t.shape
    return t.view(B, H, S // chunk, chunk, D).transpose(1, 2).reshape(B * S // chunk, H, chunk, D)


FUSED_SDPA = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")


def _fused_sdpa_only(dev: str):
    """On a GPU, SDPA restricted to its fused kernels (no math fallback); nothing on CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend[name] for name in FUSED_SDPA]) if dev == "cuda" else contextlib.nullcontext()


def sdpa_chunked(q, k, v, chunk: int, dev: str):
    """(SDPA over the chunks as independent causal sequences, which kernel torch picks for them).
    Grouped KV goes in through enable_gqa; where no fused kernel takes it (GPU), K/V are
    repeated to the query heads inside the step."""
    group = q.shape[1] // k.shape[1]
    with _fused_sdpa_only(dev):
        choice = sdpa_backend.torch_choice(to_chunks(q, chunk), to_chunks(k, chunk), to_chunks(v, chunk))
        repeat = dev == "cuda" and choice not in FUSED_SDPA
        if repeat:
            kr = to_chunks(k.repeat_interleave(group, dim=1), chunk)
            choice = sdpa_backend.torch_choice(to_chunks(q, chunk), kr, kr) + ", K/V repeated"

    def run(q, k, v):
        B, hq, S, D = q.shape
        if repeat:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        with _fused_sdpa_only(dev):
            o = F.scaled_dot_product_attention(to_chunks(q, chunk), to_chunks(k, chunk), to_chunks(v, chunk),
                                               is_causal=True, enable_gqa=not repeat)
        return o.view(B, S // chunk, hq, chunk, D).transpose(1, 2).reshape(B, hq, S, D)

    return run, choice


class Flex(common.Flex):
    """common.Flex as the layer this script times (its chunked-causal mask built outside the
    timing). `off` turns it off with that reason; `ran` says whether a case has run (compiled)."""

    def __init__(self, dev: str, off: str | None = None):
        self.dev, self.ran = dev, False
        if off:
            self.why, self.compiled = off, dev == "cuda"
            return
        super().__init__(dev)

    def chunked(self, S: int, chunk: int):
        mask = self.block_mask(S, chunk, self.dev)
        return lambda q, k, v: self.attn(q, k, v, block_mask=mask, enable_gqa=True)


def ours_attention(chunk: int):
    return lambda q, k, v: ops.attention(q, k, v, chunk_size=chunk)


def chunk_reference(q, k, v, dout, lo: int, hi: int) -> dict:
    """out, dq, dk, dv at positions [lo, hi), one whole chunk (it sees no other chunk), from the
    definition in fp32 through autograd, one KV head and its query heads at a time."""
    group, D = q.shape[1] // k.shape[1], q.shape[-1]
    n = hi - lo
    hidden = ~torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    parts = {"out": [], "dq": [], "dk": [], "dv": []}
    for h in range(k.shape[1]):
        heads = slice(h * group, (h + 1) * group)
        qh = q[:, heads, lo:hi].detach().float().requires_grad_()
        kh, vh = (t[:, h:h + 1, lo:hi].detach().float().requires_grad_() for t in (k, v))
        scores = (qh @ kh.transpose(-1, -2) * D ** -0.5).masked_fill(hidden, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ vh
        grads = torch.autograd.grad(out, (qh, kh, vh), dout[:, heads, lo:hi].float())
        for key, t in zip(parts, (out.detach(), *grads)):
            parts[key].append(t)
    return {key: torch.cat(ts, dim=1) for key, ts in parts.items()}


# ----------------------------------------------------------------------------------------------
# one training step, its answer, its check
# ----------------------------------------------------------------------------------------------

def train_step(fn, inputs: tuple, dout):
    """(output, gradient of every input) of one forward + backward of fn."""
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, dout))


def moe_answer(result, experts) -> dict:
    """What is compared of a MoE step: the output, dx, dlogits, the weight gradients of the
    `experts` sample, and every expert's weight-gradient norms (an expert no token chose must get
    zeros, not stale memory)."""
    out, dx, dlogits, dw13, dw2 = result
    norms = torch.cat([torch.linalg.vector_norm(dw13, dim=(1, 2)), torch.linalg.vector_norm(dw2, dim=(1, 2))])
    return {"out": out.detach(), "dx": dx, "dlogits": dlogits, "dgate_up": dw13[experts], "ddown": dw2[experts],
            "expert_grad_norms": norms.float()}


def attention_answer(result) -> dict:
    return dict(zip(("out", "dq", "dk", "dv"), (result[0].detach(), *result[1:])))


class Checker:
    """The answer checks of one case: ours against the reference (through `view`: the part of an
    answer the reference covers); each baseline against ours, or against the reference when
    ours has no answer."""

    def __init__(self, reference: dict | None, against: str, view=None):
        self.reference, self.against, self.view = reference, against, view or (lambda answer: answer)
        self.ours_answer = None

    def ours(self, got: dict) -> dict:
        """A wrong answer is an error: not timed, and the run fails."""
        entry = _compare(self.view(got), self.reference, self.against)
        wrong = common.wrong_answer(entry["max_rel_err"])
        if wrong:
            entry["error"] = wrong
        else:
            self.ours_answer = got
        return entry

    def baseline(self, got: dict) -> dict:
        """Past WRONG_REL_ERR a baseline is flagged ("disagrees") and still timed."""
        if self.ours_answer is not None:
            entry = _compare(got, self.ours_answer, "ours")
        elif self.reference is not None:
            entry = _compare(self.view(got), self.reference, self.against)
        else:
            return {"checked_against": None}
        flag = common.disagreement(entry["max_rel_err"], entry["checked_against"])
        return {**entry, "disagrees": flag} if flag else entry


def _compare(got: dict, want: dict, against: str) -> dict:
    errors = {key: common.rel_err(got[key], want[key]) for key in want}
    worst = max(errors.values(), key=lambda e: (math.isnan(e), e))  # a NaN is the worst
    return {"checked_against": against, "max_rel_err": worst, "rel_err": errors}


def peak_memory_gib(step, dev: str) -> float | None:
    """GPU memory one call of step allocates at its peak above what was allocated before it
    (its outputs and gradients included); None on CPU."""
    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def _failure(label: str, e: Exception, run: Run) -> dict:
    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print(f"    {label} failed: {msg}", flush=True)
    if run.verbose:
        traceback.print_exc()
    if run.dev == "cuda":
        torch.cuda.empty_cache()
    return {"error": msg}


def run_entry(label: str, step, answer, check, flops: float, run: Run) -> dict:
    """The entry of one implementation: its answer checked (`check`: Checker.ours or .baseline),
    then, unless wrong, the median time, TFLOP/s and peak memory of the step; an exception or the
    exhausted budget instead of a time."""
    if run.budget.exhausted():
        return {"error": "skipped: time budget"}
    try:
        entry = check(answer(step()))
        if "error" in entry:
            return entry
        ms = common.time_us(step, warmup_ms=WARMUP_MS, rep_ms=REP_MS) / 1e3
        tflops = flops / (ms * 1e-3) / 1e12
        return {**entry, "ms": ms, "tflops": tflops, "pct_peak": 100 * tflops / run.ceilings["matmul_tflops"],
                "peak_mem_gib": peak_memory_gib(step, run.dev)}
    except Exception as e:  # noqa: BLE001 - a failing implementation must not stop the run
        return _failure(label, e, run)


def _ratios(row: dict) -> None:
    ours_ms = row["entries"]["ours"].get("ms")
    for entry in row["entries"].values():
        if ours_ms and "ms" in entry:
            entry["vs_ours"] = entry["ms"] / ours_ms
    times = [f"{impl} {e['ms']:.2f} ms" if "ms" in e else f"{impl} -" for impl, e in row["entries"].items()]
    print("    " + ", ".join(times), flush=True)


# ----------------------------------------------------------------------------------------------
# the cases
# ----------------------------------------------------------------------------------------------

def moe_backend(x, logits, w13, w2) -> str:
    """The backend the registry picks for ours on these inputs (route/fused_moe where they differ)."""
    try:
        with torch.no_grad():
            weights, ids = ops.route(logits, TOP_K)
        names = [registry.select("route", logits, TOP_K).name,
                 registry.select("fused_moe", x, w13, w2, weights, ids).name]
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"
    return names[0] if names[0] == names[1] else "/".join(names)


def dense_skip(T: int, E: int, H: int, I: int, run: Run) -> str | None:
    """Why transformers' dense experts do not run at this size: every expert on every token is E
    times the routed FLOPs (estimated at the matmul peak against --max-baseline-ms), and its
    [E, T, *] activations, saved and in the backward, with the weight gradients must fit."""
    est_ms = 3 * 2 * E * T * 3 * H * I / (run.ceilings["matmul_tflops"] * 1e12) * 1e3
    if est_ms > run.max_baseline_ms:
        return f"skipped: estimated {est_ms:.0f} ms > --max-baseline-ms"
    if run.dev == "cuda":
        torch.cuda.empty_cache()
        need, free = (E * T * (3 * H + 7 * I) + 3 * E * H * I) * run.dtype.itemsize, torch.cuda.mem_get_info()[0]
        if need > 0.9 * free:
            return f"skipped: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    return None


def moe_case(shape: str, T: int, w13, w2, run: Run, baselines: dict) -> dict:
    """One MoE layer step at T tokens. baselines: {name: (fn, why not or None)}."""
    E, H, I = w13.shape[0], w13.shape[1], w2.shape[1]
    gen = torch.Generator(device=run.dev).manual_seed(SEED + T)
    x, logits, dout = (torch.randn(*size, device=run.dev, dtype=run.dtype, generator=gen)
                       for size in ((T, H), (T, E), (T, H)))
    inputs = (x.requires_grad_(), logits.requires_grad_(), w13, w2)
    experts = torch.linspace(0, E - 1, min(E, CHECK_EXPERTS), device=run.dev).round().long().unique()
    flops = 3 * 2 * T * TOP_K * 3 * H * I
    row = {"shape": shape, "E": E, "H": H, "I": I, "T": T, "flops": flops, "entries": {}}
    label = f"moe {shape} T={T}"
    print(label, flush=True)

    def step(fn):
        return lambda: train_step(fn, inputs, dout)

    def answer(result):
        return moe_answer(result, experts)

    try:
        checker = Checker(answer(step(reference_moe)()), "the torch backend")
        ours = run_entry(f"{label} ours", step(ours_moe), answer, checker.ours, flops, run)
    except Exception as e:  # noqa: BLE001
        checker = Checker(None, "the torch backend")
        ours = {"error": f"no reference answer, so not run: {_failure(f'{label} reference', e, run)['error']}"}
    row["entries"]["ours"] = {"backend": moe_backend(*inputs), **ours}
    for name, (fn, why) in baselines.items():
        why = why or (dense_skip(T, E, H, I, run) if name == "transformers" else None)
        row["entries"][name] = {"error": why} if why else \
            run_entry(f"{label} {name}", step(fn), answer, checker.baseline, flops, run)
        row["entries"][name]["backend"] = {"transformers": "bmm", "grouped_mm": "torch._grouped_mm"}[name]
    _ratios(row)
    return row


def moe_shape(shape: str, E: int, H: int, I: int, tokens, run: Run, gmm_why: str | None) -> list[dict]:
    gen = torch.Generator(device=run.dev).manual_seed(SEED)
    w13 = torch.randn(E, H, 2 * I, device=run.dev, dtype=run.dtype, generator=gen).mul_(0.02).requires_grad_()
    w2 = torch.randn(E, I, H, device=run.dev, dtype=run.dtype, generator=gen).mul_(0.02).requires_grad_()
    experts, hf_why = transformers_experts(E, H, I)
    baselines = {"transformers": (None if experts is None else transformers_moe(experts), hf_why),
                 "grouped_mm": (grouped_mm_moe, gmm_why)}
    rows = [moe_case(shape, T, w13, w2, run, baselines) for T in tokens]
    del w13, w2
    if run.dev == "cuda":
        torch.cuda.empty_cache()
    return rows


def attention_case(S: int, cfg: dict, run: Run, flex: Flex) -> dict:
    """One chunked attention layer step over S positions (batch 1)."""
    (hq, hkv), D, C = cfg["heads"], cfg["head_dim"], cfg["chunk"]
    gen = torch.Generator(device=run.dev).manual_seed(SEED + S)
    q, k, v, dout = (torch.randn(1, h, S, D, device=run.dev, dtype=run.dtype, generator=gen)
                     for h in (hq, hkv, hkv, hq))
    inputs = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
    flops = 3 * 4 * D * visible_pairs(S, C) * hq
    row = {"S": S, "chunk": C, "Hq": hq, "Hkv": hkv, "D": D, "flops": flops, "entries": {}}
    label = f"attention S={S} C={C}"
    print(label, flush=True)

    def step(fn):
        return lambda: train_step(fn, inputs, dout)

    bounds = [(c * C, min((c + 1) * C, S)) for c in sorted({0, (S - 1) // C})]  # the first and last chunk
    positions = torch.cat([torch.arange(lo, hi, device=run.dev) for lo, hi in bounds])
    try:
        parts = [chunk_reference(q, k, v, dout, lo, hi) for lo, hi in bounds]
        reference = {key: torch.cat([p[key] for p in parts], dim=2) for key in parts[0]}
    except Exception as e:  # noqa: BLE001
        reference, why = None, _failure(f"{label} reference", e, run)["error"]
    checker = Checker(reference, "the fp32 definition",
                      view=lambda answer: {key: t.index_select(2, positions) for key, t in answer.items()})
    ours = run_entry(f"{label} ours", step(ours_attention(C)), attention_answer, checker.ours, flops, run) \
        if reference is not None else {"error": f"no reference answer, so not run: {why}"}
    row["entries"]["ours"] = {"backend": registry.select("attention", *inputs, chunk_size=C).name, **ours}
    if S % C:
        row["entries"]["sdpa"] = {"error": f"unavailable: the chunk {C} does not divide S"}
    else:
        try:
            fn, choice = sdpa_chunked(*inputs, C, run.dev)
            row["entries"]["sdpa"] = {"backend": choice, **run_entry(f"{label} sdpa", step(fn), attention_answer,
                                                                     checker.baseline, flops, run)}
        except Exception as e:  # noqa: BLE001
            row["entries"]["sdpa"] = _failure(f"{label} sdpa", e, run)
    row["entries"]["flex"] = {"backend": "compiled" if flex.compiled else "eager",
                              **flex_entry(S, C, step, checker, flops, run, flex, label)}
    _ratios(row)
    return row


def flex_entry(S, C, step, checker, flops, run: Run, flex: Flex, label: str) -> dict:
    """flex_attention's entry; its first failure turns it off for the rest of the run (a compile
    that failed once is not paid again)."""
    if flex.why:
        return {"error": flex.why}
    if run.budget.left() < (FLEX_NEXT_S if flex.ran else FLEX_FIRST_S):
        return {"error": "skipped: time budget (flex compiles)"}
    try:
        entry = run_entry(f"{label} flex", step(flex.chunked(S, C)), attention_answer, checker.baseline, flops, run)
    except Exception as e:  # noqa: BLE001 - building the block mask
        entry = _failure(f"{label} flex", e, run)
    if "ms" in entry:
        flex.ran = True
    elif not flex.ran and not entry["error"].startswith("skipped"):
        flex.why = entry["error"] = f"unavailable: {entry['error']}"
    return entry


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

COLUMNS = [("impl", "impl", ""), ("backend", "backend", ""), ("ms", "fwd+bwd ms", ".2f"), ("tflops", "TFLOP/s", ".3g"),
           ("pct_peak", "% peak", ".0f"), ("peak_mem_gib", "peak GiB", ".2f"), ("vs_ours", "time / ours", ".2f"),
           ("max_rel_err", "max err", ".1e"), ("checked_against", "checked vs", ""), ("note", "note", "")]
MOE_KEYS = [("shape", "shape", ""), ("T", "T", "")]
ATTENTION_KEYS = [("S", "S", ""), ("chunk", "C", "")]


def table(rows: list[dict], keys) -> str:
    """One line per (case, implementation); peak memory 'n/a' where a timed entry has none (CPU),
    the note an error, a skip or a disagreement."""
    cols, flat = keys + COLUMNS, []
    for r in rows:
        for impl, e in r["entries"].items():
            cells = {**{key: r[key] for key, _, _ in keys}, **e, "impl": impl}
            cells["note"] = (e.get("error") or e.get("disagrees") or "")[:100] or None
            if "ms" in e and e.get("peak_mem_gib") is None:
                cells["peak_mem_gib"] = "n/a"
            flat.append({key: format(cells[key], fmt) if fmt and isinstance(cells.get(key), (int, float))
                         else cells.get(key) for key, _, fmt in cols})
    return common.markdown_table(flat, [(key, head, "s" if fmt else "") for key, head, fmt in cols])


def run_verdict(results: dict) -> dict:
    """common.verdict of the run: an entry of ours failed, or a baseline disagrees."""
    ours, baselines = [], []
    for layer, case in (("moe", "{shape} T={T}"), ("attention", "S={S} C={chunk}")):
        for r in results[layer]:
            for impl, e in r["entries"].items():
                where = f"{layer} {case.format(**r)} {impl}"
                if impl == "ours":
                    ours.append((where, e.get("error")))
                else:
                    baselines.append((where, e.get("disagrees")))
    return common.verdict(ours, baselines)


def main(argv=None):
    """Returns the exit status (common.exit_status): 1 when ours failed or gave a wrong answer."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes (what a machine without a GPU always runs)")
    p.add_argument("--layers", nargs="+", choices=("moe", "attention"), default=["moe", "attention"])
    p.add_argument("--shapes", nargs="+", choices=sorted(MOE_SHAPES) + sorted(QUICK_MOE_SHAPES), help="MoE shapes")
    p.add_argument("--tokens", nargs="+", type=int, help="MoE token counts T")
    p.add_argument("--seqs", nargs="+", type=int, help="attention sequence lengths S")
    p.add_argument("--no-flex", action="store_true", help="skip the flex_attention baseline (its compile)")
    p.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget; cases past it are skipped")
    p.add_argument("--max-baseline-ms", type=float, default=400.0,
                   help="skip transformers' dense experts where their estimated step time exceeds this")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing cases")
    args = p.parse_args(argv)

    dev = common.device()
    toy = args.quick or dev == "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    run = Run(dev, dtype, common.measure_ceilings(quick=args.quick), common.Budget(args.budget_s),
              args.max_baseline_ms, args.verbose)
    attention_cfg = dict(QUICK_ATTENTION if toy else ATTENTION, **({"seqs": args.seqs} if args.seqs else {}))
    results = {"dtype": str(dtype), "quick": toy, "top_k": TOP_K, "ceilings": run.ceilings,
               "attention_config": attention_cfg, "moe": [], "attention": [], "notes": []}
    print(f"train step (forward + backward), {common.gpu_name()}, {dtype}; matmul peak "
          f"{run.ceilings['matmul_tflops']:.1f} TFLOP/s ({run.ceilings['matmul_dtype']})", flush=True)
    path = None

    def save(path):  # after each part: a run cut short by its time limit keeps the finished ones
        results["verdict"] = run_verdict(results)
        return common.rewrite_results("train_step", results, path)

    if "moe" in args.layers:
        gmm_why = grouped_mm_unavailable(dev, dtype)
        results["notes"] += [f"grouped_mm: {gmm_why}"] if gmm_why else []
        shapes = {**MOE_SHAPES, **QUICK_MOE_SHAPES}
        for shape in args.shapes or list(QUICK_MOE_SHAPES if toy else MOE_SHAPES):
            results["moe"] += moe_shape(shape, *shapes[shape], args.tokens or (QUICK_TOKENS if toy else TOKENS), run,
                                        gmm_why)
            path = save(path)
    if "attention" in args.layers:
        flex = Flex(dev, "skipped: --no-flex" if args.no_flex else None)
        for S in attention_cfg["seqs"]:
            results["attention"].append(attention_case(S, attention_cfg, run, flex))
        results["notes"] += [f"flex: {flex.why}"] if flex.why else []
        path = save(path)
    print(f"\nMoE layer (top-{TOP_K}), forward + backward; TFLOP/s on 3x the routed forward FLOPs")
    print(table(results["moe"], MOE_KEYS))
    (hq, hkv), D = attention_cfg["heads"], attention_cfg["head_dim"]
    print(f"\nchunked attention ({hq} q / {hkv} kv heads, head_dim {D}, batch 1), forward + backward; "
          "TFLOP/s on 3x the visible forward FLOPs")
    print(table(results["attention"], ATTENTION_KEYS))
    print(f"\nresults: {path}")
    return common.exit_status(results["verdict"])


if __name__ == "__main__":
    sys.exit(main())
