"""The attention prologue at Llama 4 shapes (40 query heads, 8 KV heads, head dim 128, bf16): what
it costs today, what the fused kernel costs, and both as a fraction of the attention they precede.

    python benchmarks/qk_prologue.py            # H100: decode batch 1/16, prefill 8k/32k (<= 30 s)
    python benchmarks/qk_prologue.py --quick    # CPU (Triton interpreter) or GPU: toy sizes

Two layer kinds, each at prefill (batch 1, S new tokens) and decode (one new token per sequence
over a cache of DECODE_CONTEXT keys, batch 1 and 16):
  rope   Scout's RoPE layers: RoPE + L2 qk-norm of q and k, then chunked attention (C = 8192);
  nope   the NoPE layers: q scaled by the position's temperature, then global causal attention.
Implementations, q/k as [B, S, H, D] views of the projection outputs, as the model has them:
  torch   today's chain on the torch backend: ops.rope(q), ops.rope(k), ops.rms_norm(q),
          ops.rms_norm(k) (rope), or the thin model's temperature code (nope);
  fused   ops.qk_prologue on the triton backend (one launch);
  q-side  the fused kernel on q alone (k with no heads): all that moving the Q side into the
          attention kernel's prologue could save, since K must be written roped into the KV
          cache anyway;
  attn    llama4_fast.kernels.chunked_attention, the call the prologue precedes.
Columns: median us of each; the fused kernel's TB/s over the bytes it must move (q and k read
and written once; q only on nope layers) and % of the measured HBM copy bandwidth; each
prologue as % of attention. On a GPU the decode rows are also timed as CUDA-graph replays
(`graph` columns): a captured decode step pays no launch overhead, so those are the kernels'
own times.

Answers: the reference is the torch chain on fp32 copies of the first input set. Ours (fused,
q-side) is checked first: past common.WRONG_REL_ERR it is recorded as a wrong answer instead of
a time, and the script exits 1 once every table and the JSON are out (as when ours raises,
attention included). The torch chain is checked too: past WRONG_REL_ERR it is flagged
(`disagrees` column, JSON) and still timed, and the exit status stays 0 (ours matched the
reference); tests/test_benchmarks.py fails on it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

if not torch.cuda.is_available():  # run the kernels through the interpreter, before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402
from llama4_fast import ops, registry  # noqa: E402
from llama4_fast.kernels import chunked_attention  # noqa: E402

HQ, HKV, HEAD_DIM, CHUNK = 40, 8, 128, 8192
THETA, EPS, FLOOR_SCALE, ATTN_SCALE = 5e5, 1e-5, 8192.0, 0.1  # Llama 4 Scout's config
DECODE_CONTEXT = 32768
FULL = dict(prefill=[8192, 32768], batches=[1, 16], context=DECODE_CONTEXT, heads=(HQ, HKV), head_dim=HEAD_DIM,
            chunk=CHUNK)
QUICK_GPU = dict(prefill=[2048, 8192], batches=[1, 16], context=8192, heads=(HQ, HKV), head_dim=HEAD_DIM,
                 chunk=CHUNK)
# CPU quick run: the same code at toy sizes (the interpreter runs ~1e5x slower than a GPU).
QUICK_CPU = dict(prefill=[40], batches=[1, 2], context=48, heads=(5, 1), head_dim=32, chunk=16)
LAYERS = ("rope", "nope")
OURS = ("fused", "q_side", "attn")  # our kernels; torch is the baseline


def rope_tables(positions: torch.Tensor, D: int):
    """cos, sin [1, S, D/2] float32, as the thin model builds them once per forward."""
    inv_freq = 1.0 / THETA ** (torch.arange(0, D, 2, dtype=torch.float32, device=positions.device) / D)
    freqs = positions.float()[:, None] * inv_freq[None]
    return torch.cos(freqs)[None], torch.sin(freqs)[None]


def torch_chain(layer, q, k, cos, sin, positions):
    """Today's code path (llama4_fast/model.py, Attention.forward) on the torch backend."""
    with registry.use("torch"):
        if layer == "rope":
            q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
            return ops.rms_norm(q, None, EPS), ops.rms_norm(k, None, EPS)
    pos = positions.float()
    scale = torch.log1p(torch.floor((pos + 1.0) / FLOOR_SCALE)) * ATTN_SCALE + 1.0
    return (q * scale[None, :, None, None]).to(q.dtype), k


def fused(layer, q, k, cos, sin, positions):
    with registry.use(qk_prologue="triton"):
        if layer == "rope":
            return ops.qk_prologue(q, k, cos=cos, sin=sin, qk_norm_eps=EPS)
        return ops.qk_prologue(q, k, positions=positions, temperature=(FLOOR_SCALE, ATTN_SCALE))


