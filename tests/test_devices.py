"""The training protocol of the model families, and devices (--device; CUDA checks skip without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge import load
from lmforge.models import create_model
from lmforge.train import train

from .conftest import tiny_train_config

SRC = str(Path(__file__).resolve().parents[1] / "src")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": SRC})


@pytest.mark.parametrize("family", ["gpt", "lstm", "gru"])
def test_loss_protocol_counts_only_labelled_positions(family: str) -> None:
    """loss((inputs, labels)) is the mean cross-entropy over labels != -100 (prompt masks, padding), with
    their count; it agrees with the logits of the inference protocol."""
    torch.manual_seed(0)
    model = create_model(family, 40, "tiny" if family != "gpt" else "nano", n_layer=1, n_embd=16,
                         **({"n_head": 2, "block_size": 16} if family == "gpt" else {"hidden": 16, "block_size": 16}))
    model.eval()
    x = torch.randint(0, 40, (3, 12))
    labels = torch.randint(0, 40, (3, 12))
    labels[0, :5] = -100  # a masked prompt
    labels[2, 9:] = -100  # padding
    loss, n, state = model.loss((x, labels))
    logits, _ = model.forward_logits(x)
    want = F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1), ignore_index=-100)
    assert int(n) == 3 * 12 - 5 - 3
    torch.testing.assert_close(loss, want)
    assert (state is not None) == model.stateful
    empty, n0, _ = model.loss((x, torch.full_like(labels, -100)))
    assert int(n0) == 0 and float(empty.detach()) == 0.0  # no targets: adds nothing, not nan


def test_seq2seq_loss_protocol(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("seq2seq", 30, "tiny", source_vocab_size=20, n_embd=16, n_head=2, n_encoder_layer=1,
                         n_decoder_layer=1, label_smoothing=0.0)
    model.eval()
    inputs = {"src": torch.randint(0, 20, (2, 7)), "src_mask": torch.ones(2, 7, dtype=torch.bool),
              "tgt": torch.randint(0, 30, (2, 5))}
    labels = torch.randint(0, 30, (2, 5))
    labels[1, 3:] = -100
    loss, n, state = model.loss((inputs, labels))
    logits, _ = model(inputs)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 30), labels.reshape(-1), ignore_index=-100))
    assert int(n) == 8 and state is None


def test_device_cpu_and_missing_cuda_are_handled(trained_run: Path) -> None:
    r = cli("eval", str(trained_run), "--device", "cpu", "--max-tokens", "200")
    assert r.returncode == 0, r.stderr
    r = cli("generate", str(trained_run), "--device", "cpu", "--max-new-tokens", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    if not torch.cuda.is_available():
        r = cli("eval", str(trained_run), "--device", "cuda")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no CUDA GPU is visible" in r.stderr
    r = cli("eval", str(trained_run), "--device", "tpu")
    assert r.returncode == 2 and "unknown --device" in r.stderr


def test_fp16_with_a_gradient_scaler_trains_on_cpu(tmp_path: Path, char_data: Path) -> None:
    r = train(tiny_train_config(char_data, tmp_path / "r", dtype="fp16", max_steps=4))
    assert r.step == 4 and r.train_loss == r.train_loss  # finite, not nan


@CUDA
def test_train_on_cuda_and_load_on_cpu(tmp_path: Path, char_data: Path) -> None:
    r = train(tiny_train_config(char_data, tmp_path / "r", device="cuda", dtype="auto", max_steps=6))
    assert r.step == 6
    model = load(tmp_path / "r")  # the top-level weights are CPU tensors
    assert model.device.type == "cpu"
    resumed = train(tiny_train_config(char_data, tmp_path / "r", device="cpu", max_steps=8), resume=True)
    assert resumed.step == 8  # a checkpoint written on a GPU resumes on a CPU


@CUDA
def test_eval_and_generate_on_cuda(trained_run: Path) -> None:
    assert cli("eval", str(trained_run), "--device", "cuda", "--max-tokens", "200").returncode == 0
    assert cli("generate", str(trained_run), "--device", "cuda", "--max-new-tokens", "5").returncode == 0
