"""End to end: time to first token, decode tokens/s and peak memory of Llama 4 at the real
Scout / Maverick layer shapes. --depth short (the default): random bf16 weights, fewer layers
than the real 48 so they fit one GPU, four ways side by side:

- transformers, attn_implementation="eager"
- transformers, attn_implementation="sdpa"
- transformers patched by `llama4_fast.patch` (same model instance, patched in place)
- the thin `llama4_fast.Llama4`, sharing the same weights (`Llama4.from_hf`), CUDA-graph decode,
  and with --weights fp8 / int4 also the thin model with its routed experts quantized by
  `llama4_fast.quantize` (variants thin_fp8, thin_int4); with --compile also the thin model's
  forward under torch.compile(mode="reduce-overhead") instead of the explicit CUDA graph
  (variant thin_compile: the alternative the decode loop was designed against)

plus, per model, the GPU time of one decode step split into attention / MoE / dense FFN / rest
(torch.profiler, module ranges), and the thin model's decode step against its roofline floor:
the bytes a step must read (weights of every layer, the selected experts only, the KV cache it
attends, the LM head) over the HBM bandwidth measured in the same run.

    python benchmarks/e2e.py                     # GPU: Scout (4 layers) and Maverick (2 layers)
    python benchmarks/e2e.py --models scout --prompts 512 8192 32768 --batches 1 16
    python benchmarks/e2e.py --weights bf16 fp8 int4
    python benchmarks/e2e.py --quick             # CPU: the tiny model at toy sizes, fp32, torch backend

Timing is wall clock around whole `generate` calls (synchronised), the median of --repeats
after a warm-up call of the same shape (kernel compilation, graph capture). TTFT = a generate
with 1 new token; decode tokens/s = B * (N - 1) / (t(N new tokens) - t(1 new token)).
Cases that run out of memory or past --budget-s print '-' with the reason in the JSON.

--depth full: Scout at all 48 layers, one GPU, per routed-expert scheme of --weights (int4 and
fp8 by default; bf16, 201 GiB of weights, is refused with the reason). No transformers model
and no bf16 copy of the experts: `Llama4(cfg)` is built on the meta device, each MoE layer's
experts are drawn in bf16 on the GPU, quantized (`quantize_weight`) and wrapped in
`QuantExperts` before the next layer's are drawn, then every other weight is drawn on the GPU
(N(0, 0.02) as transformers initializes, norms 1). INT4 (67 GiB) fits an H100, FP8 (111 GiB) an
H200. Measured per scheme:

- TTFT at --ttft-prompts (8k, 32k): batch 1, `generate(ids, 1)`, the default prefill piece;
- decode tokens/s at --decode-batches (1, 8, 32) after a --decode-context (8192) token prompt:
  the caches are filled by one sequence's prefill, copied into every row (a batch-32 prefill of
  8k tokens each would take minutes and set the peak itself), then --new-tokens greedy steps of
  `Llama4.decode_step` (the CUDA-graph step `generate` replays) are timed. After an 8192-token
  prompt the global layers attend 8k+ keys and the chunked ones start a new chunk (a few keys),
  as a real 8k prompt would; --decode-context 8000 puts the steps at the end of the first chunk
  instead. Against the floor: `decode_floor_bytes` at the steps' mean position, with the built
  experts' real bytes per weight (scales included), over the HBM bandwidth measured in this run;
- peak memory: torch.cuda.max_memory_allocated per case, against `memory_plan("scout", scheme)`
  less its workspace allowance (what the allocator should see). TTFT cases:
  memory_plan(batch=1, context=prompt + 1); decode cases: the weights and KV cache of
  memory_plan(batch=B, context=context + new tokens) plus the activations of its batch-1
  prefill. A case the plan says does not fit the GPU is skipped with the plan's numbers.

Answers: logits finite and token ids in range in every case, and once per scheme the decode
step's logits against the full forward's on 8 sequences of 64 tokens (a coarse check: the
median relative error past DEPTH_REL_ERR = 0.25, since two correct bf16 paths through 48 random
layers differ by up to ~1e-1). A wrong answer or an exception exits 1 (common.exit_status)
after the JSON is written; skips (plan, memory, budget) do not.

    python benchmarks/e2e.py --depth full                        # Scout, 48 layers, INT4 and FP8
    python benchmarks/e2e.py --depth full --weights int4 --ttft-prompts 8192 --decode-batches 1 8
    python benchmarks/e2e.py --quick --depth full   # CPU: tiny config, 2 layers, 4 experts, int4 g32, torch backend
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402

# The published text configs, less the layer count; `layers` says which layer kinds the
# shortened model keeps. Scout: 4 layers = 3 chunked RoPE layers + the global NoPE layer,
# all MoE, the real pattern's period. Maverick: 2 layers = a chunked RoPE layer with the dense
# FFN + a global NoPE layer with the 128-expert MoE (one MoE layer is 32 GB in bf16).
COMMON = dict(hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_attention_heads=40,
              num_key_value_heads=8, head_dim=128, vocab_size=202048, attention_chunk_size=8192,
              num_experts_per_tok=1, rope_theta=500000.0, floor_scale=8192, attn_scale=0.1,
              attn_temperature_tuning=True, max_position_embeddings=1048576, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
MODELS = {
    "scout": dict(COMMON, num_local_experts=16, use_qk_norm=True, num_hidden_layers=4,
                  no_rope_layers=[1, 1, 1, 0], moe_layers=[0, 1, 2, 3]),
    "maverick": dict(COMMON, num_local_experts=128, use_qk_norm=False, num_hidden_layers=2,
                     no_rope_layers=[1, 0], moe_layers=[1]),
}
VARIANTS = ("hf_eager", "hf_sdpa", "hf_patched", "thin")
# Bytes a routed-expert weight takes in each format: FP8 one byte plus a per-channel scale;
# INT4 half a byte plus a bf16 scale per group of 128.
EXPERT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5 + 2 / 128}
EAGER_MAX_TOKENS = 8192  # eager attention materialises [B, 40, S, S] fp32 scores


def build_hf_model(text_config: dict, dtype: torch.dtype, device: str):
    """Llama4ForCausalLM with random weights, built directly on `device` in `dtype` (no fp32
    copy on the host: one Maverick MoE layer is 32 GB)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(**text_config)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Llama4ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None  # random weights: always the full length
    model.generation_config.pad_token_id = text_config["pad_token_id"]
    return model


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_s(fn, repeats: int) -> float:
    """Median wall-clock seconds of fn() after one warm-up call, synchronised around each."""
    fn()
    samples = []
    for _ in range(repeats):
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@contextlib.contextmanager
def variant(hf, name: str):
    """Put the shared model instance into one variant; yields the generate(ids, n) callable."""
    import llama4_fast

    if name.startswith("thin"):
        thin = llama4_fast.Llama4.from_hf(hf)
        if name == "thin_compile":  # inductor fuses the small ops and captures its own graphs
            thin.forward = torch.compile(thin.forward, mode="reduce-overhead")
        elif name != "thin":  # thin_fp8 / thin_int4: the thin model's own experts, quantized
            llama4_fast.quantize(thin, name.removeprefix("thin_"))
        try:
            yield _ThinGenerate(thin, cuda_graph=False if name == "thin_compile" else None)
        finally:
            thin.clear_caches()
        return
    if name == "hf_patched":
        llama4_fast.patch(hf)
    else:
        _set_attn_implementation(hf, name.removeprefix("hf_"))
    try:
        yield lambda ids, n: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                         min_new_tokens=n, do_sample=False)
    finally:
        llama4_fast.unpatch(hf)
        _set_attn_implementation(hf, "sdpa")


