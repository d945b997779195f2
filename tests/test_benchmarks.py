"""The benchmark scripts stay runnable: the GPU suite's CPU dry run (--quick: every benchmark at
toy sizes through the Triton interpreter) writes its result files, and the kernel benchmarks find
nothing wrong: ours passes its reference check and no baseline disagrees (benchmarks/common.py,
"answers")."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "run_gpu_suite.sh"
# The benchmarks that check answers: their JSON carries a "verdict" (common.verdict).
CHECKED = ("moe_dispatch", "moe_dispatch_fp8", "moe_dispatch_int4", "attention", "qk_prologue", "quant_matmul",
           "tune_moe")
NOTHING_WRONG = {"failures": [], "disagreements": []}


def _suite_env(tmp_path) -> dict:
    """The environment of a CPU dry run of the suite: results under tmp_path, the CPU path also
    on a GPU machine, and no TRITON_INTERPRET, as in a user's shell (the kernel benchmarks set
    it themselves; hf_patch would otherwise run the Triton kernels through the interpreter)."""
    env = dict(os.environ, PYTHON=sys.executable, LLAMA4_FAST_RESULTS=str(tmp_path / "results"),
               OUT=str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    return env


def _what_failed(run: subprocess.CompletedProcess) -> str:
    """The lines of a suite run that say what went wrong, then the end of its output."""
    flagged = [line for line in run.stdout.splitlines() if any(w in line for w in ("FAILED", "WRONG", "DISAGREES"))]
    return "\n".join(flagged) + "\n...\n" + run.stdout[-2000:] + run.stderr[-2000:]


def test_suite_script_parses():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


def test_quick_suite_writes_results(tmp_path):
    """Every step exits 0 (a kernel benchmark exits 1 when ours is wrong or raises) and writes its
    JSON; no kernel benchmark's verdict holds a failure or a baseline that disagrees (which the
    scripts report with exit status 0)."""
    run = subprocess.run(["bash", str(SUITE), "--quick"], cwd=ROOT, env=_suite_env(tmp_path), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, _what_failed(run)
    for bench in CHECKED + ("hf_patch", "e2e"):
        files = list((tmp_path / "results").glob(f"{bench}-*.json"))
        assert len(files) == 1, f"{bench}: {files}"
        payload = json.loads(files[0].read_text())
        assert payload["environment"]["torch"] and payload["bench"] == bench
        if bench in CHECKED:
            assert payload["verdict"] == NOTHING_WRONG, f"{bench}: {payload['verdict']}"
        assert list((tmp_path / "out").glob(f"{bench}-*.json")), f"{bench} result not copied to $OUT"
        if bench.startswith("moe_dispatch_"):  # ours on quantized experts vs the torch reference on the same
            row = payload["shapes"][0]["rows"][0]
            assert payload["weights"] == bench.split("_")[-1] and row["rel_err_vs_loop"] < 1e-2
        if bench == "quant_matmul":  # the FP8 activation quantization is also timed on its own
            assert all(row["fp8_act_quant_us"] > 0 for row in payload["shapes"][0]["rows"])
        if bench == "e2e":  # --depth full on the toy config: bf16 refused, INT4 and FP8 built quantized and run
            assert payload["verdict"] == NOTHING_WRONG, payload["verdict"]
            full = {res["weights"]: res for res in payload["full_depth"]}
            assert sorted(full) == ["bf16", "fp8", "int4"] and full["bf16"]["error"].startswith("skipped: bf16")
            for scheme in ("fp8", "int4"):
                res = full[scheme]
                assert abs(res["weights_over_plan"] - 1) < 1e-3 and res["check"]["rel_err_median"] < 1e-4, res
                assert [(c["case"], c["batch"]) for c in res["cases"]] == [("ttft", 1), ("decode", 1), ("decode", 2)]
                assert all("error" not in c and c["plan_gib"] > 0 for c in res["cases"]), res["cases"]
                assert all(c["decode_tok_s"] > 0 and c["x_floor"] > 0 for c in res["cases"][1:])
    assert "=== done, status 0" in (tmp_path / "out" / "gpu_suite.log").read_text()


def test_default_plan_runs_every_benchmark_within_one_lease():
    """The default GPU run (one device call): every benchmark and the GPU tests, the unmeasured
    ones first, under a suite deadline that keeps the call within 8 minutes; named steps run
    at full size without it."""
    run = subprocess.run(["bash", str(SUITE), "--plan"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    head, *lines = run.stdout.strip().splitlines()
    assert "suite deadline 470 s" in head and 470 < 8 * 60
    steps = [line.split()[0] for line in lines]
    assert steps == ["install", "gpu-info", "e2e", "quant_matmul", "moe_fp8", "moe_int4", "attention", "qk_prologue",
                     "gpu-tests", "train_step", "moe_hopper", "moe_dispatch", "hf_patch", "scaling"]
    named = subprocess.run(["bash", str(SUITE), "--plan", "attention"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60).stdout
    assert "deadline" not in named and "attention 115s: " in named and "--prefill" not in named


def test_suite_runs_only_the_named_steps(tmp_path):
    run = subprocess.run(["bash", str(SUITE), "--quick", "hf_patch"], cwd=ROOT, env=_suite_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, _what_failed(run)
    assert [p.name.split("-")[0] for p in (tmp_path / "results").glob("*.json")] == ["hf_patch"]


def test_scaling_quick_runs_one_and_two_ranks(tmp_path):
    """benchmarks/scaling.py --quick: the volume model, then the EP MoE layer at W = 1 and W = 2
    (torchrun, gloo), one result file with both world sizes."""
    env = dict(os.environ, LLAMA4_FAST_RESULTS=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| 8 | 17920 | 17920 | 2242 | 16.0 |" in run.stdout  # the volume model's TP8 vs EP8 row
    files = list(tmp_path.glob("scaling-*.json"))
    assert len(files) == 1, files
    payload = json.loads(files[0].read_text())
    cases = payload["cases"]
    assert sorted({c["world"] for c in cases}) == [1, 2]
    for c in cases:
        assert c["compute_us"] > 0 and c["comm_us"] > 0 and c["layer_us"] > 0
        assert (c["max_bytes_sent_per_rank"] > 0) == (c["world"] > 1)
    assert payload["volume_model"]["memory_8"][1]["format"] == "fp8"


def test_e2e_decode_floor_matches_the_published_moe_roofline():
    """benchmarks/e2e.py's decode floor against DESIGN.md's Maverick MoE layer roofline (top-1 +
    shared, bf16, 3.0 TB/s): T=1 168 us, T=8 738 us. The rest of the step (attention, the LM
    head, the dense layer) does not change with the batch at context 0, so the difference
    between batch 8 and 1 is the experts the extra tokens select: 570 us."""
    import importlib.util

    from llama4_fast import Llama4Config

    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "benchmarks" / "e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec.loader.exec_module(e2e)
    cfg = Llama4Config.from_hf(dict(e2e.MODELS["maverick"], model_type="llama4_text"))
    extra_us = (e2e.decode_floor_bytes(cfg, 8, 0) - e2e.decode_floor_bytes(cfg, 1, 0)) / 3.0e12 * 1e6
    assert abs(extra_us - (738 - 168)) < 5, extra_us
    int4 = (e2e.decode_floor_bytes(cfg, 8, 0, e2e.EXPERT_BYTES["int4"])
            - e2e.decode_floor_bytes(cfg, 1, 0, e2e.EXPERT_BYTES["int4"]))
    assert abs(int4 / 3.0e12 * 1e6 - 570 * (0.5 + 2 / 128) / 2) < 2  # routed experts at 4.125 bits


def test_wrong_answers_and_the_commit_are_recorded(monkeypatch):
    """A benchmark's answer past WRONG_REL_ERR (or NaN) gets an error instead of a time; result
    files name the commit from LLAMA4_FAST_COMMIT where git cannot (the GPU copy has no .git)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    assert common.wrong_answer(1e-3) is None
    assert "WRONG ANSWER" in common.wrong_answer(0.5) and "WRONG ANSWER" in common.wrong_answer(float("nan"))

    def no_git(*args, **kwargs):
        raise OSError("no git here")

    monkeypatch.setattr(common.subprocess, "run", no_git)
    monkeypatch.setenv("LLAMA4_FAST_COMMIT", "abc1234")
    assert common.environment()["git_commit"] == "abc1234"


