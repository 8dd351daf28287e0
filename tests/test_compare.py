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
        # the GPT is scored with a sliding window (half its context); the LSTM carries its state instead
        assert r["eval_stride"] == (run.context_length // 2 if name == "gpt-nano" else None)
    gpt = lmforge.load(out / "runs" / "gpt-nano")
    assert rows["gpt-nano"]["test_loss"] == pytest.approx(lmforge.evaluate(
        gpt, char_data, split="test", stride=gpt.context_length // 2)["loss"], rel=1e-6)
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
    assert "bad budget 'soon': not a time or a token count" in capsys.readouterr().err


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


def test_token_budget_compares_at_equal_data(tmp_path: Path, char_data: Path, capsys, monkeypatch) -> None:
    """--budget 20k: every neural model trains until it has seen >= 20,000 tokens (< one more step), the
    n-grams count the first 20,000 training tokens, and the report says so in words, per row and in the
    chart (validation loss against time and against tokens, on one y axis, n-grams as reference lines)."""
    from lmforge.data import TokenData
    from lmforge.viz import plots

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, png: (figures.append(fig), save(fig, png))[1])
    out = tmp_path / "report"
    args = ["compare", "--data", str(char_data), "--budget", "20k", "--models", "ngram:2", "lstm:tiny", "gpt:nano",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "budget: 20,000 training tokens per model"
    rep = json.loads((out / "compare.json").read_text())
    assert rep["budget"] == {"kind": "tokens", "amount": 20000, "text": "20,000 training tokens per model"}
    assert rep["budget_tokens"] == 20000 and rep["budget_seconds"] is None
    rows = {r["model"]: r for r in rep["models"]}
    n_train = len(TokenData(char_data).split("train"))
    assert rows["ngram-2"]["tokens_seen"] == min(20000, n_train) and rows["ngram-2"]["budget"] == "first 20,000 tok"
    for name in ("lstm-tiny", "gpt-nano"):
        run = out / "runs" / name
        logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        step_tokens = next(r["tokens"] for r in logs if r.get("step") == 1 and "loss" in r)
        r = rows[name]
        assert 20000 <= r["tokens_seen"] < 20000 + step_tokens and r["budget"] == "20,000 tok"
        assert r["val_curve_tokens"][-1][0] == r["tokens_seen"] and len(r["val_curve"]) == len(r["val_curve_tokens"])
    with open(out / "compare.csv") as f:
        assert [r["budget"] for r in csv.DictReader(f)] == ["first 20,000 tok", "20,000 tok", "20,000 tok"]
    table = (out / "table.txt").read_text()
    assert table.startswith("budget: 20,000 training tokens per model\n") and "the first N tokens" in table
    # the chart: bits/byte, then validation loss over time and over tokens sharing one y axis
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    bars, by_time, by_tokens = figures[-1].axes
    assert by_time.get_shared_y_axes().joined(by_time, by_tokens)
    assert (by_time.get_xlabel(), by_tokens.get_xlabel()) == ("training time (s)", "training tokens seen")
    for ax in (by_time, by_tokens):
        labels = ax.get_legend_handles_labels()[1]
        assert labels == ["lstm-tiny", "gpt-nano", "ngram-2 (test loss)"]
        assert any(t.get_text().startswith("ngram-2 ") for t in ax.texts)  # the reference line's label
    # the runs are reused only under the same budget: a time budget (or another token count) is refused
    for other in ("10s", "30k"):
        assert main([*args[:4], other, *args[5:], "--force"]) == 2
        err = capsys.readouterr().err.strip()
        assert "trained under another budget" in err and "\n" not in err
    assert main([*args, "--force"]) == 0
    assert "loading the existing run" in capsys.readouterr().out
    # Python: the same budget as text, or seconds as a number
    rows2 = lmforge.compare(char_data, "20k", ["ngram:2"], tmp_path / "py", progress=False)
    assert rows2[0]["tokens_seen"] == 20000
    rows3 = lmforge.compare(char_data, 1.0, ["ngram:2"], tmp_path / "py3", progress=False)
    assert rows3[0]["tokens_seen"] == n_train and rows3[0]["budget"] == "1 pass"
    assert json.loads((tmp_path / "py3" / "compare.json").read_text())["budget_seconds"] == 1.0


@pytest.mark.parametrize("text, kind, amount, words", [
    ("5m", "time", 300.0, "5 minutes of training per model"),
    ("300s", "time", 300.0, "5 minutes of training per model"),
    ("90s", "time", 90.0, "1.5 minutes of training per model"),
    ("1h", "time", 3600.0, "1 hour of training per model"),
    ("5 min", "time", 300.0, "5 minutes of training per model"),
    (300.0, "time", 300.0, "5 minutes of training per model"),
    ("5M", "tokens", 5_000_000, "5,000,000 training tokens per model"),
    ("5Mtok", "tokens", 5_000_000, "5,000,000 training tokens per model"),
    ("500k", "tokens", 500_000, "500,000 training tokens per model"),
    ("500K", "tokens", 500_000, "500,000 training tokens per model"),
    ("1.5M", "tokens", 1_500_000, "1,500,000 training tokens per model"),
    ("2G", "tokens", 2_000_000_000, "2,000,000,000 training tokens per model"),
    ("20000tok", "tokens", 20_000, "20,000 training tokens per model"),
    ("20000 tokens", "tokens", 20_000, "20,000 training tokens per model"),
])
def test_budget_grammar(text, kind, amount, words) -> None:
    from lmforge.apps.compare import Budget

    b = Budget.parse(text)
    assert (b.kind, b.amount, b.words()) == (kind, amount, words)


@pytest.mark.parametrize("text, message", [
    ("5x", "not a time or a token count"),
    ("-1M", "must be positive"),
    ("0", "give a unit"),
    ("2000000", "give a unit, 2000000s (seconds) or 2000000tok (tokens)"),
    ("0s", "must be positive"),
    ("0k", "must be positive"),
    ("nan", "not a time or a token count"),
    ("5mtok", "not a time or a token count"),
    ("1.5tok", "not a whole number of tokens"),
    ("99999999999G", "absurdly large"),
    ("9999999h", "more than a year"),
    (float("nan"), "positive finite number"),
    (-3.0, "positive finite number"),
])
def test_bad_budgets(text, message) -> None:
    from lmforge.apps.compare import Budget
    from lmforge.errors import LMForgeError

    with pytest.raises(LMForgeError, match="bad budget") as e:
        Budget.parse(text)
    assert message in str(e.value) and "\n" not in str(e.value)