class _ThinGenerate:
    """thin.generate(ids, n), remembering whether its decode steps replayed our CUDA graph."""

    def __init__(self, thin, cuda_graph: bool | None):
        self.thin, self.use_graph, self.cuda_graph = thin, cuda_graph, None

    def __call__(self, ids, n):
        out = self.thin.generate(ids, n, cuda_graph=self.use_graph)
        if n > 1:
            self.cuda_graph = self.thin.decode_step(ids.shape[0], self.use_graph).graph is not None
        return out


def _set_attn_implementation(hf, name: str):
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation(name)
    else:  # older transformers: the config field is what the attention modules read
        hf.config._attn_implementation = name


def run_generate(gen, ids, new_tokens: int, repeats: int) -> dict:
    B = ids.shape[0]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    ttft = wall_s(lambda: gen(ids, 1), repeats)
    total = wall_s(lambda: gen(ids, new_tokens), repeats)
    if total <= ttft:
        return {"ttft_ms": ttft * 1e3, "error": "decode time not resolved: t(N tokens) <= t(1 token)"}
    row = {"ttft_ms": ttft * 1e3, "decode_ms_per_token": (total - ttft) / (new_tokens - 1) * 1e3,
           "decode_tok_s": B * (new_tokens - 1) / max(total - ttft, 1e-9)}
    if torch.cuda.is_available():
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_over_weights_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return row


# -- per-layer split from the profiler ---------------------------------------------------------
def _category(name: str, module) -> str | None:
    if name.endswith(".self_attn"):
        return "attention"
    if name.endswith(".feed_forward"):
        return "moe" if hasattr(module, "experts") else "dense_ffn"
    return None


