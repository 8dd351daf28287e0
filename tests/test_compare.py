from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

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
    for r in rows.values():
        assert r["train_seconds"] >= 3 and r["tokens_seen"] > 0 and r["parameters"] > 0
        assert 0 < r["bits_per_byte"] < 10 and r["gen_tokens_per_s"] > 0 and r["split"] == "test"
    with open(out / "compare.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # a second call loads the existing runs instead of training again
    assert main(args) == 0
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
