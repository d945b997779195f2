"""Forward time of transformers' Llama 4, unpatched vs `llama4_fast.patch`, on the built-in tiny
model (4 layers, 16 experts, top-1): the spine's end-to-end check on any machine.

    python benchmarks/hf_patch.py            # CPU: fp32, torch backend; GPU: bf16, triton backend
    python benchmarks/hf_patch.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer token counts")
    parser.add_argument("--tokens", type=int, nargs="+", help="forward lengths T (batch 1)")
    args = parser.parse_args(argv)

    import llama4_fast
    from llama4_fast.tiny import tiny_hf_model

    dev = common.device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    tokens = args.tokens or ([1, 64] if args.quick else [1, 16, 128, 512, 2048])
    model = tiny_hf_model(seed=0, dtype=dtype, device=dev)
    rows = []
    for T in tokens:
        ids = torch.randint(3, model.config.vocab_size, (1, T), device=dev)
        with torch.no_grad():
            ref_us = common.time_us(lambda: model(ids))
            llama4_fast.patch(model)
            with llama4_fast.registry.record() as calls:
                model(ids)
            us = common.time_us(lambda: model(ids))
            llama4_fast.unpatch(model)
        backend = sorted({b for (op, b) in calls if op == "fused_moe"})
        rows.append({"T": T, "transformers_us": ref_us, "patched_us": us, "speedup": ref_us / us,
                     "moe_backend": ",".join(backend)})
    columns = [("T", "T", ""), ("transformers_us", "transformers us", ".0f"), ("patched_us", "patched us", ".0f"),
               ("speedup", "speed-up", ".2f"), ("moe_backend", "fused_moe backend", "")]
    print(f"tiny Llama 4 forward (4 layers, 16 experts, top-1), {common.gpu_name()}, {dtype}")
    print(common.markdown_table(rows, columns))
    path = common.write_results("hf_patch", {"model": "tiny", "dtype": str(dtype), "cases": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
