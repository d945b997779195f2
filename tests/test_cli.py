import subprocess
import sys

import pytest

from llama4_fast import cli

pytest.importorskip("transformers")


def test_demo_prints_identical_tokens(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a user's CPU machine: the torch backend
    assert cli.main(["demo", "--device", "cpu", "--new-tokens", "12", "--prompt-len", "40"]) == 0
    out = capsys.readouterr().out
    assert "| transformers + llama4_fast.patch |" in out
    assert "yes (12/12)" in out
    assert "| fused_moe |" in out and "max |logit difference|" in out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "llama4_fast.cli", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--model" in out.stdout


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--new-tokens", "0"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--prompt-len", "0"])
