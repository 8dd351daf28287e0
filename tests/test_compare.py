from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import lmforge
from lmforge.cli import main


def test_compare_trains_evaluates_and_reports(tmp_path: Path, char_data: Path, capsys) -> None:
    out = tmp_path / "report"
    args = ["compare", "--data", str(char_data), "--budget", "3s", "--models", "lstm:tiny", "gpt:nano",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "bits/byte" in text and "lstm-tiny" in text and "gpt-nano" in text
    rep = json.loads((out / "compare.json").read_text())
    rows = {r["model"]: r for r in rep["models"]}
    assert set(rows) == {"lstm-tiny", "gpt-nano"}
    for name, r in rows.items():
        run = lmforge.load(out / "runs" / name)
        state = json.loads((out / "runs" / name / "checkpoint" / "state.json").read_text())
        assert r["parameters"] == run.num_parameters() and r["tokens_seen"] == state["tokens_seen"]
        assert r["train_seconds"] >= 3
        assert 0 < r["bits_per_byte"] < 10 and r["gen_tokens_per_s"] > 0 and r["split"] == "test"
    with open(out / "compare.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # a second call loads the existing runs instead of training again; replacing the report takes --force
    assert main(args) == 2
    assert "already holds a comparison report" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert "loading the existing run" in capsys.readouterr().out


@pytest.mark.parametrize("models, message", [
    (["transformerxl:big"], "unknown model family"),
    (["lstm:huge"], "unknown lstm preset"),
    (["gpt:tiny", "ngram:x"], "give the n-gram order"),
])
def test_bad_model_specs_fail_before_training(tmp_path: Path, char_data: Path, capsys, models, message) -> None:
    assert main(["compare", "--data", str(char_data), "--models", *models, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and not (tmp_path / "r").exists()


def test_bad_budget(tmp_path: Path, char_data: Path, capsys) -> None:
    assert main(["compare", "--data", str(char_data), "--budget", "soon", "--models", "gpt:tiny",
                 "--out", str(tmp_path / "r")]) == 2
    assert "cannot parse duration" in capsys.readouterr().err


def test_data_a_family_cannot_use_fails_before_training(tmp_path: Path, char_data: Path, corpus_dir: Path,
                                                        capsys) -> None:
    from lmforge.data import PrepareConfig, prepare
    from lmforge.data.parallel import prepare_parallel

    # parallel (seq2seq) data for language models, and a seq2seq family in a language-model comparison
    tsv = tmp_path / "p.tsv"
    tsv.write_text("".join(f"a b {i}\tc d {i}\n" for i in range(30)), encoding="utf-8")
    prepare_parallel(str(tsv), tmp_path / "par", tokenizer="char", progress=False)
    assert main(["compare", "--data", str(tmp_path / "par"), "--models", "gpt:tiny", "--out",
                 str(tmp_path / "r")]) == 2
    assert "parallel" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["compare", "--data", str(char_data), "--models", "seq2seq:small", "--out", str(tmp_path / "r")]) == 2
    assert "seq2seq models learn from (source, target) pairs" in capsys.readouterr().err
    # an existing run made with another tokenizer is not silently reused
    bpe = tmp_path / "bpe"
    prepare(PrepareConfig(corpus=str(corpus_dir), out=str(bpe), tokenizer="bpe", vocab_size=300), progress=False)
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(char_data), "--budget", "1s", "--models", "ngram:2", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", "--data", str(bpe), "--budget", "1s", "--models", "ngram:2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "another tokenizer" in err and "\n" not in err
