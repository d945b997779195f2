"""End to end: time to first token, decode tokens/s and peak memory of Llama 4 at the real
Scout / Maverick layer shapes (random bf16 weights, fewer layers than the real 48 so they fit
one GPU), four ways side by side:

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
"""

from __future__ import annotations

import argparse
import contextlib
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
    weight), the keys/values it attends (one chunk at most on chunked layers), the final norm
    and LM head; everything but the routed experts in bf16."""
    H, D, E, k = cfg.hidden_size, cfg.head_dim, cfg.num_local_experts, cfg.num_experts_per_tok
    attn_w = H * D * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    expert = 3 * H * cfg.intermediate_size
    distinct = E * (1 - (1 - k / E) ** batch)
    total = 0.0
    for layer in range(cfg.num_hidden_layers):
        total += attn_w + 2 * H
        keys = context + 1 if not cfg.is_chunked(layer) else min(context + 1, cfg.attention_chunk_size)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU: the tiny model at toy lengths")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["scout", "maverick"])
    parser.add_argument("--prompts", type=int, nargs="+", help="prompt lengths (default 512 4096)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 16)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per case (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per number (median)")
    parser.add_argument("--weights", nargs="+", choices=sorted(EXPERT_BYTES), default=["bf16"],
                        help="routed-expert formats of the thin model (fp8/int4 add thin_fp8/thin_int4)")
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="wall-clock budget, shared equally by the models; later cases are skipped")
    parser.add_argument("--no-split", dest="split", action="store_false", help="skip the profiler split")
    parser.add_argument("--compile", action="store_true",
                        help="add thin_compile: torch.compile(mode='reduce-overhead') instead of our CUDA graph")
    args = parser.parse_args(argv)

    from llama4_fast.tiny import TINY_TEXT_CONFIG

    device = common.device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quick:  # toy sizes whatever else was asked: the suite's CPU dry run passes GPU sizes
        models = {"tiny": dict(TINY_TEXT_CONFIG)}
        args.prompts, args.batches, args.new_tokens, args.repeats = [16, 40], [2], 4, 1
    else:
        models = {m: MODELS[m] for m in args.models}
        args.prompts = args.prompts or [512, 4096]
        args.batches = args.batches or [1, 16]
        args.new_tokens = args.new_tokens or 128
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode time is t(N) - t(1))")
    start = time.monotonic()
    ceilings = common.measure_ceilings(quick=args.quick)
    results, path = [], None
    with torch.no_grad():
        for i, (name, text_config) in enumerate(models.items()):
            budget = common.Budget((args.budget_s - (time.monotonic() - start)) / (len(models) - i))
            print(f"{name}: building {text_config['num_hidden_layers']} layers ({dtype}) on {device}", flush=True)
            results.append(bench_model(name, text_config, args, dtype, device, ceilings, budget))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            path = common.rewrite_results("e2e", {"dtype": str(dtype), "ceilings": ceilings, "args": vars(args),
                                                  "models": results}, path)
    print_tables(results, dtype)
    print(f"\nwrote {path}")


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
    main()
