"""``lmforge train --nproc N``: start the same command in N processes on this machine through torchrun.

Equivalent to ``torchrun --standalone --nproc-per-node N -m lmforge train ...`` (one node, a free
rendezvous port). The launcher waits with Ctrl-C ignored (the terminal delivers it to every worker,
which stop at the next step boundary and save) and forwards SIGTERM to torchrun; it exits with rank
0's exit code, so a one-line error is still exit code 2.
"""

from __future__ import annotations

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
        proc = subprocess.Popen(cmd, env=env)
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, lambda s, f: proc.send_signal(signal.SIGTERM))
        try:
            code = proc.wait()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        try:
            return int(exit_file.read_text())
        except (OSError, ValueError):
            return code
