"""Small shared helpers: atomic file writes, duration parsing, human-readable numbers."""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import math
import mmap
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
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


def refuse_overwrite(path: str | Path, option: str, force: bool = False) -> Path:
    """An output file must not replace a file the user has unless asked (``--force``), nor a directory."""
    path = Path(path)
    if path.is_dir():
        raise LMForgeError(f"{option} {path} is a directory; give a file name")
    if path.exists() and not force:
        raise LMForgeError(f"{option} {path} already exists; pass --force to replace it, or choose another file")
    if not path.parent.is_dir():
        raise LMForgeError(f"{option} {path}: the folder {path.parent} does not exist")
    return path


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


#: the CPU flags that decide how fast bf16 (and fp32) matmuls run; printed with every bench figure
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


@functools.cache  # once per process
def retain_freed_memory() -> bool:
    """Let glibc's malloc keep the memory that freed tensors return, for the next step to reuse (training).

    PyTorch's CPU tensors come straight from malloc, and glibc serves every block above its mmap threshold
    (128 KiB, adjusted up to 32 MiB) with a fresh mmap and unmaps it on free: each training step then faults
    in and zeroes its activations' pages again. Serving every block from the heap (M_MMAP_MAX 0) and returning
    heap memory to the system only above 1 GiB free (M_TRIM_THRESHOLD) keeps those pages; resident memory stays
    at its peak instead of dropping between steps. What jemalloc/tcmalloc preloads do for PyTorch, without one
    (measured by bench/retain_memory.py: docs/training.md). glibc Linux only; ``LMFORGE_RETAIN_MEMORY=0`` keeps
    malloc's defaults. True when the settings were applied."""
    if os.environ.get("LMFORGE_RETAIN_MEMORY", "1") == "0" or sys.platform != "linux" \
            or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def return_freed_memory() -> None:
    """Hand the memory that freed tensors left in malloc's heap back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). A decoding layout replaces every weight (rounded copies, then the huge-page buffer), and glibc keeps
    most of the freed originals: SmolLM2 int8 held 863 MiB resident after ``load_model("smollm2",
    decode_dtype="int8")``, 546 MiB with the trim (AMD EPYC, glibc 2.36)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


@functools.cache
def huge_pages_available() -> bool:
    """Whether this process can ask for transparent huge pages (Linux with THP ``always`` or ``madvise``;
    ``LMFORGE_HUGEPAGES=0`` says no)."""
    if os.environ.get("LMFORGE_HUGEPAGES", "1") == "0" or sys.platform != "linux" \
            or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of fresh, zeroed memory (uint8, starting on a 2 MiB boundary) backed by transparent huge pages,
    or None where there are none (:func:`huge_pages_available`).

    Why: a batch-1 decoding step streams every weight once, and the CPU's prefetchers stop at each 4 KiB page;
    on 2 MiB pages the same read ran 1.45x (two cores) to 1.78x (one) faster on an AMD EPYC (docs/hub.md, "Ninth
    session"; decoding steps: bench/huge_pages.py). PyTorch's tensors come
    from malloc, whose pages are 4 KiB unless the system enables THP for everything. The memory is an anonymous
    mapping advised before its first touch (a later madvise only asks khugepaged to collapse the pages
    eventually); the tensor keeps the mapping alive and unmaps it when freed."""
    if not huge_pages_available() or nbytes <= 0:
        return None
    try:
        # private: a shared anonymous mapping is shmem, whose huge pages are a separate (usually off) setting
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return None
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds `region`
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes]


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.zeros``, on transparent huge pages when it is a CPU tensor of 2 MiB or more (KV caches: a decoding
    step reads all of them; :func:`huge_page_buffer`)."""
    nbytes = math.prod(shape) * dtype.itemsize
    buf = huge_page_buffer(nbytes) if torch.device(device).type == "cpu" and nbytes >= HUGE_PAGE else None
    if buf is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return buf.view(dtype).view(shape)  # a fresh anonymous mapping reads as zeros


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """This CPU's model name (``lscpu``'s "Model name", read from /proc/cpuinfo) and its flags."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86 / ARM
                    flags = value
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", frozenset(flags.split())