@contextlib.contextmanager
def module_ranges(model):
    """Profiler ranges `e2e::<category>` around every attention and feed-forward module."""
    from torch.autograd.profiler import record_function

    handles = []
    for name, module in model.named_modules():
        cat = _category(name, module)
        if cat is None:
            continue

        def enter(mod, args, cat=cat):
            mod._e2e_range = record_function(f"e2e::{cat}")
            mod._e2e_range.__enter__()

        def leave(mod, args, out):
            mod._e2e_range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def profile_split(model, step, steps: int = 4) -> dict:
    """Time of `step()` split by module category, per step, in us: GPU kernel time on CUDA
    (kernels inside each module's range), CPU time on the CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    step()  # warm
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with module_ranges(model), profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        synchronize()
    # CPU-side events only: a range's device_time_total sums the kernels launched inside it
    # (the GPU-side copies of the ranges would count them twice).
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]

    def span(e):
        return e.device_time_total if cuda else e.cpu_time_total

    split = {}
    for e in events:
        if e.name.startswith("e2e::"):
            cat = e.name.removeprefix("e2e::")
            split[cat] = split.get(cat, 0.0) + span(e) / steps
    total = sum(span(e) for e in events if e.cpu_parent is None) / steps
    split["rest"] = max(total - sum(split.values()), 0.0)
    split["total"] = total
    return split


# -- roofline floor of one thin-model decode step ----------------------------------------------
def decode_floor_bytes(cfg, batch: int, context: int, expert_bytes: float = 2.0) -> float:
    """Bytes one decode step must read at `context` cached positions: every layer's attention
    projections and norms, its FFN (dense; or router + shared expert + the routed experts the
    batch selects, expected distinct count under uniform top-k routing, `expert_bytes` a
    weight), the keys/values it attends (on chunked layers, its chunk's up to the new token:
    position `context` starts a chunk when it is a multiple of the chunk size), the final norm
    and LM head; everything but the routed experts in bf16."""
    H, D, E, k = cfg.hidden_size, cfg.head_dim, cfg.num_local_experts, cfg.num_experts_per_tok
    attn_w = H * D * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    expert = 3 * H * cfg.intermediate_size
    distinct = E * (1 - (1 - k / E) ** batch)
    total = 0.0
    for layer in range(cfg.num_hidden_layers):
        total += attn_w + 2 * H
        keys = context + 1 if not cfg.is_chunked(layer) else context % cfg.attention_chunk_size + 1
        total += batch * 2 * cfg.num_key_value_heads * keys * D
        if layer in cfg.moe_layers:
            total += H * E + expert + distinct * expert * expert_bytes / 2
        else:
            total += 3 * H * cfg.intermediate_size_mlp
    total += H + cfg.vocab_size * H
    return 2.0 * total


def profile_decode_step(hf, cfg, args, device) -> dict:
    """The per-layer split of one decode step, thin model and transformers (patched, sdpa), at
    the first batch size and prompt length; a failure is recorded, not raised."""
    import llama4_fast

    split = {}
    batch, prompt = args.batches[0], args.prompts[0]
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt), device=device)
    try:
        thin = llama4_fast.Llama4.from_hf(hf)
        thin.setup_caches(batch, prompt + 8)
        thin.prefill(ids)
        step = thin.decode_step(batch, cuda_graph=False)  # eager: the profiler sees each kernel
        token = ids[:, -1]
        split["thin"] = profile_split(thin, lambda: step(token, prompt))
        thin.clear_caches()
        for v in ("hf_patched", "hf_sdpa"):
            with variant(hf, v):
                cache = hf(ids, use_cache=True).past_key_values
                split[v] = profile_split(hf, lambda: hf(ids[:, -1:], past_key_values=cache, use_cache=True))
    except Exception as e:  # the timing cases still run
        traceback.print_exc()
        split["error"] = f"{type(e).__name__}: {e}"[:500]
    split["context"] = (f"B={batch}, one decode step after a {prompt}-token prompt "
                        "(thin model without its CUDA graph, so the profiler sees each kernel)")
    return split


def bench_model(name: str, text_config: dict, args, dtype, device, ceilings, budget) -> dict:
    import llama4_fast

    variants = VARIANTS + tuple(f"thin_{w}" for w in args.weights if w != "bf16") + (
        ("thin_compile",) if args.compile else ())
    hf = build_hf_model(text_config, dtype, device)
    cfg = llama4_fast.Llama4Config.from_hf(hf.config)
    weights_gib = sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**30
    split = profile_decode_step(hf, cfg, args, device) if args.split else {}
    rows = []
    for batch in args.batches:
        for prompt in args.prompts:
            ids = torch.randint(3, cfg.vocab_size, (batch, prompt), device=device)
            row = {"model": name, "batch": batch, "prompt": prompt, "new_tokens": args.new_tokens}
            for v in variants:
                if budget.exhausted():
                    row[v] = {"error": "skipped: time budget"}
                    continue
                if v == "hf_eager" and batch * prompt > EAGER_MAX_TOKENS:
                    row[v] = {"error": f"skipped: eager attention scores at B*S > {EAGER_MAX_TOKENS}"}
                    continue
                try:
                    with variant(hf, v) as gen:
                        row[v] = run_generate(gen, ids, args.new_tokens, args.repeats)
                        if isinstance(gen, _ThinGenerate):
                            row[v]["cuda_graph"] = gen.cuda_graph
                except torch.OutOfMemoryError:
                    row[v] = {"error": "out of memory"}
                except Exception as e:  # one broken variant must not cost the run's other numbers
                    traceback.print_exc()
                    row[v] = {"error": f"{type(e).__name__}: {e}"[:500]}
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            for v in variants[3:]:  # the thin model, bf16 and quantized: against its roofline floor
                res = row.get(v, {})
                if "decode_ms_per_token" in res:
                    weights = v.removeprefix("thin_") if v.removeprefix("thin_") in EXPERT_BYTES else "bf16"
                    floor_bytes = decode_floor_bytes(cfg, batch, prompt + args.new_tokens // 2, EXPERT_BYTES[weights])
                    floor_s = floor_bytes / (ceilings["hbm_tbps"] * 1e12)
                    res["floor_ms_per_token"] = floor_s * 1e3
                    res["x_floor"] = res["decode_ms_per_token"] / (floor_s * 1e3)
            thin = row.get("thin", {})
            if "decode_tok_s" in thin:
                for base in ("hf_eager", "hf_sdpa", "hf_patched"):
                    if "decode_tok_s" in row.get(base, {}):
                        row[f"thin_vs_{base}"] = thin["decode_tok_s"] / row[base]["decode_tok_s"]
            if "decode_tok_s" in row.get("hf_patched", {}) and "decode_tok_s" in row.get("hf_sdpa", {}):
                row["patched_vs_sdpa"] = row["hf_patched"]["decode_tok_s"] / row["hf_sdpa"]["decode_tok_s"]
            if "peak_gib" in row.get("hf_patched", {}) and "peak_gib" in row.get("hf_sdpa", {}):
                row["patched_peak_vs_sdpa"] = row["hf_patched"]["peak_gib"] / row["hf_sdpa"]["peak_gib"]
            rows.append(row)
            print(f"  {name} B={batch} prompt={prompt}: " + ", ".join(
                f"{v} {row[v].get('decode_tok_s', float('nan')):.1f} tok/s" for v in variants), flush=True)

    del hf
    return {"model": name, "layers": cfg.num_hidden_layers, "moe_layers": cfg.moe_layers, "variants": variants,
            "weights_gib": weights_gib, "text_config": text_config, "cases": rows, "split_us": split}


# -- --depth full: Scout at 48 layers, routed experts created in quantized form ---------------
# The published Scout text config at its real depth (every 4th layer global NoPE, all MoE):
# the shapes of memory_plan("scout").
FULL_DEPTH = dict(COMMON, num_local_experts=16, use_qk_norm=True, num_hidden_layers=48)
INIT_STD = 0.02  # transformers' initializer_range for Llama 4
CHECK_BATCH, CHECK_PROMPT = 8, 64  # the decode-vs-forward answer check (--quick: 2 x 40, past a chunk)
# Past this median relative error the decode step is wrong. Not common.WRONG_REL_ERR: two correct
# paths through 48 layers of random bf16 weights differ by up to ~1e-1 per sequence (top-1
# routing ties that rounding flips; measured 0 to 9e-2 with the torch backend on CPU, 48 layers,
# H=1024, 8 x 64 tokens), while a decode that reads unwritten (zero) caches is off by ~1.3.
DEPTH_REL_ERR = 0.25
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
GIB = 2**30


def build_full_depth(cfg, scheme: str, group_size: int, dtype, device):
    """The thin model with random weights, built without a full-precision copy of its experts:
    modules on the meta device; per MoE layer, gate_up_proj then down_proj drawn in `dtype` on
    `device`, quantized and dropped before the next is drawn, the pair wrapped in QuantExperts;
    then every other weight drawn on `device` (N(0, INIT_STD); norms 1)."""
    import llama4_fast
    from llama4_fast.config import rope_inv_freq
    from llama4_fast.quant import quantize_weight
    from llama4_fast.quant_modules import QuantExperts

    torch.manual_seed(0)
    with torch.device("meta"):
        model = llama4_fast.Llama4(cfg)
    for i in sorted(set(cfg.moe_layers)):
        moe = model.layers[i].feed_forward
        formats = []
        for attr in ("gate_up_proj", "down_proj"):
            w = torch.randn(getattr(moe.experts, attr).shape, dtype=dtype, device=device).mul_(INIT_STD)
            formats.append(quantize_weight(w, scheme, group_size, name=f"layers.{i}.feed_forward.experts.{attr}"))
            del w
        moe.experts = QuantExperts(*formats)
        del formats
    for name, p in list(model.named_parameters()):
        parent, _, attr = name.rpartition(".")
        t = (torch.ones(p.shape, dtype=dtype, device=device) if name.endswith("norm.weight")
             else torch.randn(p.shape, dtype=dtype, device=device).mul_(INIT_STD))
        setattr(model.get_submodule(parent), attr, torch.nn.Parameter(t, requires_grad=False))
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


def expert_bytes_per_weight(model) -> float:
    """Bytes the built routed experts take per logical weight, scales (and zero points) included."""
    from llama4_fast.quant_modules import QuantExperts

    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    stored = sum(b.numel() * b.element_size() for e in experts for b in e.buffers())
    logical = sum(math.prod(e.gate_up_proj.shape) + math.prod(e.down_proj.shape) for e in experts)
    return stored / logical


def answer_error(logits: torch.Tensor, tokens: torch.Tensor, vocab: int) -> str | None:
    """The wrong answer a case records: non-finite logits, or token ids outside [0, vocab)."""
    msg = None
    if not bool(torch.isfinite(logits).all()):
        msg = "WRONG ANSWER: non-finite logits"
    elif tokens.numel() and not bool(((tokens >= 0) & (tokens < vocab)).all()):
        msg = f"WRONG ANSWER: token ids outside [0, {vocab})"
    if msg:
        print(f"    {msg}", flush=True)
    return msg


def check_decode(model, batch: int, prompt: int, device) -> dict:
    """Per sequence, the relative error of the decode step's logits for the last of `prompt`
    tokens (the others prefilled) against the full forward's (no caches); the median decides
    (DEPTH_REL_ERR). A coarse check: it catches a decode that reads the wrong caches or
    weights, not rounding; the kernels' own answers are checked by their benchmarks."""
    V = model.config.vocab_size
    ids = torch.randint(3, V, (batch, prompt), device=device)
    model.clear_caches()
    ref = model(ids, last_only=True)[:, -1].float()
    model.setup_caches(batch, prompt)
    model.prefill(ids[:, :-1])
    got = model.decode_step(batch)(ids[:, -1], prompt - 1).float()
    model.clear_caches()
    errs = [common.rel_err(got[b], ref[b]) for b in range(batch)]
    error = answer_error(got, got.argmax(-1), V) or answer_error(ref, ref.argmax(-1), V)
    median = statistics.median(errs)
    if not error and not median <= DEPTH_REL_ERR:
        error = f"WRONG ANSWER: decode step vs full forward, median relative error {median:.2e} > {DEPTH_REL_ERR:g}"
        print(f"    {error}", flush=True)
    return {"batch": batch, "prompt": prompt, "rel_err_rows": errs, "rel_err_median": median, "error": error}


