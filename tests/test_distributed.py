"""Training in several processes (torchrun, gloo on CPU): DDP and FSDP2 follow the one-process trajectory,
DCP checkpoints reshard between world sizes, signals stop every rank cleanly, only rank 0 writes.

Every run here is a real ``torchrun ... -m lmforge train`` with two one-thread processes and a timeout,
so a hang fails the test instead of stalling CI. Runs use a constant learning rate after warmup, so a
run stopped at step 10 and resumed to 20 has the same schedule as one run of 20 steps."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import step_losses

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT = 100  # seconds for one torchrun (two processes start, import torch, train a tiny model)
GPT = ["--model", "gpt", "--preset", "nano", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
       "--block-size", "32"]
LSTM = ["--model", "lstm", "--preset", "tiny", "--n-layer", "1", "--hidden", "32", "--n-embd", "16",
        "--block-size", "16"]
COMMON = ["--dropout", "0", "--dtype", "fp32", "--batch-size", "4", "--schedule", "constant", "--warmup-steps",
          "3", "--lr", "3e-3", "--eval-interval", "10", "--eval-iters", "4", "--log-interval", "1",
          "--no-progress"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC, "PYTHONUNBUFFERED": "1"}


def lmforge_train(nproc: int, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmforge", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lmforge", "train", *args]
    return run_group(cmd, timeout)


def run_group(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in its own session: on a timeout (or any error) the whole process group dies, torchrun's
    workers included (subprocess.run's timeout kills only the launcher and would orphan them)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the process group a test started (a no-op when all of it has exited)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)



def assert_same_trajectory(a: Path, b: Path, steps: range | None = None) -> None:
    la, lb = step_losses(a), step_losses(b)
    for s in steps or la:
        assert lb[s] == pytest.approx(la[s], rel=1e-6), f"step {s}: {la[s]} vs {lb[s]}"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7, msg=k)


def files(run: Path) -> set[str]:
    """The run's files; DCP's shard files are one per rank by design and are left out."""
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and not p.name.endswith(".distcp")}


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory, char_data: Path) -> dict[str, Path]:
    """One process, accumulation 2, 20 steps: the trajectory the multi-process runs must follow."""
    root = tmp_path_factory.mktemp("dist_ref")
    out = {}
    for name, shape in (("gpt", GPT), ("lstm", LSTM)):
        out[name] = root / name
        r = lmforge_train(1, "--data", str(char_data), "--out", str(out[name]), *shape, *COMMON, "--grad-accum", "2",
                          "--max-steps", "20")
        assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family", ["gpt", "lstm"])
def test_ddp_two_processes_match_one(tmp_path: Path, char_data: Path, ref: dict[str, Path], family: str) -> None:
    run = tmp_path / "ddp"
    shape = GPT if family == "gpt" else LSTM
    r = lmforge_train(2, "--data", str(char_data), "--out", str(run), *shape, *COMMON, "--max-steps", "20")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 8 sequences" in r.stdout and r.stdout.count("global batch") == 1  # rank 0 speaks
    assert r.stdout.count("trained 20 steps") == 1
    assert_same_trajectory(ref[family], run)
    # Only rank 0 writes: the same files as the one-process run (DCP shards aside).
    assert files(run) == files(ref[family])
    assert json.loads((run / "checkpoint" / "state.json").read_text())["global_batch"] == 8


@pytest.mark.timeout(180)
def test_fsdp_two_processes_match_one(tmp_path: Path, char_data: Path, ref: dict[str, Path]) -> None:
    run = tmp_path / "fsdp"
    r = lmforge_train(2, "--data", str(char_data), "--out", str(run), *GPT, *COMMON, "--max-steps", "20",
                      "--strategy", "fsdp", "--eval-iters", "3")  # odd: one rank pads its validation forwards
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_trajectory(ref["gpt"], run)
    assert files(run) == files(ref["gpt"])
    # The top-level model is whole (gathered from the shards) and loads on one CPU.
    from lmforge import load

    assert load(run).num_parameters() == load(ref["gpt"]).num_parameters()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_dcp_checkpoint_resumes_at_another_world_size(tmp_path: Path, char_data: Path, ref: dict[str, Path],
                                                      first: int, second: int) -> None:
    run = tmp_path / "run"
    r = lmforge_train(first, "--data", str(char_data), "--out", str(run), *GPT, *COMMON, "--max-steps", "10",
                      *(["--grad-accum", "2"] if first == 1 else []))
    assert r.returncode == 0, r.stderr[-3000:]
    r = lmforge_train(second, "--resume", str(run), "--max-steps", "20")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"x {second} process(es)" in r.stdout
    assert_same_trajectory(ref["gpt"], run, steps=range(1, 21))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, limit: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < limit:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if max(step_losses(run), default=0) >= step:
                return
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {limit}s")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["sigterm-rank1", "ctrl-c"])
def test_signal_on_any_rank_saves_once_and_exits(tmp_path: Path, char_data: Path, how: str) -> None:
    """SIGTERM to one rank of a torchrun job; Ctrl-C to `lmforge train --nproc 2` (the terminal signals the
    launcher's process group; the launcher hands the signal to the workers)."""
    run = tmp_path / "run"
    launch = ["torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lmforge", "train"] \
        if how != "ctrl-c" else ["lmforge", "train", "--nproc", "2"]
    cmd = [sys.executable, "-m", *launch, "--data", str(char_data), "--out", str(run), *GPT, *COMMON,
           "--max-steps", "100000", "--eval-interval", "100000"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(run, 3, proc)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            workers = sorted(_children(proc.pid))
            assert len(workers) == 2
            os.kill(workers[1], signal.SIGTERM)  # one rank only: a scheduler stopping one process
        out, err = proc.communicate(timeout=60)
    finally:
        kill_group(proc)  # also a worker the launcher left behind
    name = "SIGINT" if how == "ctrl-c" else "SIGTERM"
    assert err.count(f"lmforge: {name} at step") == 1, err[-2000:]  # rank 0 says it, once
    saved = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert f"{name} at step {saved};" in err
    assert max(step_losses(run)) == saved  # the checkpoint is the last step trained
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-2000:]
    # A saved stop is a clean exit for torchrun; the launcher reports the signal as one process would.
    assert proc.returncode == (130 if how == "ctrl-c" else 0)
    r = lmforge_train(1, "--resume", str(run), "--max-steps", str(saved + 2))
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("extra,message", [
    (["--global-batch", "12", *GPT], "does not divide among 2 process(es)"),
    (["--strategy", "fsdp", *LSTM], "--strategy fsdp shards Transformer blocks"),
    (["--backend", "nccl", *GPT], "--backend nccl needs CUDA devices"),
], ids=["global-batch", "fsdp-lstm", "nccl-on-cpu"])
def test_bad_setups_are_one_line_errors_on_rank_0(tmp_path: Path, char_data: Path, extra: list[str],
                                                   message: str) -> None:
    run = tmp_path / "run"
    r = run_group([sys.executable, "-m", "lmforge", "train", "--nproc", "2", "--data", str(char_data),
                   "--out", str(run), *COMMON, "--max-steps", "5", *extra], TIMEOUT)
    assert r.returncode == 2, (extra, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("lmforge: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr[-2000:]
    assert not run.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_nodes_rendezvous_on_localhost(tmp_path: Path, char_data: Path, ref: dict[str, Path]) -> None:
    """Two torchrun agents, one process each, meeting at a c10d rendezvous: the multi-node recipe."""
    run = tmp_path / "run"
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=lmforge-test", "-m", "lmforge", "train",
           "--data", str(char_data), "--out", str(run), *GPT, *COMMON, "--max-steps", "20"]
    nodes = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outs = [n.communicate(timeout=TIMEOUT) for n in nodes]
    finally:
        for n in nodes:
            kill_group(n)
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outs]
    assert sum(o[0].count("trained 20 steps") for o in outs) == 1
    assert_same_trajectory(ref["gpt"], run)
