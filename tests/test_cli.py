"""End to end through the command line, and every bad input giving one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main


def run(*args: str) -> int:
    return main(list(args))


def test_full_path_through_the_cli(tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture) -> None:
    data, out = tmp_path / "data", tmp_path / "runs" / "shk"
    assert run("prepare", "--corpus", str(corpus_dir), "--tokenizer", "char", "--out", str(data),
               "--no-progress") == 0
    assert run("train", "--model", "gpt", "--data", str(data), "--preset", "nano", "--n-layer", "1",
               "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "4", "--out", str(out),
               "--max-steps", "6", "--eval-interval", "3", "--eval-iters", "2", "--no-progress") == 0
    assert run("train", "--resume", str(out), "--max-steps", "9", "--no-progress") == 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 9
    capsys.readouterr()
    assert run("eval", str(out), "--split", "test", "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "test" and res["bits_per_byte"] > 0 and res["perplexity"] > 1
    assert run("generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0.8",
               "--top-k", "50", "--top-p", "0.95", "--seed", "1", "--num-return-sequences", "2") == 0
    text = capsys.readouterr().out
    assert text.count("ROMEO:") == 2 and "sample 2" in text
    assert run("generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "10", "--stream", "--seed",
               "1") == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_config_yaml(tmp_path: Path, char_data: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {char_data}\npreset: nano\nbatch_size: 2\nmax_steps: 2\neval_interval: 2\n"
                   "eval_iters: 1\nmodel_args: {n_layer: 1, n_embd: 16, n_head: 2, block_size: 16}\n")
    assert run("train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--no-progress") == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["n_embd"] == 16


@pytest.mark.parametrize("args, message", [
    (["prepare", "--corpus", "nosuch", "--out", "{tmp}/o"], "unknown corpus"),
    (["prepare", "--corpus", "{tmp}/missing.txt", "--out", "{tmp}/o"], "does not exist"),
    (["prepare", "--corpus", "{tmp}/empty.txt", "--out", "{tmp}/o"], "is empty"),
    (["prepare", "--corpus", "{corpus}", "--tokenizer", "bpe", "--vocab-size", "50", "--out", "{tmp}/o"],
     "too small"),
    (["train", "--data", "{tmp}/nodata", "--out", "{tmp}/r", "--max-steps", "1"], "does not exist"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", "--max-steps", "1", "--block-size", "100000000"],
     "larger than the data"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", "--max-time", "five minutes"], "cannot parse duration"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", "--max-steps", "1", "--preset", "huge"],
     "unknown gpt preset"),
    (["train", "--resume", "{tmp}"], "not a run directory"),
    (["eval", "{tmp}"], "not a run directory"),
    (["generate", "{tmp}/nothing"], "does not exist"),
    (["generate", "{corpus}", "--prompt", "x"], "not a run directory"),
])
def test_bad_input_one_line_exit_2(tmp_path: Path, corpus_dir: Path, char_data: Path,
                                   capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    (tmp_path / "empty.txt").write_text("")
    args = [a.format(tmp=tmp_path, corpus=corpus_dir, data=char_data) for a in args]
    capsys.readouterr()
    assert run(*args, *(["--no-progress"] if args[0] in ("prepare", "train") else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error: ") and message in err and "\n" not in err
    assert "Traceback" not in err


def test_corrupted_checkpoint_cli(tmp_path: Path, trained_run: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run, run_dir)
    w = run_dir / "model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    capsys.readouterr()
    assert run("generate", str(run_dir), "--prompt", "x", "--max-new-tokens", "2") == 2
    err = capsys.readouterr().err
    assert "truncated or corrupted" in err and err.count("\n") == 1


def test_console_script_runs() -> None:
    exe = Path(sys.executable).parent / "lmforge"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("lmforge ")