class FullDepthPlan:
    """memory_plan("scout", scheme) at the cases' batch and context (the toy config with
    --quick), in the model dtype, against this GPU's memory."""

    def __init__(self, source, scheme: str, group_size: int, dtype, device):
        self.source, self.scheme, self.group_size = source, scheme, group_size
        self.dtype = _DTYPE_NAMES[dtype]
        self.cuda = device == "cuda"
        self.gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if self.cuda else 80.0

    def __call__(self, batch: int, context: int):
        import llama4_fast

        return llama4_fast.memory_plan(self.source, self.scheme, group_size=self.group_size, batch=batch,
                                       context=context, gpu_gib=self.gpu_gib, dtype=self.dtype)

    def describe(self, batch: int, context: int) -> str:
        name = self.source if isinstance(self.source, str) else "tiny"
        return f"memory_plan({name!r}, {self.scheme!r}, batch={batch}, context={context})"

    def expect(self, row: dict, allocator: int, workspace: int, what: str) -> str | None:
        """Record the plan's prediction in `row`; the reason to skip the case when it does not fit."""
        row["plan"] = what
        row["plan_gib"] = allocator / GIB
        need = (allocator + workspace) / GIB
        if self.cuda and need > self.gpu_gib:
            return f"skipped: does not fit: the plan needs {need:.1f} GiB, the GPU has {self.gpu_gib:.1f} GiB"
        return None


