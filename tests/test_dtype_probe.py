"""--dtype auto: the measured fp32-vs-bf16 choice (utils.resolve_dtype), its per-machine cache, the LMFORGE_BF16
override, the one-line report, and the precision a training run records. Timings are monkeypatched: no test
here asserts anything about real speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge import utils
from lmforge.train import train
from lmforge.utils import BF16_MARGIN, probe_cache_path, resolve_dtype
from tests.conftest import tiny_train_config


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """A fresh process state, a private cache, and a fake measurement returning ``probe.speedup``; the
    measurements made are counted in ``probe.calls``."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LMFORGE_BF16", raising=False)
    for var in utils.ISA_CAPS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(utils, "_CHOICES", {})
    monkeypatch.setattr(utils, "_ANNOUNCED", set())

    class Fake:
        speedup = 2.0
        calls: list[str] = []

        def __call__(self, purpose: str) -> dict[str, float]:
            self.calls.append(purpose)
            return {"fp32_s": 0.01 * self.speedup, "bf16_s": 0.01, "speedup": self.speedup}

    fake = Fake()
    fake.calls = []
    monkeypatch.setattr(utils, "measure_bf16_speedup", fake)
    return fake


def forget_process_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if a new process started: only the on-disk cache remains."""
    monkeypatch.setattr(utils, "_CHOICES", {})
    monkeypatch.setattr(utils, "_ANNOUNCED", set())


@pytest.mark.parametrize("purpose", ["train", "decode"])
@pytest.mark.parametrize("speedup,expected", [(2.0, "bf16"), (BF16_MARGIN + 0.01, "bf16"),
                                              (BF16_MARGIN - 0.01, "fp32"), (0.5, "fp32")])
def test_probe_picks_bf16_only_past_the_margin(probe, purpose, speedup, expected):
    probe.speedup = speedup
    assert resolve_dtype("auto", purpose) == expected
    assert probe.calls == [purpose]
    assert resolve_dtype("fp32", purpose) == "fp32" and resolve_dtype("bf16", purpose) == "bf16"


def test_cache_is_written_reused_and_keyed_by_threads(probe, monkeypatch):
    threads = torch.get_num_threads()
    assert resolve_dtype("auto", "train") == "bf16"
    data = json.loads(probe_cache_path().read_text())
    (key,) = data["entries"]
    assert key.endswith(f"|{threads} threads") and utils.cpu_info()[0] in key
    assert data["entries"][key]["train"]["speedup"] == 2.0
    assert resolve_dtype("auto", "train") == "bf16"  # this process remembers
    forget_process_memo(monkeypatch)
    probe.speedup = 0.5  # a new measurement would say fp32: the cache must answer instead
    assert resolve_dtype("auto", "train") == "bf16"
    assert probe.calls == ["train"]
    assert resolve_dtype("auto", "decode") == "fp32"  # another purpose is measured on its own
    assert probe.calls == ["train", "decode"]
    torch.set_num_threads(threads + 1)  # another thread count is another machine, as far as speed goes
    try:
        assert resolve_dtype("auto", "train") == "fp32"
    finally:
        torch.set_num_threads(threads)
    assert probe.calls == ["train", "decode", "train"]
    assert len(json.loads(probe_cache_path().read_text())["entries"]) == 2


def test_an_instruction_set_cap_is_another_machine(probe, monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 (and the like) make bf16 matmuls emulated on an AVX-512 CPU: the cached answer of
    the uncapped CPU must not be reused."""
    assert resolve_dtype("auto", "train") == "bf16"
    forget_process_memo(monkeypatch)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    probe.speedup = 0.3
    assert resolve_dtype("auto", "train") == "fp32"
    assert probe.calls == ["train", "train"]
    keys = list(json.loads(probe_cache_path().read_text())["entries"])
    assert len(keys) == 2 and any(k.endswith("|ONEDNN_MAX_CPU_ISA=AVX2") for k in keys)


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "entries": {"x": 3}}', "[]", ""])
def test_corrupt_cache_is_measured_again(probe, content):
    path = probe_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert resolve_dtype("auto", "train") == "bf16"
    assert probe.calls == ["train"]
    assert json.loads(path.read_text())["version"] == utils.PROBE_VERSION  # repaired


def test_unwritable_cache_still_resolves(probe, monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache dir cannot be made under a file
    assert resolve_dtype("auto", "decode") == "bf16"
    assert "not cached" in capsys.readouterr().err


@pytest.mark.parametrize("env,expected", [("1", "bf16"), ("0", "fp32")])
def test_env_override_wins_and_is_reported(probe, monkeypatch, capsys, env, expected):
    probe.speedup = 0.5 if expected == "bf16" else 3.0  # the measurement would say the opposite
    monkeypatch.setenv("LMFORGE_BF16", env)
    assert resolve_dtype("auto", "train") == expected
    assert probe.calls == []
    assert f"LMFORGE_BF16={env}" in capsys.readouterr().err


def test_message_printed_once_per_process(probe, capsys):
    for _ in range(3):
        resolve_dtype("auto", "train")
    err = capsys.readouterr().err
    assert err.count("lmforge: --dtype auto -> bf16 for training") == 1
    assert "2.00x" in err and str(probe_cache_path()) in err
    resolve_dtype("auto", "decode")
    assert capsys.readouterr().err.count("for decoding") == 1


def test_probe_is_not_run_on_import_or_for_explicit_dtypes(probe, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "fresh")}
    code = "import lmforge.cli, lmforge.train.trainer, lmforge.generation.fast, lmforge.serve.service"
    # a few seconds normally; the margin is for a starved CI machine (importing torch + fastapi cold)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    assert not (tmp_path / "fresh").exists()
    resolve_dtype("fp32", "train")
    resolve_dtype("bf16", "decode")
    assert probe.calls == [] and not probe_cache_path().exists()


def test_real_probe_returns_positive_timings():
    for purpose in ("train", "decode"):
        r = utils.measure_bf16_speedup(purpose, rounds=3)
        assert r["fp32_s"] > 0 and r["bf16_s"] > 0 and r["speedup"] > 0


@pytest.mark.parametrize("speedup", [2.0, 0.5])
def test_training_with_auto_records_the_probes_choice(probe, char_data, tmp_path, speedup):
    probe.speedup = speedup
    out = tmp_path / "run"
    train(tiny_train_config(char_data, out, max_steps=2, eval_interval=2, dtype="auto"))
    start = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                 if '"start"' in line)
    assert start["precision"] == resolve_dtype("auto", "train") == ("bf16" if speedup > 1 else "fp32")
    assert start["config"]["dtype"] == "auto"
    assert probe.calls == ["train"]


def test_decoding_auto_lays_out_the_probes_choice(probe, trained_run, monkeypatch):
    from lmforge.generation.fast import prepare_for_decoding
    from lmforge.models import load_model

    assert prepare_for_decoding(load_model(trained_run), "auto").decode_dtype == "bf16"
    forget_process_memo(monkeypatch)
    probe_cache_path().unlink()
    probe.speedup = 0.5
    assert prepare_for_decoding(load_model(trained_run), "auto").decode_dtype == "fp32"
    assert probe.calls == ["decode", "decode"]
