"""``lmforge train --nproc N``: start the same command in N processes on this machine through torchrun.

Equivalent to ``torchrun --standalone --nproc-per-node N -m lmforge train ...`` (one node, a free
rendezvous port). torchrun runs in its own session, so Ctrl-C in the terminal reaches only this
launcher, which hands SIGINT (and SIGTERM) to the workers themselves: they stop at the next step
boundary, save once and exit, and torchrun ends without reporting failed workers. The launcher exits
with rank 0's exit code (130/143 after a signal, 2 after a one-line error).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import LMForgeError

EXIT_FILE = "LMFORGE_EXIT_FILE"  # where rank 0 leaves its exit code for the launcher


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's workers), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(stat.parent.name))
    return out


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    if nproc < 1:
        raise LMForgeError("--nproc must be at least 1")
    if "WORLD_SIZE" in os.environ:
        raise LMForgeError("--nproc starts torchrun itself; under torchrun, drop --nproc")
    with tempfile.TemporaryDirectory(prefix="lmforge-launch-") as tmp:
        exit_file = Path(tmp) / "rank0.exit"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lmforge", *strip_nproc(argv)]
        env = {**os.environ, EXIT_FILE: str(exit_file)}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)

        def forward(signum: int, frame: object) -> None:
            workers = children(proc.pid)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            if not workers:  # not started yet (or no /proc): the whole group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signum)

        old_int = signal.signal(signal.SIGINT, forward)
        old_term = signal.signal(signal.SIGTERM, forward)
        try:
            code = proc.wait()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        try:
            return int(exit_file.read_text())
        except (OSError, ValueError):
            return code
