"""The demo end to end (marked slow: it prepares all of Shakespeare and trains for a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data, out = tmp_path / "data", tmp_path / "runs" / "demo"
    assert main(["demo", "--max-time", "8s", "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "bits/char" in text and "ROMEO:" in text and "lmforge generate" in text
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss_curve.png", "samples.txt"):
        assert (out / name).exists(), name
    # a second demo reuses the prepared data and picks a fresh run directory (runs/demo, then runs/demo-2)
    (tmp_path / "runs" / "demo").mkdir(exist_ok=True)
    assert main(["demo", "--max-time", "2s", "--data", str(data), "--no-progress"]) == 0
    assert "using prepared data" in capsys.readouterr().out
    assert (tmp_path / "runs" / "demo-2" / "model.safetensors").exists()