def machine_summary(threads: int | None = None) -> str:
    """One line for every benchmark figure: CPU model, each flag of CPU_FLAGS present (yes) or absent (no),
    torch's version and thread count (``threads``: the count the measured work uses, when not this process's)."""
    model, flags = cpu_info()
    marks = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in CPU_FLAGS)
    return (f"CPU: {model} ({os.cpu_count()} CPUs; {marks}); torch {torch.__version__}, "
            f"{threads or torch.get_num_threads()} threads")


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
    """A CAPABILITY question, not a speed one: does this CPU have bf16 instructions (AVX512-BF16 or AMX)?
    Without them PyTorch emulates bf16 and oneDNN's fused LSTM has no bf16 kernel at all (models/rnn.py
    runs it in fp32 then). Whether bf16 is FASTER is measured, not read from flags: see
    :func:`resolve_dtype` (on some Xeons with avx512_bf16, bf16 matmuls run at half fp32's rate).
    ``LMFORGE_BF16=1/0`` overrides the detection."""
    env = os.environ.get("LMFORGE_BF16")
    if env is not None:
        return env not in ("0", "", "false", "no")
    flags = cpu_info()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --- --dtype auto: a measured choice between fp32 and bf16 ------------------------------------------

#: bf16 is chosen only when its matmuls are at least this much faster than fp32's (bf16 costs accuracy)
BF16_MARGIN = 1.1
PROBE_VERSION = 1
PURPOSES = ("train", "decode")
_PURPOSE_TEXT = {"train": "training", "decode": "decoding"}
_CHOICES: dict[tuple[str, int], tuple[str, str]] = {}  # (purpose, threads) -> (dtype, message), per process
_ANNOUNCED: set[str] = set()