@contextlib.contextmanager
def measured(model, row: dict):
    """Clean caches and a fresh peak for one case; records peak_gib / peak_over_plan after it,
    and turns an exception into the row's error (out of memory: a skip)."""
    model.clear_caches()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
        if torch.cuda.is_available():
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            if "plan_gib" in row:
                row["peak_over_plan"] = row["peak_gib"] / row["plan_gib"]
    except torch.OutOfMemoryError:
        planned = f" (the plan predicted {row['plan_gib']:.1f} GiB)" if "plan_gib" in row else ""
        row["error"] = f"skipped: out of memory{planned}"
    except Exception as e:  # one broken case must not cost the run's other numbers
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        model.clear_caches()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def ttft_case(model, plan: FullDepthPlan, prompt: int, repeats: int, device) -> dict:
    """Batch 1: one checked prefill (warm-up), then `repeats` timed generate(ids, 1)."""
    row = {"case": "ttft", "batch": 1, "tokens": prompt}
    p = plan(1, prompt + 1)
    skip = plan.expect(row, p.total - p.workspace, p.workspace, plan.describe(1, prompt + 1) + " less workspace")
    if skip:
        return dict(row, error=skip)
    V = model.config.vocab_size
    ids = torch.randint(3, V, (1, prompt), device=device)
    with measured(model, row):
        model.setup_caches(1, prompt + 1)
        logits = model.prefill(ids)
        samples, out = [], None
        for _ in range(repeats):
            synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, 1)
            synchronize()
            samples.append(time.perf_counter() - t0)
        row["ttft_ms"] = statistics.median(samples) * 1e3
        error = answer_error(logits, out[:, prompt:], V)
        if error:
            row["error"] = error
            del row["ttft_ms"]
    return row


