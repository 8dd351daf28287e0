from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import load
from lmforge.data import TokenData
from lmforge.evaluate import evaluate


def test_metrics_are_consistent(trained_run: Path, char_data: Path) -> None:
    m = load(trained_run)
    r = evaluate(m, char_data, split="val")
    td = TokenData(char_data)
    n = len(td.split("val"))
    assert r["tokens"] == n - 1  # every token but the first is scored exactly once
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_char"] == pytest.approx(r["loss"] / math.log(2))
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) / td.bytes_per_token("val"))


def test_windows_score_the_same_as_a_manual_loop(trained_run: Path, char_data: Path) -> None:
    m = load(trained_run)
    td = TokenData(char_data)
    toks = torch.from_numpy(td.split("val").read(0, 200))
    ctx = m.context_length
    nll, n = 0.0, 0
    for s in range(0, 199, ctx):
        e = min(s + ctx, 199)
        a = max(0, e - ctx)  # the last, partial window is read with a full context before it
        logp, _ = m.score(toks[None, a:e], toks[None, a + 1:e + 1])
        nll -= logp[0, s - a:].sum().item()
        n += e - s
    r = evaluate(m, td, split="val", max_tokens=199)
    assert r["tokens"] == n and r["loss"] == pytest.approx(nll / n, rel=1e-5)


def test_sliding_window_gives_each_token_more_context(trained_run: Path, char_data: Path) -> None:
    m = load(trained_run)
    plain = evaluate(m, char_data, split="val", max_tokens=400)
    sliding = evaluate(m, char_data, split="val", max_tokens=400, stride=8)
    assert sliding["tokens"] == plain["tokens"]
    assert np.isfinite(sliding["loss"]) and sliding["loss"] <= plain["loss"] + 0.05


def test_facade_function_survives_the_subpackage_import(trained_run: Path, char_data: Path) -> None:
    import lmforge
    import lmforge.evaluate.seq2seq  # noqa: F401  (binds submodules of the `evaluate` room)

    assert callable(lmforge.evaluate)
    by_path = lmforge.evaluate(trained_run, char_data, split="val")
    assert by_path["loss"] == pytest.approx(evaluate(load(trained_run), char_data, split="val")["loss"])
    assert callable(lmforge.evaluate)  # still the function after a call
