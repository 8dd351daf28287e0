"""The machine a figure came from: CPU model, the flags that decide kernels, threads."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def describe_machine() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model.startswith(("unknown", "x86")):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"CPU: {model} [{' '.join(have) or 'no avx2'}], torch {torch.__version__}, {torch.get_num_threads()} threads"


def shared_data(name: str = "tinyshakespeare.txt") -> Path:
    """A benchmark text in the project's ../shared/data (found from any checkout or worktree depth)."""
    for p in Path(__file__).resolve().parents:
        if (p / "shared" / "data" / name).exists():
            return p / "shared" / "data" / name
    return Path("/work/shared/data") / name
