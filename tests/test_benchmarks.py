"""The benchmark scripts stay runnable: the GPU suite's CPU dry run (--quick: every benchmark at
toy sizes through the Triton interpreter) writes its result files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "run_gpu_suite.sh"


def test_suite_script_parses():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


def test_quick_suite_writes_results(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, LLAMA4_FAST_RESULTS=str(tmp_path / "results"), OUT=str(tmp_path / "out"),
               CUDA_VISIBLE_DEVICES="")  # the dry run is the CPU path, also on a GPU machine
    env.pop("TRITON_INTERPRET", None)  # as a user's shell: the kernel benchmarks set it themselves
    run = subprocess.run(["bash", str(SUITE), "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for bench in ("moe_dispatch", "attention", "hf_patch", "quant_matmul"):
        files = list((tmp_path / "results").glob(f"{bench}-*.json"))
        assert len(files) == 1, f"{bench}: {files}"
        payload = json.loads(files[0].read_text())
        assert payload["environment"]["torch"] and payload["bench"] == bench
        assert list((tmp_path / "out").glob(f"{bench}-*.json")), f"{bench} result not copied to $OUT"
    assert "=== done, status 0" in (tmp_path / "out" / "gpu_suite.log").read_text()


@pytest.mark.parametrize("weights", ["fp8", "int4"])
def test_moe_dispatch_with_quantized_experts_dry_run(tmp_path, weights):
    env = dict(os.environ, LLAMA4_FAST_RESULTS=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "benchmarks/moe_dispatch.py", "--quick", "--weights", weights, "--no-shared",
                          "--tokens", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [path] = tmp_path.glob(f"moe_dispatch_{weights}-*.json")
    payload = json.loads(path.read_text())
    assert payload["weights"] == weights
    row = payload["shapes"][0]["rows"][0]
    assert row["rel_err_vs_loop"] < 1e-2  # ours against the torch reference on the same quantized experts
