"""Training survives interrupts and kills at any moment and resumes on exactly the uninterrupted trajectory;
run and data directories are locked; a run notices when its data was rewritten."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.data import PrepareConfig, prepare
from lmforge.errors import LMForgeError
from lmforge.train import Trainer, TrainingInterrupted, train

from .conftest import step_losses, tiny_train_config

SRC = str(Path(__file__).resolve().parents[1] / "src")
SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1)  # dropout: the RNG state matters



def assert_same_run(a: Path, b: Path) -> None:
    la, lb = step_losses(a), step_losses(b)
    assert la.keys() == lb.keys()
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-6, abs=1e-7), s
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, char_data: Path) -> Path:
    out = tmp_path_factory.mktemp("full") / "full"
    train(tiny_train_config(char_data, out, max_steps=16, checkpoint_interval=4, model_args=SHAPE))
    return out


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SIGINT", "SIGTERM"])
def test_interrupt_inside_the_forward_pass_resumes_exactly(tmp_path: Path, char_data: Path, full_run: Path,
                                                           how: str) -> None:
    """Ctrl-C or SIGTERM in the middle of a step (the batch drawn, the forward half done): the saved state is
    a step boundary, so the resumed run takes the same batches and dropout masks as the uninterrupted one."""
    part = tmp_path / "part"
    trainer = Trainer(tiny_train_config(char_data, part, max_steps=16, checkpoint_interval=4, model_args=SHAPE))
    block = trainer.model.blocks[1]
    orig = block.forward

    def forward(*args, **kw):  # the second block of the 11th step's forward pass
        if trainer.step == 10 and block.training and not getattr(trainer, "_hit", False):
            trainer._hit = True
            if how == "KeyboardInterrupt":
                raise KeyboardInterrupt  # as Python raises it without a handler
            os.kill(os.getpid(), getattr(signal, how))
        return orig(*args, **kw)

    block.forward = forward
    with pytest.raises(TrainingInterrupted, match="lmforge train --resume") as e:
        trainer.train()
    state = json.loads((part / "checkpoint" / "state.json").read_text())
    # A raw KeyboardInterrupt rolls step 11 back; a signal lets it finish and stops at the boundary.
    assert state["step"] == e.value.step == (10 if how == "KeyboardInterrupt" else 11)
    assert e.value.signum == (signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
    r = train(Trainer.config_for_resume(part, {}), resume=True)
    assert r.step == 16
    assert_same_run(full_run, part)


def test_death_during_the_first_save_leaves_no_run_directory(tmp_path: Path, char_data: Path) -> None:
    out = tmp_path / "run"
    trainer = Trainer(tiny_train_config(char_data, out, max_steps=4))

    def die() -> None:
        raise RuntimeError("the power went out")  # the process dies halfway through its first save

    trainer.save = die  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        trainer.train()
    assert not out.exists()  # absent, not half made: no "not a run directory" / "already exists" dead end
    leftovers = list(tmp_path.glob(".run.start-*"))
    assert leftovers  # the hidden start directory a SIGKILL would leave ...
    with pytest.raises(LMForgeError, match="cannot resume"):
        Trainer.config_for_resume(out, {})
    assert train(tiny_train_config(char_data, out, max_steps=4)).step == 4  # ... a new start just works
    assert not list(tmp_path.glob(".run.start-*"))  # and cleans it up


def test_a_run_directory_is_locked_while_it_trains(tmp_path: Path, char_data: Path) -> None:
    out = tmp_path / "run"
    train(tiny_train_config(char_data, out, max_steps=2))
    first = Trainer(Trainer.config_for_resume(out, {"max_steps": 4}), resume=True)  # holds the lock
    try:
        with pytest.raises(LMForgeError, match="in use by another lmforge process"):
            Trainer(Trainer.config_for_resume(out, {"max_steps": 4}), resume=True)
        with pytest.raises(LMForgeError, match="already exists"):
            Trainer(tiny_train_config(char_data, out, max_steps=4))
    finally:
        assert first.train().step == 4  # the first one finishes undisturbed, and lets go
    assert train(Trainer.config_for_resume(out, {"max_steps": 5}), resume=True).step == 5


def test_prepare_refuses_data_a_run_trains_on_and_resume_notices_rewritten_data(tmp_path: Path, corpus_dir: Path
                                                                                 ) -> None:
    data, out = tmp_path / "data", tmp_path / "run"
    pc = PrepareConfig(corpus=str(corpus_dir), out=str(data), tokenizer="char", val_frac=0.1, test_frac=0.1)
    prepare(pc, progress=False)
    trainer = Trainer(tiny_train_config(data, out, max_steps=2))
    try:
        with pytest.raises(LMForgeError, match="in use"):
            prepare(pc, progress=False)  # a run is training on it
    finally:
        trainer.train()
    assert json.loads((out / "data.json").read_text())["fingerprint"]
    prepare(PrepareConfig(corpus=str(corpus_dir), out=str(data), tokenizer="char", val_frac=0.2, test_frac=0.1),
            progress=False)  # rewritten with another split once the run is done
    with pytest.raises(LMForgeError, match="changed since"):
        Trainer(Trainer.config_for_resume(out, {"max_steps": 4}), resume=True)
    r = subprocess.run([sys.executable, "-m", "lmforge", "eval", str(out), "--max-tokens", "200"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=60)
    assert r.returncode == 0 and "changed since" in r.stderr  # eval warns loudly


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_random_kills_and_signals_resume_on_the_uninterrupted_trajectory(tmp_path: Path, char_data: Path) -> None:
    """SIGKILL, SIGINT and SIGTERM at random moments (start-up, the first save, mid-step, mid-checkpoint),
    each followed by a resume (or a fresh start when the run directory does not exist yet): the run ends
    on exactly the per-step losses and weights of a run that was never interrupted."""
    args = ["--data", str(char_data), "--preset", "nano", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
            "--block-size", "32", "--dropout", "0.1", "--batch-size", "4", "--max-steps", "400",
            "--checkpoint-interval", "7", "--eval-interval", "50", "--eval-iters", "2", "--log-interval", "1",
            "--warmup-steps", "3", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        if (out / "checkpoint").exists() or (out / "checkpoint.old").exists():
            return [sys.executable, "-m", "lmforge", "train", "--resume", str(out), "--no-progress"]
        return [sys.executable, "-m", "lmforge", "train", *args, "--out", str(out)]

    ref = tmp_path / "ref"
    t0 = time.time()
    r = subprocess.run(command(ref), env=env, capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-2000:]
    longest = min(4.0, 0.5 * (time.time() - t0))  # kill well inside a run, however fast this machine is
    run, rng, kills = tmp_path / "run", random.Random(1234), []
    t_start = time.time()
    for _ in range(9):
        proc = subprocess.Popen(command(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        delay = rng.uniform(0.3, longest)
        sig = rng.choice([signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -9, -15, -2, 130, 143), err[-2000:]
        # Ctrl-C while Python itself is still importing the package (torch) ends in Python's own
        # KeyboardInterrupt report, as for any Python program; lmforge's code has not run, nothing is written.
        startup = sig == signal.SIGINT and err.rstrip().endswith("KeyboardInterrupt") and "lmforge/cli" not in err \
            and "lmforge/train" not in err
        assert startup or ("Traceback" not in err and "internal error" not in err), (delay, sig, err[-3000:])
        kills.append((round(delay, 2), signal.Signals(sig).name, proc.returncode))
        if proc.returncode == 0:
            break
    while True:  # finish
        r = subprocess.run(command(run), env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (kills, r.stderr[-2000:])
        if "trained 400 steps" in r.stdout:
            break
    assert time.time() - t_start < 280, kills
    assert sum(1 for k in kills if k[2] != 0) >= 5, kills  # it really was interrupted, many times
    assert_same_run(ref, run)