def q_side(layer, q, k, cos, sin, positions):
    return fused(layer, q, k[:, :, :0], cos, sin, positions)


def graph_us(fn, inputs) -> float | None:
    """Median us of fn replayed from CUDA graphs, one per rotating input set."""
    first = inputs()
    sets, graphs = [first], []
    while (s := inputs()) is not first:  # every set of the rotation once
        sets.append(s)
    for args in sets:
        fn(*args)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(*args)
        graphs.append(g)
    turn = itertools.cycle(graphs)
    return common.time_us(lambda: next(turn).replay())


def _failure(label: str, e: Exception) -> dict:
    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    print(f"  [{label}] failed: {msg}", flush=True)
    return {"error": msg}


def timed(label, fn, inputs, graph: bool, budget: common.Budget) -> dict:
    """{'us', 'graph_us'} of fn over the rotating input sets, or {'error'}: a failing or
    skipped implementation never stops the run."""
    if budget.exhausted():
        return {"error": "skipped: time budget"}
    try:
        entry = {"us": common.time_us(lambda: fn(*inputs()))}
        if graph:
            entry["graph_us"] = graph_us(fn, inputs)
        return entry
    except Exception as e:  # noqa: BLE001
        return _failure(label, e)


def answer(label, fn, probe, ref) -> dict:
    """{'rel_err'} of fn's (q, k) on the probe set against the fp32 reference `ref` (None when
    it failed), the larger of the two; ours (OURS) past WRONG_REL_ERR, or unchecked, gets an
    'error' (not timed), the torch chain a 'disagrees' flag (still timed)."""
    if ref is None:
        return {"error": "unchecked: the fp32 reference failed"}
    try:
        err = max(common.rel_err(a, b) for a, b in zip(fn(*probe), ref) if a.numel())  # q_side's k is empty
    except Exception as e:  # noqa: BLE001
        return _failure(label, e)
    if label in OURS:
        wrong = common.wrong_answer(err)
        return {"rel_err": err, **({"error": wrong} if wrong else {})}
    flag = common.disagreement(err, "the fp32 reference")
    return {"rel_err": err, **({"disagrees": flag} if flag else {})}


def bench_case(cfg, dtype, device, ceilings, budget, B: int, S: int, context: int, layer: str) -> dict:
    """One row: B sequences with S new tokens each, at positions context - S .. context - 1."""
    hq, hkv = cfg["heads"]
    D, size = cfg["head_dim"], dtype.itemsize
    chunk = cfg["chunk"] if layer == "rope" else None
    positions = torch.arange(context - S, context, device=device)
    cos, sin = rope_tables(positions, D)
    # Bytes the fused kernel must move: q (and k on rope layers) read once and written once.
    moved_q = 2 * B * S * hq * D * size
    moved = moved_q + (2 * B * S * hkv * D * size if layer == "rope" else 0)
    kv_bytes = 2 * B * hkv * context * D * size

    def make():
        # q/k as views of one projection output [B, S, (Hq + Hkv) D], k/v caches [B, Hkv, L, D].
        qk = torch.randn(B, S, (hq + hkv) * D, dtype=dtype, device=device)
        q = qk[..., :hq * D].unflatten(-1, (hq, D))
        k = qk[..., hq * D:].unflatten(-1, (hkv, D))
        k_cache = torch.randn(B, hkv, context, D, dtype=dtype, device=device)
        v_cache = torch.randn(B, hkv, context, D, dtype=dtype, device=device)
        return q, k, k_cache, v_cache

    inputs = common.rotating(make, moved + kv_bytes)

    def prologue(impl):
        return lambda q, k, k_cache, v_cache: impl(layer, q, k, cos, sin, positions)

    def attention(q, k, k_cache, v_cache):  # the queries are the last S of the context positions
        return chunked_attention(q.transpose(1, 2), k_cache, v_cache, chunk_size=chunk)

    graph = device == "cuda" and S == 1
    row = {"B": B, "S": S, "context": context, "layer": layer, "bytes": moved}
    probe = inputs()
    try:
        ref = torch_chain(layer, probe[0].float(), probe[1].float(), cos, sin, positions)
    except Exception as e:  # noqa: BLE001
        _failure("fp32 reference", e)
        ref = None
    impls = {"torch": prologue(torch_chain), "fused": prologue(fused), "q_side": prologue(q_side), "attn": attention}
    for name, fn in impls.items():
        # attention is checked by benchmarks/attention.py; a wrong prologue's speed means nothing
        check = {} if name == "attn" else answer(name, fn, probe, ref)
        row[name] = check if "error" in check else {**check, **timed(name, fn, inputs, graph, budget)}
    f = row["fused"]
    if "us" in f:
        f.update(common.roofline(f["us"], moved, 0.0, ceilings))
    for name in ("torch", "fused", "q_side"):
        for key in ("us", "graph_us"):
            if key in row[name] and key in row["attn"]:
                row[name][f"pct_of_attn{'_graph' if key == 'graph_us' else ''}"] = \
                    100 * row[name][key] / row["attn"][key]
    if "us" in row["torch"] and "us" in f:
        row["fused_speedup"] = row["torch"]["us"] / f["us"]
    return row


