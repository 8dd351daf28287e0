"""Where the benchmark texts are: ../shared/data beside the checkout (found from any checkout or worktree depth).
(The machine line printed with every figure is ``lmforge.utils.machine_summary``.)"""

from __future__ import annotations

from pathlib import Path


def shared_data(name: str = "tinyshakespeare.txt") -> Path:
    """A benchmark text in the project's ../shared/data."""
    for p in Path(__file__).resolve().parents:
        if (p / "shared" / "data" / name).exists():
            return p / "shared" / "data" / name
    return Path("/work/shared/data") / name
