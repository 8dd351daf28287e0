"""Shared fixtures: tiny corpora, prepared data and a briefly trained run, all built offline."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from lmforge import kernels
from lmforge.data import PrepareConfig, prepare
from lmforge.train import TrainConfig, train

# A suite started as a background job of a non-interactive shell (`make test &`) inherits SIGINT ignored, and so
# would every process the tests start: Ctrl-C and SIGINT tests would see a program that cannot be interrupted.
# Restore Python's handler (a child's exec then resets it to the default).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_SHAKESPEARE = SHARED / "tinyshakespeare.txt"

FALLBACK_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
)


def sample_text(n_chars: int = 60_000) -> str:
    """Real English text: Tiny Shakespeare from ../shared/data when the checkout sits beside it, else the
    installed `shakespeare` package's plays (make setup installs it), else a repeated snippet."""
    if TINY_SHAKESPEARE.exists():
        return TINY_SHAKESPEARE.read_text(encoding="utf-8")[:n_chars]
    try:
        from lmforge.data.corpora import shakespeare_corpus

        text = "".join(d.text for d in shakespeare_corpus().documents[:3])
        start = text.find("ACT I")  # skip the Gutenberg header
        return text[max(start, 0):][:n_chars]
    except Exception:
        return (FALLBACK_TEXT * (n_chars // len(FALLBACK_TEXT) + 1))[:n_chars]


# No test run writes the user's ~/.cache (--dtype auto's probe cache, utils.probe_cache_path; lmforge's kernel
# build, lmforge/kernels): XDG_CACHE_HOME is a temporary directory from collection on -- test modules ask for the
# kernels as they are collected -- inherited by subprocesses (which then find the suite's one build), removed at exit.
_CACHE = tempfile.mkdtemp(prefix="lmforge-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _kernels_built() -> None:
    """lmforge's kernels are built once, before any test starts a subprocess that would otherwise build them
    itself (and say so on its terminal)."""
    kernels.available()


@pytest.fixture(autouse=True)
def _threads() -> None:
    # Tiny test models run best on one thread (and do not suffer when other work shares the cores).
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 12 small 'documents' cut from Shakespeare."""
    d = tmp_path_factory.mktemp("corpus")
    text = sample_text(60_000)
    step = len(text) // 12
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(text[i * step:(i + 1) * step], encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("data") / "char"
    prepare(PrepareConfig(corpus=str(corpus_dir), out=str(out), tokenizer="char", val_frac=0.1, test_frac=0.1),
            progress=False)
    return out


def tiny_train_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), preset="nano", batch_size=4, max_steps=12, eval_interval=6,
                eval_iters=2, log_interval=1, warmup_steps=3, lr=3e-3, progress=False,
                model_args=dict(n_layer=2, n_head=2, n_embd=32, block_size=32))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, char_data: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_train_config(char_data, out, max_steps=30))
    return out


def step_losses(run: Path) -> dict[int, float]:
    """The training loss of every logged step of a run (its metrics.jsonl), by step."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out