def decode_case(model, plan: FullDepthPlan, batch: int, context: int, new_tokens: int, repeats: int, device,
                ceilings: dict, expert_bytes: float) -> dict:
    """`batch` sequences at `context` cached positions (one prefill, copied into every row):
    `new_tokens` greedy decode steps, timed `repeats` times after a warm-up (the CUDA-graph
    capture); against the decode floor at the mean context of the steps."""
    from llama4_fast.model import sample

    row = {"case": "decode", "batch": batch, "tokens": context, "new_tokens": new_tokens}
    pb, p1 = plan(batch, context + new_tokens), plan(1, context + new_tokens)
    skip = plan.expect(row, pb.weight_bytes + pb.kv_cache + p1.activations, pb.workspace,
                       f"weights + KV cache of {plan.describe(batch, context + new_tokens)} + activations of "
                       f"{plan.describe(1, context + new_tokens)}")
    if skip:
        return dict(row, error=skip)
    V = model.config.vocab_size
    ids = torch.randint(3, V, (1, context), device=device)
    with measured(model, row):
        model.setup_caches(batch, context + new_tokens)
        first_logits = model.prefill(ids)
        for layer in model.layers:
            kv = layer.self_attn.kv_cache
            kv.k[1:], kv.v[1:] = kv.k[:1], kv.v[:1]
        first = sample(first_logits).expand(batch).contiguous()
        step = model.decode_step(batch)
        step(first, context)  # warm-up: kernels compiled, graph captured
        tokens = torch.empty(batch, new_tokens, dtype=torch.long, device=device)

        def run():
            token = first
            for i in range(new_tokens):
                logits = step(token, context + i)
                token = sample(logits)
                tokens[:, i] = token
            return logits

        samples = []
        for _ in range(repeats):
            synchronize()
            t0 = time.perf_counter()
            logits = run()
            synchronize()
            samples.append(time.perf_counter() - t0)
        t = statistics.median(samples)
        row["cuda_graph"] = step.graph is not None
        error = answer_error(first_logits, first, V) or answer_error(logits, tokens, V)
        if error:
            row["error"] = error
            return row
        floor_s = decode_floor_bytes(model.config, batch, context + new_tokens // 2, expert_bytes) / (
            ceilings["hbm_tbps"] * 1e12)
        row.update(decode_ms_per_token=t / new_tokens * 1e3, decode_tok_s=batch * new_tokens / t,
                   floor_ms_per_token=floor_s * 1e3, x_floor=t / new_tokens / floor_s)
    return row


def bench_full_depth(scheme: str, text_config: dict, plan_source, args, dtype, device, ceilings, budget) -> dict:
    """One routed-expert scheme of --depth full: build, check, then the TTFT and decode cases."""
    import llama4_fast

    cfg = llama4_fast.Llama4Config.from_hf(text_config)
    res = {"model": plan_source if isinstance(plan_source, str) else "tiny", "depth": "full", "weights": scheme,
           "group_size": args.group_size if scheme == "int4" else None, "layers": cfg.num_hidden_layers,
           "moe_layers": len(set(cfg.moe_layers)), "cases": []}
    if scheme == "bf16":
        need = llama4_fast.memory_plan("scout", "bf16").weight_bytes / GIB
        return dict(res, error=f"skipped: bf16 experts at full depth: Scout's weights alone are {need:.0f} GiB "
                               "(memory_plan), more than one GPU holds; --depth full measures int4 and fp8")
    plan = FullDepthPlan(plan_source, scheme, args.group_size, dtype, device)
    fixed = plan(1, min(args.ttft_prompts + [args.decode_context]))
    res["plan_weights_gib"] = fixed.weight_bytes / GIB
    if plan.cuda and fixed.weight_bytes + fixed.workspace > plan.gpu_gib * GIB:
        return dict(res, error=f"skipped: does not fit: weights {fixed.weight_bytes / GIB:.1f} GiB + workspace "
                               f"{fixed.workspace / GIB:g} GiB (memory_plan) > the GPU's {plan.gpu_gib:.1f} GiB")
    if budget.exhausted():
        return dict(res, error="skipped: time budget")
    model = build_measured(res, cfg, scheme, args.group_size, dtype, device)
    if model is None:
        return res
    try:
        res["check"] = {}
        with measured(model, res["check"]):
            res["check"].update(check_decode(model, *((2, 40) if args.quick else (CHECK_BATCH, CHECK_PROMPT)), device))
        cases = [("ttft", 1, prompt) for prompt in args.ttft_prompts] + [
            ("decode", batch, args.decode_context) for batch in args.decode_batches]
        for kind, batch, tokens in cases:
            if budget.exhausted():
                row = {"case": kind, "batch": batch, "tokens": tokens, "error": "skipped: time budget"}
            elif kind == "ttft":
                row = ttft_case(model, plan, tokens, args.repeats, device)
            else:
                row = decode_case(model, plan, batch, tokens, args.new_tokens, args.repeats, device, ceilings,
                                  res["expert_bytes_per_weight"])
            res["cases"].append(row)
            print_case(res, row)
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    peaks = [row["peak_gib"] for row in res["cases"] if "peak_gib" in row]
    if peaks:
        res["run_peak_gib"] = max(peaks)
    return res