def cache_root() -> Path:
    """Where lmforge keeps what it measures or builds per machine: ``$XDG_CACHE_HOME/lmforge`` (default
    ``~/.cache/lmforge``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lmforge"


def probe_cache_path() -> Path:
    """``$XDG_CACHE_HOME/lmforge/dtype-probe.json`` (default ``~/.cache/lmforge/``)."""
    return cache_root() / "dtype-probe.json"


#: environment variables that cap the instruction sets PyTorch's kernels use (oneDNN, MKL, ATen's vectorised ops):
#: a run under e.g. ``ONEDNN_MAX_CPU_ISA=AVX2`` has other fast dtypes than the same CPU without, so they are part of
#: the probe's cache key
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def _probe_key() -> str:
    model, flags = cpu_info()
    present = ",".join(f for f in CPU_FLAGS if f in flags) or "none"
    caps = "".join(f"|{v}={os.environ[v]}" for v in ISA_CAPS if os.environ.get(v))
    return f"{model}|{present}|torch {torch.__version__}|{torch.get_num_threads()} threads{caps}"


def _time_once(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _train_matmuls(bf16: bool) -> Callable[[], Any]:
    """A training step's matmuls for a (B*T=4096, 128) activation through a Linear(128, 512): the forward
    product and the two backward products (input and weight gradients). The bf16 side does what a step under
    ``torch.autocast("cpu", bf16)`` does (the trainer's way): the forward casts the fp32 activation and the
    fp32 master weight to bf16; the backward multiplies the bf16 output gradient by the saved bf16 operands,
    and the cast's backward returns both gradients in fp32. (Plain autocast on fp32 tensors here would recast
    the output gradient and the operands in the backward too, which a real step does not.)"""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*s, generator=g) for s in ((4096, 128), (512, 128), (4096, 512)))
    if not bf16:
        return lambda: (x @ w.t(), dy @ w, dy.t() @ x)  # y (4096, 512); dx (4096, 128); dW (512, 128)
    dyb = dy.to(torch.bfloat16)  # a bf16 product's output gradient is bf16

    def step() -> Any:
        xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
        return xb @ wb.t(), (dyb @ wb).float(), (dyb.t() @ xb).float()
    return step


def _decode_matmuls(bf16: bool) -> Callable[[], Any]:
    """Batch-1 decoding's matrix-vector products, at the shapes of a small Llama (SmolLM2-135M: d=576, MLP
    1536, and a wide 576 -> 16384 head slice), in decoding's layouts (generation/fast.py): fp32 weights
    stored (in, out) and ``x @ W``; bf16 weights (out, in) and ``F.linear`` on bf16 activations."""
    g = torch.Generator().manual_seed(0)
    shapes = ((576, 1536), (1536, 576), (576, 16384))
    ws = [torch.randn(o, i, generator=g) for i, o in shapes]
    xs = [torch.randn(1, i, generator=g) for i, _ in shapes]
    if bf16:
        wb, xb = [w.to(torch.bfloat16) for w in ws], [x.to(torch.bfloat16) for x in xs]
        return lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xb, wb)]
    wt = [w.t().contiguous() for w in ws]
    return lambda: [x @ w for x, w in zip(xs, wt)]


def measure_bf16_speedup(purpose: str, rounds: int = 5, budget: float = 0.3) -> dict[str, float]:
    """Time ``purpose``'s matmuls in fp32 and in bf16, interleaved (fp32, bf16, fp32, ...: a load that comes
    and goes hits both alike), after one warm-up each: ``{"fp32_s", "bf16_s", "speedup"}`` with the median
    times and speedup = the median over rounds of fp32 time / bf16 time (> 1: bf16 is faster). At least 3
    rounds, fewer than ``rounds`` once ``budget`` seconds are spent: well under a second in all."""
    make = _train_matmuls if purpose == "train" else _decode_matmuls
    fp32, bf16 = make(False), make(True)
    t32: list[float] = []
    t16: list[float] = []
    start = time.perf_counter()
    with torch.no_grad():
        fp32(), bf16()
        while len(t32) < rounds and (len(t32) < 3 or time.perf_counter() - start < budget):
            t32.append(_time_once(fp32))
            t16.append(_time_once(bf16))
    return {"fp32_s": statistics.median(t32), "bf16_s": statistics.median(t16),
            "speedup": statistics.median(a / b for a, b in zip(t32, t16))}


def _read_probe_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent, unreadable or corrupt: measure again
    ok = isinstance(data, dict) and data.get("version") == PROBE_VERSION and isinstance(data.get("entries"), dict)
    return data["entries"] if ok else {}


def _probe(purpose: str) -> tuple[str, str]:
    """The measured choice for ``purpose`` on this machine and thread count, from the cache when there."""
    path, key = probe_cache_path(), _probe_key()
    entries = _read_probe_cache(path)
    entry = entries.get(key, {}).get(purpose) if isinstance(entries.get(key), dict) else None
    try:
        speedup, measured = float(entry["speedup"]), str(entry["measured"])  # type: ignore[index]
        load = float(entry.get("load", 0.0))  # type: ignore[union-attr]
        where = f"cached in {path}"
    except (TypeError, KeyError, ValueError, AttributeError):
        entry = measure_bf16_speedup(purpose)
        speedup, measured = entry["speedup"], time.strftime("%Y-%m-%d %H:%M", time.localtime())
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if not isinstance(entries.get(key), dict):
            entries[key] = {}
        entries[key][purpose] = {**entry, "measured": measured, "load": round(load, 2)}
        try:
            atomic_write_json(path, {"version": PROBE_VERSION, "entries": entries})
            where = f"now cached in {path}"
        except OSError:
            where = f"not cached: {path} is not writable"
    dtype = "bf16" if speedup >= BF16_MARGIN else "fp32"
    busy = f" under load {load:.1f} (delete the cache to measure again)" if load > (os.cpu_count() or 1) else ""
    n = torch.get_num_threads()
    why = (f"bf16 matmuls {speedup:.2f}x fp32's speed on {cpu_info()[0]}, {n} thread{'s' * (n != 1)}; "
           f"bf16 needs >= {BF16_MARGIN}x; measured {measured}{busy}, {where}")
    return dtype, why


def dtype_probe(purpose: str) -> tuple[str, str]:
    """The probe's choice for ``purpose`` on this CPU at the current thread count, and why (the measured
    speed ratio, where it is cached): measured at most once per process and thread count, and once per
    machine while the cache lasts. Ignores LMFORGE_BF16 (see :func:`resolve_dtype`)."""
    key = (purpose, torch.get_num_threads())
    if key not in _CHOICES:
        _CHOICES[key] = _probe(purpose)
    return _CHOICES[key]


def resolve_dtype(dtype: str, purpose: str = "train", device: torch.device | str = "cpu",
                  announce: bool = True) -> str:
    """``--dtype auto`` -> ``fp32`` or ``bf16`` for ``purpose`` ("train": autocast training steps; "decode":
    batch-1 decoding weights); any other ``dtype`` is returned as it is.

    On a CPU the choice is MEASURED, not read from flags: a short matmul probe (:func:`measure_bf16_speedup`)
    picks bf16 only when it is at least BF16_MARGIN faster than fp32, cached per CPU model, flags, torch
    version and thread count in :func:`probe_cache_path`. ``LMFORGE_BF16=1/0`` forces the choice. On CUDA:
    bf16 where the GPU supports it (training falls back to fp16 in train/distributed.py). The choice and its
    reason go to stderr once per process and purpose (``announce=False``: silent, e.g. on ranks > 0)."""
    if dtype != "auto":
        return dtype
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; choose {', '.join(PURPOSES)}")
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if torch.device(device).type != "cpu":
        return "fp32"  # MPS: fp32 unless asked
    env = os.environ.get("LMFORGE_BF16")
    if env is not None:
        choice = ("fp32", "bf16")[env not in ("0", "", "false", "no")]
        reason = f"forced by LMFORGE_BF16={env}; no measurement"
    else:
        choice, reason = dtype_probe(purpose)
    if announce and purpose not in _ANNOUNCED:
        _ANNOUNCED.add(purpose)
        print(f"lmforge: --dtype auto -> {choice} for {_PURPOSE_TEXT[purpose]} ({reason})", file=sys.stderr)
    return choice


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
