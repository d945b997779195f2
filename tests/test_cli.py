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


@pytest.mark.parametrize("make, what", [
    (lambda d: d / "absent", "no such checkpoint directory"),
    (lambda d: d, "config.json: no such file"),
    (lambda d: (d / "config.json", (d / "config.json").write_text("{}"))[0],
     "is a file: pass the checkpoint directory"),
])
def test_a_bad_model_directory_is_one_line_of_usage_error(tmp_path, capsys, make, what):
    """--model used to hand a missing or empty directory to transformers, which printed a Hub
    traceback ("Repo id must be in the form ...")."""
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--model", str(make(tmp_path))])
    err = capsys.readouterr().err
    assert e.value.code == 2 and what in err and "Traceback" not in err and "Repo id" not in err


def test_a_prompt_without_a_tokenizer_is_a_warning(tmp_path, capsys, monkeypatch):
    from llama4_fast.tiny import tiny_hf_model

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tiny_hf_model(seed=1, hidden_size=128, intermediate_size=96, intermediate_size_mlp=192,
                  num_local_experts=4).save_pretrained(tmp_path)
    assert cli.main(["demo", "--model", str(tmp_path), "--prompt", "hello", "--new-tokens", "2",
                     "--prompt-len", "5"]) == 0
    captured = capsys.readouterr()
    assert "--prompt ignored: no tokenizer" in captured.err and "prompt: 5 tokens" in captured.out


def test_every_option_has_help():
    out = subprocess.run([sys.executable, "-m", "llama4_fast.cli", "demo", "--help"], capture_output=True, text=True)
    assert out.stdout.count("(default:") == 5  # every option with a default says it; --model says what it is
    assert "default: the built-in tiny random model" in out.stdout