def build_measured(res: dict, cfg, scheme: str, group_size: int, dtype, device):
    """build_full_depth, recording in `res` its time, its weights against the plan's, the bytes
    per expert weight and the build's peak; None (and res["error"]) when it fails."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    try:
        model = build_full_depth(cfg, scheme, group_size, dtype, device)
    except torch.OutOfMemoryError:  # the partial model goes with the traceback, at the end of this clause
        res["error"] = "skipped: out of memory while building"
        return None
    except Exception as e:  # recorded: a failure of ours (exit 1), the other schemes still run
        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {e}"[:500]
        return None
    res["build_s"] = time.monotonic() - t0
    tensors = itertools.chain(model.parameters(), model.buffers())
    res["weights_gib"] = sum(t.numel() * t.element_size() for t in tensors) / GIB
    res["weights_over_plan"] = res["weights_gib"] / res["plan_weights_gib"]
    res["expert_bytes_per_weight"] = expert_bytes_per_weight(model)
    if torch.cuda.is_available():
        res["build_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    print(f"  {res['model']} full depth {scheme}: built in {res['build_s']:.1f} s, {res['weights_gib']:.1f} GiB "
          f"of weights (plan {res['plan_weights_gib']:.1f})", flush=True)
    return model


def print_case(res: dict, row: dict):
    keys = ("ttft_ms", "decode_tok_s", "x_floor", "peak_over_plan")
    found = row["error"] if "error" in row else ", ".join(f"{k} {row[k]:.2f}" for k in keys if k in row)
    print(f"  {res['model']} full depth {res['weights']} {row['case']} B={row['batch']} {row['tokens']} tokens: "
          f"{found}", flush=True)


def cpu_backend(device: str):
    """On CPU the torch backend, whatever TRITON_INTERPRET says: the full-depth dry run tests the
    code path, not the kernels (their own benchmarks run them through the interpreter)."""
    if device != "cpu":
        return contextlib.nullcontext()
    from llama4_fast import registry

    return registry.use("torch")


def full_depth_failures(full: list[dict]) -> list[tuple[str, str | None]]:
    """(where, error) of every entry of --depth full, for common.verdict."""
    found = []
    for res in full:
        where = f"{res['model']} full depth {res['weights']}"
        found.append((where, res.get("error")))
        found.append((f"{where} decode check", res.get("check", {}).get("error")))
        found += [(f"{where} {row['case']} B={row['batch']} {row['tokens']} tokens", row.get("error"))
                  for row in res["cases"]]
    return found


def print_full_depth(full: list[dict], ceilings: dict):
    for res in full:
        scheme = res["weights"] + (f" g{res['group_size']}" if res.get("group_size") else "")
        print(f"\n{res['model']}, full depth: {res['layers']} layers, {scheme} routed experts, {common.gpu_name()}, "
              f"HBM {ceilings['hbm_tbps']:.2f} TB/s measured")
        if "cases" not in res or "weights_gib" not in res:
            print(f"- ({res.get('error')})")
            continue
        print(f"weights {res['weights_gib']:.2f} GiB (plan {res['plan_weights_gib']:.2f}, "
              f"{res['expert_bytes_per_weight']:.4f} bytes per expert weight), built in {res['build_s']:.1f} s"
              + (f", build peak {res['build_peak_gib']:.1f} GiB" if "build_peak_gib" in res else ""))
        check = res.get("check", {})
        if "rel_err_median" in check:
            print(f"decode step vs full forward, {check['batch']} x {check['prompt']} tokens: median relative error "
                  f"{check['rel_err_median']:.2e}" + (f" ({check['error']})" if check.get("error") else ""))
        elif check.get("error"):
            print(f"decode step vs full forward: {check['error']}")
        cols = [("case", "case", ""), ("batch", "B", ""), ("tokens", "prompt / context", ""),
                ("ttft_ms", "TTFT ms", ".1f"), ("decode_tok_s", "tok/s", ".1f"),
                ("decode_ms_per_token", "ms / step", ".2f"), ("floor_ms_per_token", "floor ms", ".2f"),
                ("x_floor", "x floor", ".2f"), ("peak_gib", "peak GiB", ".2f"), ("plan_gib", "plan GiB", ".2f"),
                ("peak_over_plan", "peak / plan", ".3f"), ("error", "note", "")]
        print(common.markdown_table(res["cases"], cols))


def main(argv=None):
    """Returns the exit status (common.exit_status): 1 when a --depth full case of ours failed
    or gave a wrong answer."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU: the tiny model at toy lengths")
    parser.add_argument("--depth", nargs="+", choices=("short", "full"), default=["short"],
                        help="short: Scout 4 / Maverick 2 layers, four ways; full: Scout at 48 layers, quantized")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["scout", "maverick"])
    parser.add_argument("--prompts", type=int, nargs="+", help="prompt lengths (default 512 4096)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 16)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per case (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per number (median)")
    parser.add_argument("--weights", nargs="+", choices=sorted(EXPERT_BYTES),
                        help="routed-expert formats: short depth, of the thin model (default bf16; fp8/int4 add "
                             "thin_fp8/thin_int4); full depth, the schemes measured (default int4 fp8)")
    parser.add_argument("--group-size", type=int, default=128, help="INT4 group, full depth (--quick: 32)")
    parser.add_argument("--ttft-prompts", type=int, nargs="+", help="full depth: TTFT prompts (default 8192 32768)")
    parser.add_argument("--decode-batches", type=int, nargs="+", help="full depth: decode batches (default 1 8 32)")
    parser.add_argument("--decode-context", type=int, help="full depth: cached positions at decode (default 8192)")
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="wall-clock budget, shared equally by the models (and full-depth schemes); "
                             "later cases are skipped")
    parser.add_argument("--no-split", dest="split", action="store_false", help="skip the profiler split")
    parser.add_argument("--compile", action="store_true",
                        help="add thin_compile: torch.compile(mode='reduce-overhead') instead of our CUDA graph")
    args = parser.parse_args(argv)

    from llama4_fast.tiny import TINY_TEXT_CONFIG

    device = common.device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    full_weights = list(dict.fromkeys(args.weights or ["int4", "fp8"])) if "full" in args.depth else []
    args.weights, args.full_depth_weights = args.weights or ["bf16"], full_weights
    if args.quick:  # toy sizes whatever else was asked: the suite's CPU dry run passes GPU sizes
        models = {"tiny": dict(TINY_TEXT_CONFIG)}
        # full depth: the tiny model cut to a chunked and a global layer, 4 experts of I=256
        # (the torch backend dequantizes each selected expert per call); its own plan
        full_config = dict(TINY_TEXT_CONFIG, num_hidden_layers=2, no_rope_layers=[1, 0], num_local_experts=4,
                           intermediate_size=256)
        plan_source = None
        args.prompts, args.batches, args.new_tokens, args.repeats = [16, 40], [2], 4, 1
        args.ttft_prompts, args.decode_batches, args.decode_context, args.group_size = [40], [1, 2], 40, 32
    else:
        models = {m: MODELS[m] for m in args.models}
        full_config, plan_source = FULL_DEPTH, "scout"
        args.prompts = args.prompts or [512, 4096]
        args.batches = args.batches or [1, 16]
        args.new_tokens = args.new_tokens or 128
        args.ttft_prompts = args.ttft_prompts or [8192, 32768]
        args.decode_batches = args.decode_batches or [1, 8, 32]
        args.decode_context = args.decode_context or 8192
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode time is t(N) - t(1))")
    if plan_source is None:
        import llama4_fast

        plan_source = llama4_fast.Llama4Config.from_hf(full_config)
    parts = ([("short", name) for name in models] if "short" in args.depth else []) + [
        ("full", w) for w in full_weights]
    start = time.monotonic()
    ceilings = common.measure_ceilings(quick=args.quick)
    results, full, path = [], [], None
    with torch.no_grad():
        for i, (depth, name) in enumerate(parts):
            budget = common.Budget((args.budget_s - (time.monotonic() - start)) / (len(parts) - i))
            if depth == "short":
                text_config = models[name]
                print(f"{name}: building {text_config['num_hidden_layers']} layers ({dtype}) on {device}", flush=True)
                results.append(bench_model(name, text_config, args, dtype, device, ceilings, budget))
            else:
                print(f"full depth, {name} experts: building {full_config['num_hidden_layers']} layers on "
                      f"{device}", flush=True)
                with cpu_backend(device):
                    full.append(bench_full_depth(name, full_config, plan_source, args, dtype, device, ceilings,
                                                 budget))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            found = common.verdict(full_depth_failures(full), [])
            path = common.rewrite_results("e2e", {"dtype": str(dtype), "ceilings": ceilings, "args": vars(args),
                                                  "models": results, "full_depth": full, "verdict": found}, path)
    print_tables(results, dtype)
    print_full_depth(full, ceilings)
    print(f"\nwrote {path}")
    return common.exit_status(common.verdict(full_depth_failures(full), []))


