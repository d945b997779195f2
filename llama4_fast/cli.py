"""`llama4-fast` command line.

    llama4-fast demo                      # built-in tiny random Llama 4, no download
    llama4-fast demo --model DIR          # a real checkpoint directory (config.json + safetensors)
    llama4-fast demo --device cuda
    llama4-fast plan scout --weights int4 --context 32768     # will it fit? memory per GPU
    llama4-fast plan DIR --weights fp8 --gpus 8 --gpu-gib 80   # a checkpoint's config.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llama4_fast import Llama4, hf_patch, registry
from llama4_fast.loading import check_checkpoint

DEFAULT_PROMPT = "The three ways to use a kernel library are"


def _load(args):
    """(transformers model, prompt ids [1, S], tokenizer or None, description)."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.model is None:
        from llama4_fast.tiny import tiny_hf_model

        model = tiny_hf_model(seed=args.seed, dtype=dtype, device=args.device)
        return model, _random_prompt(model, args), None, "built-in tiny random Llama 4"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=args.device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        tokenizer = None
        if args.prompt is not None:
            print(f"warning: --prompt ignored: no tokenizer could be loaded from {args.model} ({type(e).__name__}); "
                  f"using a random prompt of --prompt-len={args.prompt_len} tokens", file=sys.stderr)
    if tokenizer is None:
        return model, _random_prompt(model, args), None, args.model
    prompt = tokenizer(args.prompt if args.prompt is not None else DEFAULT_PROMPT, return_tensors="pt").input_ids
    return model, prompt.to(args.device), tokenizer, args.model


def _random_prompt(model, args):
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(3, vocab, (1, args.prompt_len), generator=gen).to(args.device)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_generate(generate, device, new_tokens):
    generate(min(4, new_tokens))  # warm-up: kernel compilation and allocator out of the timing
    _sync(device)
    t0 = time.perf_counter()
    out = generate(new_tokens)
    _sync(device)
    return out, new_tokens / (time.perf_counter() - t0)


def demo(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but no CUDA GPU is visible", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model, prompt, tokenizer, name = _load(args)
    cfg = model.config.get_text_config()
    dtype = next(model.parameters()).dtype
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {name} ({cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts, top-{cfg.num_experts_per_tok}, "
          f"{n_params / 1e6:.1f}M parameters), {args.device}, {str(dtype).replace('torch.', '')}")
    print(f"prompt: {prompt.shape[1]} tokens, {args.new_tokens} new tokens, greedy, attention chunk "
          f"{cfg.attention_chunk_size}\n")

    def hf_generate(n):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False)

    with torch.no_grad():
        ref_tokens, ref_tps = _timed_generate(hf_generate, args.device, args.new_tokens)
        ref_logits = model(ref_tokens).logits
        hf_patch.patch(model)
        try:
            with registry.record() as calls:
                tokens, tps = _timed_generate(hf_generate, args.device, args.new_tokens)
                logits = model(ref_tokens).logits
            thin = Llama4.from_hf(model)
            thin_tokens, thin_tps = _timed_generate(lambda n: thin.generate(prompt, n), args.device, args.new_tokens)
        finally:
            hf_patch.unpatch(model)

    backends = {}
    for (op, backend), n in sorted(calls.items()):
        backends.setdefault(op, []).append(f"{backend} ({n} calls)")
    print("| op | backend used by the patched model |")
    print("|---|---|")
    for op, used in backends.items():
        print(f"| {op} | {', '.join(used)} |")

    n_new = args.new_tokens
    same = int((tokens[0, -n_new:] == ref_tokens[0, -n_new:]).sum())
    thin_same = int((thin_tokens[0, -n_new:] == ref_tokens[0, -n_new:]).sum())
    diff = (logits.float() - ref_logits.float()).abs().max().item()
    print("\n| run | tokens/s | speed-up | identical tokens |")
    print("|---|---:|---:|---|")
    print(f"| transformers ({model.config._attn_implementation}) | {ref_tps:.1f} | 1.00x | reference |")
    print(f"| transformers + llama4_fast.patch | {tps:.1f} | {tps / ref_tps:.2f}x | "
          f"{'yes' if same == n_new else 'no'} ({same}/{n_new}) |")
    print(f"| llama4_fast.Llama4 (thin model) | {thin_tps:.1f} | {thin_tps / ref_tps:.2f}x | "
          f"{'yes' if thin_same == n_new else 'no'} ({thin_same}/{n_new}) |")
    print(f"\nmax |logit difference|, patched vs unpatched, over {ref_tokens.shape[1]} positions: {diff:.2e}")
    print("tokens/s: new tokens over the wall time of generate (prefill included), after a warm-up run")
    if tokenizer is not None:
        print("\ncompletion:", tokenizer.decode(tokens[0, prompt.shape[1]:]))
    return 0 if same == n_new else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama4-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo",
                       help="generate with transformers, with and without llama4_fast.patch, and compare",
                       description="Generate greedily with a transformers Llama 4, unpatched, patched by "
                                   "llama4_fast.patch and as the thin llama4_fast.Llama4; print tokens/s, whether "
                                   "the tokens agree, and which backend each op ran on. Exit status 1 when the "
                                   "patched model's tokens differ.")
    d.add_argument("--model", metavar="DIR",
                   help="checkpoint directory (config.json + safetensors); default: the built-in tiny random model")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="where to run: bf16 on cuda, fp32 on cpu (default: %(default)s)")
    d.add_argument("--new-tokens", type=int, default=40, help="tokens to generate (default: %(default)s)")
    d.add_argument("--prompt-len", type=int, default=64,
                   help="length of the random prompt: the tiny model, or a checkpoint without a tokenizer "
                        "(default: %(default)s)")
    d.add_argument("--prompt", default=None,
                   help=f"prompt text for a checkpoint with a tokenizer (default: {DEFAULT_PROMPT!r})")
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (default: %(default)s)")
    p = _add_plan_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "plan":
        return plan(args, p)
    for option, value in (("--new-tokens", args.new_tokens), ("--prompt-len", args.prompt_len)):
        if value < 1:
            d.error(f"{option} must be >= 1, got {value}")
    if args.model is not None:
        try:  # the checks Llama4.from_pretrained makes, before transformers reads anything
            check_checkpoint(Llama4, args.model)
        except (OSError, ValueError) as e:
            d.error(f"--model: {e}")
    return demo(args)


