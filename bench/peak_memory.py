"""Peak resident memory of the current process (Linux), shared by the bench scripts (standard library only, so
it also runs in the llama.cpp benchmark's own venv)."""

from __future__ import annotations


def reset_peak() -> None:
    """Reset VmHWM to the current RSS, so the next ``peak_mib`` measures what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib() -> float:
    """VmHWM (the peak resident set size) in MiB; nan where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