def print_tables(results, dtype):
    for res in results:
        print(f"\n{res['model']}: {res['layers']} layers (MoE layers {res['moe_layers']}), "
              f"{res['weights_gib']:.1f} GiB of {dtype} weights, {common.gpu_name()}")
        flat = []
        variants = res["variants"]
        for row in res["cases"]:
            r = {"batch": row["batch"], "prompt": row["prompt"]}
            for v in variants:
                r[f"{v}_tok_s"] = row[v].get("decode_tok_s")
                r[f"{v}_ttft"] = row[v].get("ttft_ms")
                r[f"{v}_x_floor"] = row[v].get("x_floor")
            r["patched_vs_sdpa"] = row.get("patched_vs_sdpa")
            r["peak_ratio"] = row.get("patched_peak_vs_sdpa")
            flat.append(r)
        cols = [("batch", "B", ""), ("prompt", "prompt", "")]
        cols += [(f"{v}_tok_s", f"{v} tok/s", ".1f") for v in variants]
        cols += [(f"{v}_ttft", f"{v} TTFT ms", ".1f") for v in variants]
        cols += [(f"{v}_x_floor", f"{v} / floor", ".2f") for v in variants[3:]]
        cols += [("patched_vs_sdpa", "patched / sdpa", ".2f"),
                 ("peak_ratio", "peak patched / sdpa", ".3f")]
        print(common.markdown_table(flat, cols))
        split = res["split_us"]
        if split:
            print(f"\ndecode step split, us ({split['context']})")
            cats = ["attention", "moe", "dense_ffn", "rest", "total"]
            rows = [dict({"variant": v}, **split[v]) for v in ("thin", "hf_patched", "hf_sdpa") if v in split]
            if "error" in split:
                print(f"(profiling failed: {split['error']})")
            print(common.markdown_table(rows, [("variant", "variant", "")] + [(c, c, ".0f") for c in cats]))


if __name__ == "__main__":
    sys.exit(main())
