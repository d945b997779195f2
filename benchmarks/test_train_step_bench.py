"""benchmarks/train_step.py --quick: the forward + backward step of a toy MoE layer and a toy
chunked attention layer runs on CPU (fp32, the ops' torch backend), writes its JSON with a row
per implementation, and checked every answer: ours against its reference, each baseline against
ours. A wrong answer of ours fails the run.

The quick run is a subprocess without TRITON_INTERPRET (which another benchmark test may have
set in this session) and without a GPU, as in a user's shell on a CPU machine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import WRONG_REL_ERR

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "train_step.py"
NOTHING_WRONG = {"failures": [], "disagreements": []}
MOE_GRADS = {"out", "dx", "dlogits", "dgate_up", "ddown", "expert_grad_norms"}
ATTENTION_GRADS = {"out", "dq", "dk", "dv"}


def _cpu_env(results) -> dict:
    env = dict(os.environ, LLAMA4_FAST_RESULTS=str(results), CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    return env


def _checked(entry: dict, against: str, keys: set) -> bool:
    return (entry["checked_against"] == against and set(entry["rel_err"]) == keys
            and entry["max_rel_err"] <= WRONG_REL_ERR and entry["ms"] > 0 and "disagrees" not in entry)


def _timed_or_unavailable(entry: dict, keys: set) -> bool:
    return entry.get("error", "").startswith("unavailable") or _checked(entry, "ours", keys)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=HERE.parent, env=_cpu_env(results),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = list(results.glob("train_step-*.json"))
    assert len(files) == 1, files
    return run.stdout, json.loads(files[0].read_text())


def test_moe_rows_are_checked(quick_run):
    stdout, payload = quick_run
    assert payload["bench"] == "train_step" and payload["environment"]["gpu"].startswith("cpu")
    assert "git_commit" in payload["environment"] and payload["verdict"] == NOTHING_WRONG
    rows = payload["moe"]
    assert [(r["shape"], r["T"]) for r in rows] == [("toy", 8), ("toy", 33)]
    for r in rows:
        entries = r["entries"]
        assert list(entries) == ["ours", "transformers", "grouped_mm"]
        assert entries["ours"]["backend"] == "torch" and entries["ours"]["vs_ours"] == 1.0
        assert _checked(entries["ours"], "the torch backend", MOE_GRADS)
        assert _checked(entries["transformers"], "ours", MOE_GRADS)  # transformers is a test dependency
        assert _timed_or_unavailable(entries["grouped_mm"], MOE_GRADS)
        assert r["flops"] == 3 * 2 * r["T"] * 3 * r["H"] * r["I"]
        for impl in entries:
            assert f"| toy | {r['T']} | {impl} |" in stdout
    assert "| n/a |" in stdout  # peak memory on CPU


def test_attention_rows_are_checked(quick_run):
    stdout, payload = quick_run
    (row,) = payload["attention"]
    assert (row["S"], row["chunk"], row["Hq"], row["Hkv"], row["D"]) == (64, 32, 4, 2, 16)
    assert row["flops"] == 3 * 4 * 16 * 4 * (2 * 32 * 33 // 2)  # two whole chunks, causal within each
    entries = row["entries"]
    assert list(entries) == ["ours", "sdpa", "flex"]
    assert _checked(entries["ours"], "the fp32 definition", ATTENTION_GRADS)
    assert _checked(entries["sdpa"], "ours", ATTENTION_GRADS)
    assert _timed_or_unavailable(entries["flex"], ATTENTION_GRADS)  # no flex backward on CPU
    for impl in entries:
        assert f"| 64 | 32 | {impl} |" in stdout


def test_a_wrong_answer_of_ours_fails_the_run(tmp_path, monkeypatch):
    """ours 10% off: no time recorded, the verdict lists it, exit status 1; the baselines are then
    checked against the reference."""
    import train_step

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("LLAMA4_FAST_RESULTS", str(tmp_path))
    monkeypatch.setattr(train_step, "ours_moe", lambda *args: 1.1 * train_step.reference_moe(*args))
    assert train_step.main(["--quick", "--layers", "moe", "--tokens", "8", "--budget-s", "30"]) == 1
    (path,) = tmp_path.glob("train_step-*.json")
    payload = json.loads(path.read_text())
    ours = payload["moe"][0]["entries"]["ours"]
    assert "WRONG ANSWER" in ours["error"] and "ms" not in ours
    assert payload["verdict"]["failures"] == [f"moe toy T=8 ours: {ours['error']}"]
    assert payload["moe"][0]["entries"]["transformers"]["checked_against"] == "the torch backend"
    assert payload["verdict"]["disagreements"] == []