def case_name(row: dict) -> str:
    return f"prefill S={row['S']}" if row["S"] > 1 else f"decode B={row['B']} ctx={row['context']}"


def table(rows: list[dict], graph: bool) -> str:
    flat = []
    for r in rows:
        cell = {"case": case_name(r), "layer": r["layer"], "speedup": r.get("fused_speedup"),
                "disagrees": "torch" if "disagrees" in r["torch"] else None}
        for name in ("torch", *OURS):
            e = r[name]
            if "error" in e:
                cell[f"{name}_us"] = "error" if not e["error"].startswith("skipped") else None
            cell.update({f"{name}_{k}": v for k, v in e.items() if k != "error"})
        flat.append(cell)
    key = "graph_us" if graph else "us"
    pct = "pct_of_attn_graph" if graph else "pct_of_attn"
    columns = [("case", "case", ""), ("layer", "layer", ""),
               (f"torch_{key}", "torch us", ".1f"), (f"fused_{key}", "fused us", ".1f"),
               (f"q_side_{key}", "q-side us", ".1f"), (f"attn_{key}", "attention us", ".1f"),
               (f"torch_{pct}", "torch % attn", ".1f"), (f"fused_{pct}", "fused % attn", ".1f"),
               (f"q_side_{pct}", "q-side % attn", ".1f"), ("disagrees", "disagrees", "")]
    if not graph:
        columns[4:4] = [("fused_tbps", "fused TB/s", ".2f"), ("fused_pct_roofline", "% HBM", ".0f"),
                        ("speedup", "x vs torch", ".2f")]
    formatted = [{k: (format(c[k], f) if f and isinstance(c.get(k), (int, float)) else c.get(k)) for k, _, f in columns}
                 for c in flat]
    return common.markdown_table(formatted, [(k, h, "s" if f else "") for k, h, f in columns])


def verdict(rows: list[dict]) -> dict:
    """common.verdict of the run: an entry of ours failed, or the torch chain disagrees."""
    where = [(f"{case_name(r)} {r['layer']}", r) for r in rows]
    return common.verdict([(f"{case} {name}", r[name].get("error")) for case, r in where for name in OURS],
                          [(f"{case} torch", r["torch"].get("disagrees")) for case, r in where])


def main(argv=None):
    """Returns the exit status (common.exit_status): 1 when ours failed or gave a wrong answer."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes (CPU interpreter) / short GPU run")
    parser.add_argument("--budget-s", type=float, default=30.0,
                        help="wall-clock budget after start-up; cases past it are skipped (default 30)")
    args = parser.parse_args(argv)

    device = common.device()
    cfg = (QUICK_GPU if device == "cuda" else QUICK_CPU) if args.quick or device == "cpu" else FULL
    dtype = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter has no bf16
    budget = common.Budget(args.budget_s)
    torch.manual_seed(0)
    ceilings = common.measure_ceilings(quick=args.quick)
    # Decode first: cheapest, and where the prologue weighs most against attention.
    cases = [(B, 1, cfg["context"]) for B in cfg["batches"]] + [(1, S, S) for S in cfg["prefill"]]
    rows = []
    for (B, S, context), layer in itertools.product(cases, LAYERS):
        print(f"B={B} S={S} context={context} {layer}", flush=True)
        rows.append(bench_case(cfg, dtype, device, ceilings, budget, B, S, context, layer))
        if device == "cuda":
            torch.cuda.empty_cache()
    hq, hkv = cfg["heads"]
    print(f"\nqk prologue, {common.gpu_name()}, {str(dtype).replace('torch.', '')}, {hq} q / {hkv} kv heads, "
          f"head_dim {cfg['head_dim']}; rope = RoPE + qk-norm before chunked attention (C={cfg['chunk']}), "
          f"nope = temperature before global attention; HBM copy {ceilings['hbm_tbps']:.2f} TB/s")
    print(table(rows, graph=False))
    if device == "cuda":
        print("\ndecode as CUDA-graph replays (no launch overhead)")
        print(table([r for r in rows if r["S"] == 1], graph=True))
    path = common.write_results("qk_prologue", {"dtype": str(dtype), "config": cfg, "quick": bool(args.quick),
                                                "ceilings": ceilings, "cases": rows, "verdict": verdict(rows)})
    print(f"\nwrote {path}")
    return common.exit_status(verdict(rows))


if __name__ == "__main__":
    sys.exit(main())
