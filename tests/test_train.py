from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

from lmforge import load
from lmforge.errors import LMForgeError
from lmforge.train import Trainer, TrainingInterrupted, train
from lmforge.train.schedule import learning_rate

from .conftest import step_losses, tiny_train_config


def test_run_directory_is_a_loadable_model(trained_run: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss_curve.png",
                 "train_config.yaml", "checkpoint/.metadata", "checkpoint/state.json"):
        assert (trained_run / name).exists(), name
    assert (trained_run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    m = load(trained_run)
    assert m.model_type == "gpt" and m.tokenizer is not None
    recs = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in recs)
    tr = step_losses(trained_run)
    assert tr[30] < tr[1]  # it learns


def test_resume_continues_the_same_trajectory(tmp_path: Path, char_data: Path) -> None:
    full = tmp_path / "full"
    # dropout > 0 so that the restored RNG state matters too
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1)
    train(tiny_train_config(char_data, full, max_steps=16, model_args=shape))
    part = tmp_path / "part"
    cfg = tiny_train_config(char_data, part, max_steps=16, checkpoint_interval=4, model_args=shape)
    trainer = Trainer(cfg)
    orig = trainer.train_step
    calls = {"n": 0}

    def crash_after_10(*args: int) -> tuple[float, int, int]:
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt  # Ctrl-C at the start of step 11
        return orig(*args)

    trainer.train_step = crash_after_10  # type: ignore[method-assign]
    with pytest.raises(TrainingInterrupted, match="lmforge train --resume"):
        trainer.train()
    state = json.loads((part / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10  # Ctrl-C saved a checkpoint at the last finished step
    r = train(Trainer.config_for_resume(part, {}), resume=True)
    assert r.step == 16
    a, b = step_losses(full), step_losses(part)
    assert set(a) == set(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    wa, wb = load(full).state_dict(), load(part).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-6)


def test_resume_from_old_checkpoint_after_crash_mid_swap(tmp_path: Path, char_data: Path) -> None:
    run = tmp_path / "r"
    train(tiny_train_config(char_data, run, max_steps=6))
    (run / "checkpoint").rename(run / "checkpoint.old")  # a crash between the two renames
    (run / "checkpoint.tmp").mkdir()  # and a half-written new one
    cfg = Trainer.config_for_resume(run, {"max_steps": 8})
    assert train(cfg, resume=True).step == 8


def test_corrupted_checkpoint_is_a_clear_error(tmp_path: Path, char_data: Path) -> None:
    run = tmp_path / "r"
    train(tiny_train_config(char_data, run, max_steps=4))
    w = run / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(LMForgeError, match="truncated or corrupted"):
        load(run)
    o = run / "checkpoint" / "__0_0.distcp"
    o.write_bytes(o.read_bytes()[:50])
    with pytest.raises(LMForgeError, match="truncated or corrupted"):
        Trainer(Trainer.config_for_resume(run, {"max_steps": 6}), resume=True)


def test_existing_run_is_not_overwritten(tmp_path: Path, char_data: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(LMForgeError, match="already exists"):
        Trainer(tiny_train_config(char_data, run))
    assert (run / "notes.txt").read_text() == "mine"


def test_block_size_larger_than_data(tmp_path: Path, char_data: Path) -> None:
    cfg = tiny_train_config(char_data, tmp_path / "r", model_args=dict(n_layer=1, n_head=1, n_embd=8,
                                                                       block_size=10 ** 6))
    with pytest.raises(LMForgeError, match="larger than the data"):
        Trainer(cfg)


def test_bf16_grad_accum_and_time_budget(tmp_path: Path, char_data: Path) -> None:
    r = train(tiny_train_config(char_data, tmp_path / "r", dtype="bf16", grad_accum=2, max_steps=None,
                                max_time=2.0, schedule="linear"))
    assert r.step >= 1 and r.train_time >= 2.0 and r.tokens_seen == r.step * 2 * 4 * 32


def test_schedule_shapes() -> None:
    assert learning_rate(0, 0.0, 1.0, 0.1, 10, "cosine") == pytest.approx(0.1)
    assert learning_rate(50, 0.5, 1.0, 0.1, 10, "cosine") == pytest.approx(0.55)
    assert learning_rate(99, 1.0, 1.0, 0.1, 10, "cosine") == pytest.approx(0.1)
    assert learning_rate(50, 0.5, 1.0, 0.1, 10, "linear", 0.2) == 1.0
    assert learning_rate(90, 0.9, 1.0, 0.1, 10, "linear", 0.2) == pytest.approx(0.55)


def test_no_budget_is_an_error(tmp_path: Path, char_data: Path) -> None:
    with pytest.raises(LMForgeError, match="budget"):
        Trainer(tiny_train_config(char_data, tmp_path / "r", max_steps=None))


@pytest.mark.slow
def test_torch_compile_option(tmp_path: Path, char_data: Path) -> None:
    """--compile runs the same model through torch.compile (inductor builds C++ kernels: slow to start)."""
    shape = dict(n_layer=1, n_head=2, n_embd=16, block_size=16)
    a = train(tiny_train_config(char_data, tmp_path / "a", max_steps=3, eval_interval=3, model_args=shape))
    b = train(tiny_train_config(char_data, tmp_path / "b", max_steps=3, eval_interval=3, model_args=shape,
                                compile=True))
    assert b.step == 3 and b.train_loss == pytest.approx(a.train_loss, rel=1e-3)


TINY_CLI = ["--preset", "nano", "--batch-size", "4", "--block-size", "32", "--n-layer", "2", "--n-head", "2",
            "--n-embd", "32", "--log-interval", "1", "--warmup-steps", "3", "--eval-interval", "6",
            "--eval-iters", "2", "--lr", "3e-3", "--no-progress"]


def _logged(run: Path, key: str) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r and "loss" in r}


def test_token_budget_stops_at_the_budget_and_the_schedule_ends_there(tmp_path: Path, char_data: Path) -> None:
    """`lmforge train --max-tokens`: training stops at the first step boundary with >= N target tokens
    seen, and the learning-rate schedule runs its course over the tokens as it does over steps."""
    from lmforge.cli import main

    step_tokens = 4 * 32  # batch x block: every window has block_size targets
    base = ["train", "--data", str(char_data), *TINY_CLI]
    assert main([*base, "--out", str(tmp_path / "tok"), "--max-tokens", f"{24 * step_tokens}tok"]) == 0
    assert main([*base, "--out", str(tmp_path / "steps"), "--max-steps", "24"]) == 0
    state = json.loads((tmp_path / "tok" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 24 and state["tokens_seen"] == 24 * step_tokens
    assert state["config"]["max_tokens"] == 24 * step_tokens and state["config"]["max_steps"] is None
    by_tokens, by_steps = _logged(tmp_path / "tok", "lr"), _logged(tmp_path / "steps", "lr")
    assert by_tokens == pytest.approx(by_steps)  # tokens/N == steps/24 here: the same schedule, step for step
    assert by_tokens[24] < 3e-3 * 0.1 + 0.01 * 3e-3 * 0.9  # decayed to (nearly) the floor at the budget's end
    # a budget that is not a whole number of steps: stop at >= N and < N + one step's tokens (the k suffix)
    assert main([*base, "--out", str(tmp_path / "k"), "--max-tokens", "3k"]) == 0
    state = json.loads((tmp_path / "k" / "checkpoint" / "state.json").read_text())
    assert 3000 <= state["tokens_seen"] < 3000 + step_tokens and state["tokens_seen"] == state["step"] * step_tokens


def test_a_budget_given_on_resume_replaces_the_saved_ones(trained_run: Path) -> None:
    cfg = Trainer.config_for_resume(trained_run, {"max_tokens": "5k"})
    assert (cfg.max_tokens, cfg.max_steps, cfg.max_time) == (5000, None, None)
    cfg = Trainer.config_for_resume(trained_run, {})
    assert (cfg.max_tokens, cfg.max_steps) == (None, 30)


RETAIN_PROBE = """
import ctypes, torch
from lmforge.utils import retain_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                              "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = retain_freed_memory()
assert retain_freed_memory() == applied  # once per process
x = torch.ones(16 * 2 ** 20)  # 64 MiB, like one step's activations
mapped = libc.mallinfo2().hblkhd  # bytes in mmapped blocks while it lives
del x
print(applied, mapped >> 20, libc.mallinfo2().fordblks >> 20)  # ... and free bytes kept in the heap after
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33), reason="glibc >= 2.33")
def test_retain_freed_memory_keeps_activation_memory_for_the_next_step() -> None:
    """Trainer processes keep freed tensor memory in malloc's heap for the next step to reuse, instead of glibc's
    default of mmapping each large tensor and unmapping it on free (every step faulted its activations in
    again); LMFORGE_RETAIN_MEMORY=0 keeps the default."""
    import subprocess

    def run(flag: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", RETAIN_PROBE], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "LMFORGE_RETAIN_MEMORY": flag}, check=True).stdout.split()

    applied, mapped, kept = run("1")
    assert applied == "True" and int(mapped) < 16 and int(kept) >= 64  # from the heap, and kept there
    applied, mapped, kept = run("0")
    assert applied == "False" and int(mapped) >= 64 and int(kept) < 16  # mmapped, and given back
