"""Small shared helpers: atomic file writes, duration parsing, human-readable numbers."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import LMForgeError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write a file atomically: ``write(tmp_path)`` fills a temporary file beside ``path``,
    which is fsynced and then renamed over ``path``. A crash leaves either the old file or the
    new one, never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class DirectoryLock:
    """An advisory lock (``flock``) on a directory itself: no lock file to leave behind, released by the
    kernel when the process ends however it ends (SIGKILL included). Exclusive for a writer (a run
    being trained, ``prepare`` rewriting data), shared for readers (a run training on its data)."""

    def __init__(self, path: str | Path, shared: bool = False, busy: str = "") -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise LMForgeError(busy or f"{self.path} is in use by another lmforge process; wait for it to "
                               "finish or stop it") from None

    @staticmethod
    def is_held(path: str | Path) -> bool:
        """Whether another process holds a lock on ``path`` (without keeping one)."""
        try:
            DirectoryLock(path).release()
            return False
        except LMForgeError:
            return True

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it in at the end: an interrupted build
    leaves the old directory (or none), never a half-written one; a failed build leaves no trace.
    An existing ``out`` is locked while it is rebuilt: a run training on it makes this refuse."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(out, busy=f"{out} is in use (a run is training on it, or another prepare is "
                         "writing it); wait for it to finish or choose another --out") if out.is_dir() else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def check_output_file(path: str | Path, force: bool = False, option: str = "--output") -> Path:
    """An output file lmforge is about to write: never a directory, and never an existing file unless the
    user said ``--force`` (a report or a translation the user kept is not replaced silently)."""
    path = Path(path)
    if path.is_dir():
        raise LMForgeError(f"{option} {path} is a directory; give a file name")
    if path.exists() and not force:
        raise LMForgeError(f"{path} already exists; pass --force to replace it, or choose another {option}")
    if path.parent.exists() and not path.parent.is_dir():
        raise LMForgeError(f"{option} {path}: {path.parent} is a file, not a directory")
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, _w)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise LMForgeError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(f"{what} {path} is corrupted ({e}); restore or recreate it") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log (``metrics.jsonl``); a line torn by a crash is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # damaged bytes: line dropped
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def refuse_nonempty(out: str | Path, hint: str = "choose another --out") -> Path:
    """An output directory must not exist or be empty: the files in it are someone's."""
    out = refuse_file(out)
    if out.is_dir() and any(out.iterdir()):
        raise LMForgeError(f"{out} already exists; {hint}")
    return out


def refuse_file(out: str | Path, option: str = "--out") -> Path:
    """An output directory must not be an existing file, nor lie below one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"{option} {out} is an existing file, not a directory; choose another {option}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LMForgeError(f"{option} {out}: {parent} is a file, not a directory")
            break
    return out


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(ms|s|sec|m|min|h|hr|d)?\s*$")
_UNIT_SECONDS = {None: 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "m": 60.0, "min": 60.0,
                 "h": 3600.0, "hr": 3600.0, "d": 86400.0}


def parse_duration(text: str | float | int | None) -> float | None:
    """Parse '5m', '90s', '1.5h', '300' (seconds) into seconds. A capital M is refused: it means
    million in token counts (``5M`` tokens), and silently reading it as minutes would mislead."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    if re.search(r"\d\s*M(?![iI][nN])", text):
        raise LMForgeError(f"cannot parse duration {text!r}: capital M means million (tokens); write minutes as "
                           "a lowercase m or min, e.g. 5m")
    total = 0.0
    parts = re.findall(r"\d+(?:\.\d*)?\s*[a-z]*", text.strip().lower())
    if not parts or "".join(p.replace(" ", "") for p in parts) != text.strip().lower().replace(" ", ""):
        raise LMForgeError(f"cannot parse duration {text!r}; use e.g. 90s, 5m, 1h30m")
    for p in parts:
        m = _DURATION.match(p)
        if not m or m.group(2) not in _UNIT_SECONDS:
            raise LMForgeError(f"cannot parse duration {text!r}; use e.g. 90s, 5m, 1h30m")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if total <= 0:
        raise LMForgeError(f"duration {text!r} must be positive")
    return total


MAX_TOKEN_COUNT = 1 << 50  # ~1.1e15 training tokens: beyond any corpus, a typo rather than a plan
# Token counts: a number, then an optional multiplier k/K (thousand), M (million) or G (billion), then an
# optional "tok"/"tokens". Lowercase m is not a multiplier: in budgets it means minutes (parse_duration).
_TOKEN_COUNT = re.compile(r"^(\d+(?:\.\d*)?)\s*([kKMG]?)\s*(tok|tokens)?$")
_MULTIPLIER = {"": 1, "k": 1_000, "K": 1_000, "M": 1_000_000, "G": 1_000_000_000}


def parse_token_count(text: str | int) -> int:
    """Parse '500k', '5M', '5Mtok', '2G', '2000000' or '20000 tokens' into a positive whole number of tokens."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _TOKEN_COUNT.match(str(text).strip().replace("_", ""))
        if not m:
            raise LMForgeError(f"cannot parse token count {text!r}; use e.g. 500k, 5M (capital M = million), "
                               "2000000 or 5Mtok")
        value = float(m.group(1)) * _MULTIPLIER[m.group(2)]
        if value != int(value):
            raise LMForgeError(f"token count {text!r} is not a whole number of tokens")
        n = int(value)
    if n <= 0:
        raise LMForgeError(f"token count {text!r} must be positive")
    if n > MAX_TOKEN_COUNT:
        raise LMForgeError(f"token count {text!r} is absurdly large (more than {MAX_TOKEN_COUNT:,}); check the "
                           "number and its suffix")
    return n


_NATIVE_BF16: bool | None = None


def native_bf16() -> bool:
    """Does this CPU compute in bf16 natively (AVX512-BF16 or AMX)? Without it PyTorch emulates bf16,
    which is slower than fp32 (measured: a seq2seq step 50x slower on an AVX2-only EPYC) and oneDNN's
    fused LSTM refuses bf16 altogether. ``LMFORGE_BF16=1/0`` overrides the detection."""
    global _NATIVE_BF16
    env = os.environ.get("LMFORGE_BF16")
    if env is not None:
        return env not in ("0", "", "false", "no")
    if _NATIVE_BF16 is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                flags = next((line for line in f if line.startswith("flags")), "").split()
        except OSError:
            flags = []
        _NATIVE_BF16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return _NATIVE_BF16


def resolve_dtype(dtype: str) -> str:
    """``auto`` -> bf16 where the CPU has native bf16, else fp32."""
    if dtype == "auto":
        return "bf16" if native_bf16() else "fp32"
    return dtype


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def resolve_device(spec: str | None, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present (GPU ``local_rank`` under torchrun), else CPU."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise LMForgeError(f"--device {spec}: no CUDA GPU is visible (PyTorch {torch.__version__}, {build}); "
                               "use --device cpu")
        index = int(spec.split(":", 1)[1]) if ":" in spec else local_rank
        if index >= torch.cuda.device_count():
            raise LMForgeError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise LMForgeError("--device mps: Apple's Metal backend is not available here; use --device cpu")
        return torch.device("mps")
    if spec == "cpu":
        return torch.device("cpu")
    raise LMForgeError(f"unknown --device {spec!r}; choose auto, cpu, cuda, cuda:N or mps")