# -- plan ----------------------------------------------------------------------------------------

def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _add_plan_parser(sub):
    from llama4_fast.planning import DEFAULT_GPU_GIB, PRESETS, WEIGHT_SCHEMES, WORKSPACE_GIB

    p = sub.add_parser("plan", help="memory per GPU for a model, weight scheme, batch and context: will it fit?",
                       description="Print the memory per GPU of a Llama 4 served by the thin model (weights by "
                                   "part, KV cache, prefill activations, workspace), whether it fits, and the "
                                   "largest context that does at this batch. Computed from the config, nothing "
                                   "loaded (llama4_fast.memory_plan; llama4_fast/planning.py states every formula).")
    p.add_argument("model", metavar="MODEL",
                   help=f"a preset ({', '.join(PRESETS)}: the published configs) or a checkpoint directory "
                        "holding config.json")
    p.add_argument("--weights", default="bf16", choices=WEIGHT_SCHEMES,
                   help="weight scheme of the routed experts, as llama4_fast.quantize (default: %(default)s)")
    p.add_argument("--group-size", type=_positive(int), default=128,
                   help="INT4 rows of K per scale (default: %(default)s)")
    for part, what in (("shared-expert", "the shared experts"), ("dense-ffn", "the dense FFN layers"),
                       ("attention", "the attention projections")):
        p.add_argument(f"--{part}", action="store_true", help=f"quantize {what} too (quantize's option)")
    p.add_argument("--batch", type=_positive(int), default=1, help="sequences per GPU (default: %(default)s)")
    p.add_argument("--context", type=_positive(int), default=8192,
                   help="cache length: prompt + new tokens (default: %(default)s)")
    p.add_argument("--gpus", type=_positive(int), default=1,
                   help="GPUs; more than one: expert parallel, which must divide the experts (default: %(default)s)")
    p.add_argument("--gpu-gib", type=_positive(float), default=DEFAULT_GPU_GIB,
                   help="memory per GPU in GiB (default: %(default)s)")
    p.add_argument("--piece", type=_positive(int), default=None,
                   help="prefill piece in tokens per sequence (default: the attention chunk, as Llama4.prefill)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="model dtype (default: the config's, else bfloat16)")
    p.add_argument("--workspace-gib", type=float, default=WORKSPACE_GIB,
                   help="allowance for CUDA context and allocator slack in GiB (default: %(default)s)")
    return p


def plan(args, p) -> int:
    from llama4_fast.planning import PlanArgumentError, memory_plan

    try:
        result = memory_plan(args.model, args.weights, group_size=args.group_size, batch=args.batch,
                             context=args.context, gpus=args.gpus, gpu_gib=args.gpu_gib,
                             shared_expert=args.shared_expert, dense_ffn=args.dense_ffn, attention=args.attention,
                             piece=args.piece, dtype=args.dtype, workspace_gib=args.workspace_gib)
    except PlanArgumentError as e:
        p.error(f"--{e.argument.replace('_', '-')}{str(e).removeprefix(e.argument)}")
    except (OSError, ValueError) as e:
        p.error(f"MODEL: {e}")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
