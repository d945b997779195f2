"""Chunked flash attention (llama4_fast.kernels.chunked_attention) against torch baselines, at
Llama 4 head shapes (40 query heads, 8 KV heads, head dim 128, bf16, batch 1 prefill).

    python benchmarks/attention.py            # H100: prefill 8k/32k/128k, decode 8k..1M (~2.5 min)
    python benchmarks/attention.py --quick    # CPU (Triton interpreter) or GPU: toy sizes
    python benchmarks/attention.py --prefill 32768 --contexts 131072 --batches 1 --no-flex

Prefill, per sequence length, for a chunked layer (C = 8192, Llama 4's RoPE layers) and a
global causal layer (the NoPE layers):
  ours   the Triton kernel;
  ours_tma, ours_tma_n128  the same kernel in its unmeasured forward variants
         (kernels.attention.forward_variant): K/V tiles through TMA descriptors, with the
         table's 64-key tiles and with 128-key tiles; `tma` says whether the layout let TMA run.
  sdpa   torch scaled_dot_product_attention: is_causal with enable_gqa for the global layer
         (flash / cuDNN / efficient backends only); for the chunked layer a dense boolean
         S x S mask with K/V repeated to 40 heads (the efficient backend), skipped past 32k;
  flex   torch flex_attention, compiled once, with the block mask transformers builds
         (create_block_mask of the causal / chunked-causal mask_mod);
  sdpa_chunks  (chunked layer, S > C) the opt-in hand-over of llama4_fast/backends/sdpa.py
         (`chunked_prefill`): causal SDPA over the B * (S // C) whole chunks as one batch,
         plus one call for a partial last chunk (flash / cuDNN / efficient backends only).
         Its entry records the fused kernel torch ran on the chunks (`backend`) and the
         backend `ops.attention` takes with `sdpa.set_chunked_prefill(True)`
         (`ops_with_switch_on`): against ours in the same row, what decides that switch's
         default.
The table also says which fused kernel torch's SDPA ran for the global layer, and which backend
`ops.attention` takes for the case (llama4_fast/backends/sdpa.py hands plain causal prefill to
cuDNN where torch picks it).
TFLOP/s counts the visible work only: 4 * D * (visible (q, k) pairs) per head. % peak is
against the bf16 matmul rate measured in the same run (common.measure_ceilings).

Decode (one new token per sequence over a cache of 8k..1M keys, batch 1 and 16): TB/s over the
bytes that must move (K and V of the visible keys, q and out), % of the measured HBM copy
bandwidth. Baseline: sdpa over the whole cache (global) or the current chunk's slice (chunked).

Every case is wrapped: a baseline that fails prints an error row and the run goes on; cases
that would not fit memory or the time budget (--budget-s) print '-'.

Answers are checked on a subset of query rows (check_rows: the first and last rows, rows spread
between, and the rows around every chunk start), cheap at 128k. Ours is checked first, against
the fp32 definition (scores, mask, softmax) on those rows: a wrong answer is recorded instead
of a time, and the script exits 1 once every table and the JSON are out (as when ours raises).
Each baseline is checked against ours on the same rows: one past common.WRONG_REL_ERR is
flagged (`disagrees` column, JSON) and still timed, and the exit status stays 0 (ours matched
the definition, so the baseline is the suspect); tests/test_benchmarks.py fails on it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

if not torch.cuda.is_available():  # run the kernels through the interpreter, before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from common import Flex  # noqa: E402
from llama4_fast import registry  # noqa: E402
from llama4_fast.backends import sdpa as sdpa_backend  # noqa: E402
from llama4_fast.kernels import attention as attention_kernels  # noqa: E402
from llama4_fast.kernels import chunked_attention  # noqa: E402
from llama4_fast.kernels.device import tma_unavailable  # noqa: E402

HQ, HKV, HEAD_DIM, CHUNK = 40, 8, 128, 8192
FULL = dict(prefill=[8192, 32768, 131072], contexts=[8192, 32768, 131072, 1 << 20], batches=[1, 16],
            heads=(HQ, HKV), head_dim=HEAD_DIM, chunk=CHUNK)
# CPU quick run: the same code at toy sizes (the interpreter runs ~1e5x slower than a GPU).
QUICK_CPU = dict(prefill=[96, 160], contexts=[160, 1024], batches=[1, 2], heads=(5, 1), head_dim=32, chunk=64)
QUICK_GPU = dict(prefill=[2048, 8192], contexts=[8192, 32768], batches=[1, 16], heads=(HQ, HKV), head_dim=HEAD_DIM,
                 chunk=CHUNK)
SDPA_DENSE_MAX = 32768  # the dense bool mask is S^2 bytes (1 GiB at 32k, 16 GiB at 128k)
# Prefill variants of ours that no GPU run has measured yet (kernels.attention.forward_variant).
FORWARD_VARIANTS = {"ours_tma": dict(tma=True), "ours_tma_n128": dict(tma=True, block_n=128)}


def visible_pairs(S: int, chunk: int | None) -> int:
    """(query, key) pairs a causal (chunked) layer computes for one head of one sequence that
    starts at position 0 and has S queries over S keys."""
    if chunk is None:
        return S * (S + 1) // 2
    full, rest = divmod(S, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


def check_rows(Sq: int, S: int, chunk: int | None, edge: int = 16, spread: int = 64) -> torch.Tensor:
    """Indices of the query rows whose answers are checked, for Sq queries at the last Sq of S
    positions: the first and last `edge` rows, `spread` rows evenly between, and around every
    chunk start in range the rows before, at and after it (a wrong chunk bound changes only
    those rows' keys). A few hundred rows at most, so a 128k prefill checks cheaply."""
    first = S - Sq  # position of query row 0
    picks = [torch.arange(min(edge, Sq)), torch.arange(max(Sq - edge, 0), Sq),
             torch.linspace(0, Sq - 1, min(spread, Sq)).round().long()]
    if chunk:
        lo = -(-first // chunk) * chunk  # the first chunk start at or after row 0's position
        starts = torch.arange(lo, max(lo, S), chunk) - first  # rows at a chunk start
        picks += [starts - 1, starts, starts + 1]
    return torch.cat(picks).clamp(0, Sq - 1).unique()


@torch.no_grad()
def error_vs_math(out, q, k, v, chunk: int | None, rows: torch.Tensor | None = None, batches: int = 2) -> float:
    """||out - ref|| / ||ref|| over the query `rows` (default check_rows) of the first `batches`
    sequences, ref computed in fp32 from the definition (scores, causal/chunk mask, softmax), one
    KV head at a time: a check of ours that depends on no kernel it is compared with. The
    queries are the last Sq of the S keys, as in every case here. out, q: [B, Hq, Sq, D];
    k, v: [B, Hkv, S, D]."""
    B, hq, Sq, D = q.shape
    hkv, S = k.shape[1], k.shape[2]
    rows = (check_rows(Sq, S, chunk) if rows is None else rows).to(q.device)
    group = hq // hkv
    pos = (S - Sq + rows)[:, None]
    keys = torch.arange(S, device=q.device)[None]
    visible = (keys <= pos) & ((keys // chunk == pos // chunk) if chunk else True)  # [n, S]
    num = den = 0.0
    for b in range(min(B, batches)):
        for h in range(hkv):
            heads = slice(h * group, (h + 1) * group)
            qs = q[b, heads, rows].float()  # [group, n, D]
            kh, vh = k[b, h].float(), v[b, h].float()  # [S, D]
            scores = (qs @ kh.t() * D ** -0.5).masked_fill(~visible, float("-inf"))
            ref = torch.softmax(scores, dim=-1) @ vh
            num += (out[b, heads, rows].float() - ref).square().sum().item()
            den += ref.square().sum().item()
    return (num / max(den, 1e-30)) ** 0.5


class Answers:
    """The answer checks of one case, on the query rows `rows` (check_rows) of its probe set:
    ours against the fp32 definition (error_vs_math), each baseline against ours' answer."""

    def __init__(self, probe: tuple, chunk: int | None):
        self.probe, self.chunk = probe, chunk
        self.rows = check_rows(probe[0].shape[2], probe[1].shape[2], chunk).to(probe[0].device)
        self.ours_out = None  # ours' answer on the probe set, once it passed

    def ours(self, out) -> dict:
        """A wrong answer is an error: not timed, and the run fails."""
        err = error_vs_math(out, *self.probe, self.chunk, self.rows)
        wrong = common.wrong_answer(err)
        if wrong is None:
            self.ours_out = out
        return {"rel_err_vs_math": err, **({"error": wrong} if wrong else {})}

    def baseline(self, out) -> dict:
        """Past WRONG_REL_ERR from ours (from the definition when ours has no answer) a baseline
        is flagged ("disagrees") and still timed."""
        if self.ours_out is None:
            key, against = "rel_err_vs_math", "the fp32 definition"
            err = error_vs_math(out, *self.probe, self.chunk, self.rows)
        else:
            key, against = "rel_err_vs_ours", "ours"
            err = common.rel_err(out[:, :, self.rows], self.ours_out[:, :, self.rows])
        flag = common.disagreement(err, against)
        return {key: err, **({"disagrees": flag} if flag else {})}


def _failure(label: str, e: Exception) -> dict:
    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    print(f"  [{label}] failed: {msg}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"error": msg}


def run_case(label: str, fn, inputs, budget: common.Budget, probe: tuple, check) -> dict:
    """The entry of one implementation: the median us of fn(*inputs()) (rotating sets) with the
    fields of `check(fn(*probe))` (Answers.ours or .baseline), or an error once failed, out of
    budget, or wrong (a check that returns an error: not timed)."""
    if budget.exhausted():
        return {"error": "skipped: time budget"}
    try:
        entry = check(fn(*probe))
        if "error" in entry:
            return entry
        return {"us": common.time_us(lambda: fn(*inputs())), **entry}
    except Exception as e:  # noqa: BLE001 - a failing baseline must not stop the run
        return _failure(label, e)


def bench_prefill(cfg, dtype, device, ceilings, budget) -> list[dict]:
    """ours and sdpa per case; each row keeps what flex needs (`_pending`) for run_flex."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, hkv = cfg["heads"]
    D, rows = cfg["head_dim"], []
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    for S in cfg["prefill"]:
        for chunk in (cfg["chunk"], None):
            layer = "global" if chunk is None else f"chunked C={chunk}"
            print(f"prefill S={S} {layer}", flush=True)
            set_bytes = (2 * hq + 2 * hkv) * S * D * dtype.itemsize  # q, out, k, v: read/written once
            inputs = common.rotating(lambda: (torch.randn(1, hq, S, D, dtype=dtype, device=device),
                                              torch.randn(1, hkv, S, D, dtype=dtype, device=device),
                                              torch.randn(1, hkv, S, D, dtype=dtype, device=device)), set_bytes)

            def ours_fn(q, k, v, chunk=chunk):
                return chunked_attention(q, k, v, chunk_size=chunk)

            probe = inputs()
            answers = Answers(probe, chunk)
            ours = run_case("ours", ours_fn, inputs, budget, probe, answers.ours)
            if chunk is None:
                def sdpa(q, k, v):
                    with sdpa_kernel(fused) if device == "cuda" else contextlib.nullcontext():
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                base = run_case("sdpa", sdpa, inputs, budget, probe, answers.baseline)
                with sdpa_kernel(fused) if device == "cuda" else contextlib.nullcontext():
                    base["backend"] = sdpa_backend.torch_choice(*probe)  # which fused kernel that was
            elif S <= SDPA_DENSE_MAX:
                try:
                    base = run_case("sdpa", _dense_mask_sdpa(probe, S, chunk, hq // hkv, device), lambda: probe,
                                    budget, probe, answers.baseline)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory building the mask
                    base = _failure("sdpa", e)
            else:
                base = {"error": f"skipped: dense {S}x{S} mask"}
            baselines = {"sdpa": base}
            for name, variant in FORWARD_VARIANTS.items():
                def variant_fn(q, k, v, chunk=chunk, variant=variant):
                    with attention_kernels.forward_variant(**variant):
                        return chunked_attention(q, k, v, chunk_size=chunk)
                baselines[name] = run_case(name, variant_fn, inputs, budget, probe, answers.baseline)
                baselines[name]["tma"] = tma_unavailable(*probe[1:]) is None
            if chunk is not None:
                baselines["sdpa_chunks"] = chunk_handover(probe, inputs, chunk, budget, answers, fused, device)
            rows.append({"S": S, "layer": layer, "flops": 4 * D * visible_pairs(S, chunk) * hq, "bytes": set_bytes,
                         "op_backend": registry.select("attention", *probe, chunk_size=chunk).name,
                         "ours": ours, "baselines": baselines,
                         "_pending": (chunk, inputs, probe, answers)})
            _rates(rows[-1], ceilings)
    return rows


def chunk_handover(probe, inputs, chunk: int, budget, answers, fused, device) -> dict:
    """The entry of sdpa_chunks (module docstring) for one chunked prefill case: timed and
    checked against ours like any baseline, with the SDPA kernel torch picks for the
    whole-chunk call and the backend ops.attention takes with the switch on. A sequence of one
    chunk or less is the plain hand-over's case (the sdpa column), so it is skipped."""
    from torch.nn.attention import sdpa_kernel

    if probe[0].shape[2] <= chunk:
        return {"error": "skipped: one chunk (the plain hand-over, column sdpa)"}

    def restricted():
        return sdpa_kernel(fused) if device == "cuda" else contextlib.nullcontext()

    def sdpa_chunks(q, k, v):
        with restricted():
            return sdpa_backend.chunked_prefill(q, k, v, chunk)

    entry = run_case("sdpa_chunks", sdpa_chunks, inputs, budget, probe, answers.baseline)
    with restricted():
        entry["backend"] = sdpa_backend.chunks_choice(*probe, chunk)
    previous = sdpa_backend.set_chunked_prefill(True)
    try:
        entry["ops_with_switch_on"] = registry.select("attention", *probe, chunk_size=chunk).name
    finally:
        sdpa_backend.set_chunked_prefill(previous)
    return entry


# Seconds of budget a flex case needs before it starts: the first one compiles (tens of seconds).
FLEX_FIRST_S, FLEX_NEXT_S = 45.0, 8.0


def run_flex(rows: list[dict], flex: Flex, device, ceilings, budget) -> None:
    """flex_attention on the prefill cases, last: its compile time is the budget's unknown."""
    compiled = False
    for row in rows:
        chunk, inputs, probe, answers = row.pop("_pending")
        if budget.left() < (FLEX_NEXT_S if compiled else FLEX_FIRST_S):
            row["baselines"]["flex"] = {"error": "skipped: time budget"}
            continue
        if flex.why is None:
            try:
                mask = flex.block_mask(row["S"], chunk, device)
            except Exception as e:  # noqa: BLE001
                flex.why = "create_block_mask failed: " + _failure("flex", e)["error"]
        if flex.why is not None:
            row["baselines"]["flex"] = {"error": flex.why}
            continue
        print(f"flex S={row['S']} {row['layer']}", flush=True)
        entry = run_case("flex", lambda q, k, v: flex.attn(q, k, v, block_mask=mask, enable_gqa=True), inputs,
                         budget, probe, answers.baseline)
        row["baselines"]["flex"] = entry
        compiled = compiled or "us" in entry
        if not compiled and "error" in entry:  # it never worked: do not pay the compile again
            flex.why = entry["error"]
        del mask, inputs, probe, answers
        _rates(row, ceilings)


def _dense_mask_sdpa(probe, S, chunk, group, device):
    """sdpa with an explicit chunked-causal bool mask over the probe set's K/V repeated to the
    query heads (the efficient backend takes masks but not grouped KV), set up outside the
    timing. Timed on the probe set alone: at these sizes one set already exceeds L2."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pos = torch.arange(S, device=device)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] // chunk == pos[:, None] // chunk)
    kr, vr = probe[1].repeat_interleave(group, dim=1), probe[2].repeat_interleave(group, dim=1)
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

    def sdpa(q, k, v):
        with sdpa_kernel(backends) if device == "cuda" else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)

    return sdpa


def graph_case(fn, inputs) -> dict:
    """Median us of fn replayed from CUDA graphs, one per rotating input set: the kernels'
    own time, without the host launch overhead that dominates a single decode step."""
    try:
        first = inputs()
        sets, graphs = [first], []
        while (s := inputs()) is not first:  # every set of the rotation once
            sets.append(s)
        for q, k, v in sets:
            fn(q, k, v)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(q, k, v)
            graphs.append(g)
        turn = itertools.cycle(graphs)
        return {"us": common.time_us(lambda: next(turn).replay())}
    except Exception as e:  # noqa: BLE001
        return _failure("ours graph", e)


def bench_decode(cfg, dtype, device, ceilings, budget) -> list[dict]:
    hq, hkv = cfg["heads"]
    D, chunk_c, rows = cfg["head_dim"], cfg["chunk"], []
    for S in cfg["contexts"]:
        for B in cfg["batches"]:
            kv_bytes = 2 * B * hkv * S * D * dtype.itemsize
            for chunk in (chunk_c, None):
                layer = "global" if chunk is None else f"chunked C={chunk}"
                visible = S if chunk is None else S - (S - 1) // chunk * chunk  # the last query's keys
                moved = 2 * B * hkv * visible * D * dtype.itemsize + 2 * B * hq * D * dtype.itemsize
                row = {"context": S, "batch": B, "layer": layer, "bytes": moved,
                       "flops": 4 * D * visible * hq * B}
                free = torch.cuda.mem_get_info()[0] if device == "cuda" else 8 * 2**30
                if kv_bytes > 0.8 * free:
                    rows.append({**row, "ours": {"error": f"skipped: K/V need {kv_bytes / 2**30:.0f} GiB"},
                                 "baselines": {"sdpa": {"error": "skipped: memory"}}})
                    continue
                print(f"decode context={S} batch={B} {layer}", flush=True)
                inputs = common.rotating(lambda: (torch.randn(B, hq, 1, D, dtype=dtype, device=device),
                                                  torch.randn(B, hkv, S, D, dtype=dtype, device=device),
                                                  torch.randn(B, hkv, S, D, dtype=dtype, device=device)), kv_bytes)
                ours_fn = lambda q, k, v: chunked_attention(q, k, v, chunk_size=chunk)  # noqa: E731
                probe = inputs()
                answers = Answers(probe, chunk)
                ours = run_case("ours", ours_fn, inputs, budget, probe, answers.ours)
                lo = S - visible

                def sdpa(q, k, v):  # the query is the last position: it sees keys [lo, S) unmasked
                    return F.scaled_dot_product_attention(q, k[:, :, lo:], v[:, :, lo:], enable_gqa=True)

                base = run_case("sdpa", sdpa, inputs, budget, probe, answers.baseline)
                row.update(ours=ours, baselines={"sdpa": base})
                if device == "cuda" and "us" in ours:
                    row["ours_graph"] = graph_case(ours_fn, inputs)
                rows.append(row)
                _rates(row, ceilings)
                del inputs, probe, answers
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _rates(row: dict, ceilings: dict) -> None:
    """Fill TB/s, TFLOP/s and % of roofline / matmul peak / HBM for ours and each baseline."""
    for entry in [row["ours"], row.get("ours_graph", {}), *row["baselines"].values()]:
        if "us" in entry:
            entry.update(common.roofline(entry["us"], row["bytes"], row["flops"], ceilings))
            entry["pct_matmul_peak"] = 100 * entry["tflops"] / ceilings["matmul_tflops"]
            entry["pct_hbm"] = 100 * entry["tbps"] / ceilings["hbm_tbps"]
    for name, entry in row["baselines"].items():
        if "us" in entry and "us" in row["ours"]:
            entry["ours_speedup"] = entry["us"] / row["ours"]["us"]


def _table(rows: list[dict], keys: list[str], cols: list[tuple[str, str, str]]) -> str:
    """common.markdown_table over pre-formatted cells `<impl>_<field>`: a failed
    implementation shows 'error' in its us column, a skipped one '-'; `disagrees` names the
    baselines whose answer disagrees with ours."""
    flat = []
    for r in rows:
        f = {k: r[k] for k in keys}
        f["disagrees"] = ", ".join(name for name, e in r["baselines"].items() if "disagrees" in e) or None
        for name, e in [("ours", r["ours"]), ("ours_graph", r.get("ours_graph", {})), *r["baselines"].items()]:
            f.update({f"{name}_{field}": v for field, v in e.items()})
            if "error" in e and not e["error"].startswith("skipped"):
                f[f"{name}_us"] = "error"
        flat.append({key: (format(f[key], fmt) if fmt and isinstance(f.get(key), (int, float)) else f.get(key))
                     for key, _, fmt in cols})
    return common.markdown_table(flat, [(key, head, "s" if fmt else "") for key, head, fmt in cols])


def print_tables(prefill: list[dict], decode: list[dict], ceilings: dict, title: str) -> None:
    print(f"\n{title}; ceilings: {ceilings['hbm_tbps']:.2f} TB/s HBM copy, "
          f"{ceilings['matmul_tflops']:.0f} TFLOP/s {ceilings['matmul_dtype']} matmul")
    print("\nprefill (batch 1; TFLOP/s on visible (q, k) pairs; % of the measured matmul peak)")
    print(_table(prefill, ["S", "layer", "op_backend"], [
        ("S", "S", ""), ("layer", "layer", ""),
        ("ours_us", "ours us", ".0f"), ("ours_tflops", "ours TFLOP/s", ".0f"),
        ("ours_pct_matmul_peak", "% peak", ".0f"),
        ("sdpa_us", "sdpa us", ".0f"), ("sdpa_tflops", "sdpa TFLOP/s", ".0f"),
        ("flex_us", "flex us", ".0f"), ("flex_tflops", "flex TFLOP/s", ".0f"),
        ("ours_tma_us", "tma us", ".0f"), ("ours_tma_n128_us", "tma n128 us", ".0f"),
        ("sdpa_chunks_us", "sdpa_chunks us", ".0f"), ("sdpa_chunks_tflops", "sdpa_chunks TFLOP/s", ".0f"),
        ("sdpa_ours_speedup", "x vs sdpa", ".2f"), ("flex_ours_speedup", "x vs flex", ".2f"),
        ("sdpa_chunks_ours_speedup", "x vs sdpa_chunks", ".2f"),
        ("sdpa_backend", "sdpa ran", ""), ("sdpa_chunks_backend", "sdpa_chunks ran", ""),
        ("op_backend", "ops.attention uses", ""), ("sdpa_chunks_ops_with_switch_on", "with chunked switch on", ""),
        ("disagrees", "disagrees", "")]))
    print("\ndecode (1 new token per sequence; TB/s over K/V of the visible keys + q/out; % of the HBM roofline)")
    print(_table(decode, ["context", "batch", "layer"], [
        ("context", "context", ""), ("batch", "batch", ""), ("layer", "layer", ""),
        ("ours_us", "ours us", ".1f"), ("ours_tbps", "ours TB/s", ".2f"),
        ("ours_pct_roofline", "% roofline", ".0f"),
        ("ours_graph_us", "graph us", ".1f"), ("ours_graph_pct_roofline", "graph % roofline", ".0f"),
        ("sdpa_us", "sdpa us", ".1f"), ("sdpa_tbps", "sdpa TB/s", ".2f"),
        ("sdpa_ours_speedup", "x vs sdpa", ".2f"), ("disagrees", "disagrees", "")]))


def verdict(prefill: list[dict], decode: list[dict]) -> dict:
    """common.verdict of the run: ours (and its graph replays) failed, or a baseline disagrees."""
    ours, baselines = [], []
    for row in prefill + decode:
        case = f"prefill S={row['S']}" if "S" in row else f"decode context={row['context']} batch={row['batch']}"
        case += f" {row['layer']}"
        ours += [(f"{case} {name}", row[name].get("error")) for name in ("ours", "ours_graph") if name in row]
        baselines += [(f"{case} {name}", entry.get("disagrees")) for name, entry in row["baselines"].items()]
    return common.verdict(ours, baselines)


def main(argv=None):
    """Returns the exit status (common.exit_status): 1 when ours failed or gave a wrong answer."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes (CPU interpreter) / short GPU run")
    parser.add_argument("--budget-s", type=float, default=110.0,
                        help="wall-clock budget after start-up; cases past it are skipped (default 110, "
                             "so the whole run fits 2.5 minutes)")
    parser.add_argument("--no-flex", action="store_true", help="skip the flex_attention baseline")
    parser.add_argument("--prefill", type=int, nargs="+", help="prefill lengths (replace the preset's)")
    parser.add_argument("--contexts", type=int, nargs="+", help="decode cache lengths (replace the preset's)")
    parser.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (replace the preset's)")
    args = parser.parse_args(argv)

    device = common.device()
    cfg = dict((QUICK_GPU if device == "cuda" else QUICK_CPU) if args.quick or device == "cpu" else FULL)
    cfg.update({key: getattr(args, key) for key in ("prefill", "contexts", "batches") if getattr(args, key)})
    dtype = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter has no bf16 dot
    budget = common.Budget(args.budget_s)
    torch.manual_seed(0)
    ceilings = common.measure_ceilings(quick=args.quick)
    flex = Flex(device)
    if args.no_flex:
        flex.why = "skipped: --no-flex"
    elif flex.why:
        print(flex.why, flush=True)
    path = None

    def save(prefill, decode):  # after each phase: a run cut short by its time limit keeps the finished ones
        return common.rewrite_results("attention", {
            "dtype": str(dtype), "config": cfg, "quick": bool(args.quick), "ceilings": ceilings,
            "prefill": [{k: v for k, v in row.items() if k != "_pending"} for row in prefill], "decode": decode,
            "notes": [f"flex: {flex.why}"] if flex.why else [], "verdict": verdict(prefill, decode),
        }, path)

    prefill = bench_prefill(cfg, dtype, device, ceilings, budget)
    path = save(prefill, [])
    decode = bench_decode(cfg, dtype, device, ceilings, budget)
    path = save(prefill, decode)
    run_flex(prefill, flex, device, ceilings, budget)
    title = (f"attention, {common.gpu_name()}, {str(dtype).replace('torch.', '')}, "
             f"{cfg['heads'][0]} q / {cfg['heads'][1]} kv heads, head_dim {cfg['head_dim']}")
    print_tables(prefill, decode, ceilings, title)
    path = save(prefill, decode)
    print(f"\nwrote {path}")
    return common.exit_status(verdict(prefill, decode))


if __name__ == "__main__":
    sys.exit(main())