def test_a_wrong_answer_fails_the_run_and_a_disagreeing_baseline_is_reported():
    """common.verdict / exit_status: ours wrong or raising exits 1, a skip does not; a baseline
    that disagrees is listed (and fails test_quick_suite_writes_results) with exit status 0."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    skipped = ("S=96 ours", "skipped: time budget")
    assert common.verdict([skipped, ("S=96 ours_graph", None)], [("S=96 sdpa", None)]) == NOTHING_WRONG
    assert common.exit_status(NOTHING_WRONG) == 0
    flag = common.disagreement(0.3, "ours")
    assert "DISAGREES" in flag and common.disagreement(1e-3, "ours") is None
    found = common.verdict([skipped], [("S=96 sdpa", flag)])
    assert found == {"failures": [], "disagreements": [f"S=96 sdpa: {flag}"]} and common.exit_status(found) == 0
    found = common.verdict([("S=96 ours", common.wrong_answer(0.3)), ("S=160 ours", "RuntimeError: boom")], [])
    assert len(found["failures"]) == 2 and common.exit_status(found) == 1
    assert "| sdpa, flex |" in common.markdown_table([{"d": {"sdpa": flag, "flex": flag}}], [("d", "d", "")])


def test_attention_answers_are_checked_at_every_chunk_start():
    """benchmarks/attention.py checks the first and last query rows and those around every chunk
    start; an answer wrong at one chunk start alone is a wrong answer of ours, and a baseline
    that differs from ours there is flagged. (fp32 torch stand-ins for the kernels.)"""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import attention

    rows = set(attention.check_rows(Sq=300, S=1000, chunk=64).tolist())  # queries at positions 700..999
    starts = [pos - 700 for pos in range(704, 1000, 64)]
    assert {0, 15, 284, 299} <= rows and all({s - 1, s, s + 1} <= rows for s in starts) and len(rows) < 150

    S, chunk = 48, 16
    q, k, v = torch.randn(1, 2, S, 8), torch.randn(1, 1, S, 8), torch.randn(1, 1, S, 8)
    pos = torch.arange(S)
    mask = (pos[None] <= pos[:, None]) & (pos[None] // chunk == pos[:, None] // chunk)
    right = F.scaled_dot_product_attention(q, k.expand(1, 2, S, 8), v.expand(1, 2, S, 8), attn_mask=mask)
    wrong = right.clone()
    wrong[:, :, 2 * chunk] = v[0, 0, :2 * chunk + 1].mean(0)  # the chunk start also sees the chunk before
    answers = attention.Answers((q, k, v), chunk)
    assert "error" not in answers.ours(right) and "disagrees" not in answers.baseline(right)
    assert "disagrees" in answers.baseline(wrong)
    assert "WRONG ANSWER" in attention.Answers((q, k, v), chunk).ours(wrong)["error"]
