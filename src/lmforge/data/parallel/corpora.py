"""Parallel corpora: de-en (parsed from trans-de-en), code-doc (docstrings mined from the standard library),
.tsv files and line-aligned file pairs."""

from __future__ import annotations

import ast
import re
import textwrap
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import LMForgeError
from ..corpora import read_text_file, stdlib_files
from .fetch import trans_de_en_path

SPLITS = ("train", "val", "test")


@dataclass
class ParallelCorpus:
    name: str
    pairs: list[tuple[str, str]]
    description: str = ""
    #: a fixed split per pair ("train"/"val"/"test"), or None to split by a seeded permutation
    fixed_split: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.pairs)


# --- de-en: Debian's trans-de-en -------------------------------------------------------------------
_ANNOTATION = re.compile(r"\s*(\[[^\]]*\]|\{[^}]*\})")
_END = (".", "?", "!")


def parse_trans(text: str) -> list[tuple[str, str]]:
    """Full-sentence pairs of a ``German :: English`` dictionary (sub-entries split by `` | ``)."""
    pairs: dict[tuple[str, str], None] = {}
    seen_src: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#") or " :: " not in line:
            continue
        de, en = line.split(" :: ", 1)
        des, ens = de.split(" | "), en.split(" | ")
        if len(des) != len(ens):
            continue
        for d, e in zip(des, ens):
            d, e = _ANNOTATION.sub("", d).strip(), _ANNOTATION.sub("", e).strip()
            if not (d.endswith(_END) and e.endswith(_END)) or len(d.split()) < 4 or len(e.split()) < 4:
                continue
            if d in seen_src:  # one translation per source sentence: the first
                continue
            seen_src.add(d)
            pairs[(d, e)] = None
    return list(pairs)


def hash_split(key: str, val_per_mille: int = 50, test_per_mille: int = 50) -> str:
    """A split fixed by the key's CRC-32: the same pair lands in the same split on every machine."""
    h = zlib.crc32(key.encode("utf-8")) % 1000
    return "test" if h < test_per_mille else "val" if h < test_per_mille + val_per_mille else "train"


def de_en_corpus() -> ParallelCorpus:
    path = trans_de_en_path()
    pairs = parse_trans(read_text_file(path))
    if not pairs:
        raise LMForgeError(f"{path} has no full-sentence pairs; is it the trans-de-en dictionary?")
    return ParallelCorpus("de-en", pairs, f"{len(pairs):,} German-English sentence pairs (Debian trans-de-en)",
                          fixed_split=[hash_split(d) for d, _ in pairs])


# --- code-doc: stdlib function -> first docstring sentence ---------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def first_sentence(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    para = " ".join(para.split())
    m = _SENTENCE_END.search(para)
    return para[: m.start()] if m else para


def function_doc_pairs(source: str, max_lines: int = 60) -> list[tuple[str, str]]:
    """(function source without its docstring, first sentence of the docstring) for every function
    (and method) of a module that has a docstring; functions longer than ``max_lines`` are skipped."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or not node.body or node.end_lineno is None:
            continue
        summary = first_sentence(doc)
        if len(summary.split()) < 3:
            continue
        ds = node.body[0]
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        if node.end_lineno - start > max_lines or len(node.body) < 2 or ds.end_lineno is None:
            continue  # a body that is only the docstring has nothing to summarise
        body = lines[start: ds.lineno - 1] + lines[ds.end_lineno:node.end_lineno]
        code = textwrap.dedent("\n".join(body)).strip("\n")
        if code:
            out.append((code, summary))
    return out


def code_doc_corpus() -> ParallelCorpus:
    root = Path(__import__("sysconfig").get_paths()["stdlib"])
    pairs, splits = [], []
    seen: set[str] = set()
    for f in stdlib_files():
        try:
            src = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        split = hash_split(str(f.relative_to(root)))
        for code, doc in function_doc_pairs(src):
            if code in seen:
                continue
            seen.add(code)
            pairs.append((code, doc))
            splits.append(split)
    if not pairs:
        raise LMForgeError(f"found no documented functions under {root}")
    return ParallelCorpus("code-doc", pairs, f"{len(pairs):,} Python standard-library functions -> first sentence "
                          "of their docstring", fixed_split=splits)


# --- files ---------------------------------------------------------------------------------------
def _check_pair(src: str, tgt: str, where: str) -> tuple[str, str]:
    if not src.strip():
        raise LMForgeError(f"{where}: empty source side; every pair needs text on both sides")
    if not tgt.strip():
        raise LMForgeError(f"{where}: empty target side; every pair needs text on both sides")
    return src.strip(), tgt.strip()


def tsv_corpus(path: Path, errors: str = "strict") -> ParallelCorpus:
    pairs = []
    for n, line in enumerate(read_text_file(path, errors).splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise LMForgeError(f"{path} line {n}: no tab; each line must be source<TAB>target")
        if line.count("\t") > 1:
            raise LMForgeError(f"{path} line {n}: {line.count(chr(9))} tabs; each line must be source<TAB>target "
                               "with exactly one tab")
        pairs.append(_check_pair(*line.split("\t"), f"{path} line {n}"))
    if not pairs:
        raise LMForgeError(f"{path} has no source<TAB>target lines")
    return ParallelCorpus(path.stem, pairs, f"{len(pairs):,} pairs from {path}")


def aligned_corpus(src_path: Path, tgt_path: Path, errors: str = "strict") -> ParallelCorpus:
    src = read_text_file(src_path, errors).splitlines()
    tgt = read_text_file(tgt_path, errors).splitlines()
    while src and not src[-1].strip() and tgt and not tgt[-1].strip():
        src.pop(), tgt.pop()
    if len(src) != len(tgt):
        raise LMForgeError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; line-aligned files "
                           "need one target line per source line")
    pairs = [_check_pair(s, t, f"{src_path}/{tgt_path.name} line {n}") for n, (s, t) in enumerate(zip(src, tgt), 1)]
    if not pairs:
        raise LMForgeError(f"{src_path} is empty")
    return ParallelCorpus(src_path.stem, pairs, f"{len(pairs):,} pairs from {src_path} + {tgt_path}")


BUILTIN_PARALLEL = {"de-en": de_en_corpus, "code-doc": code_doc_corpus}


def is_parallel_spec(spec: str, target_file: str | None = None) -> bool:
    return bool(target_file) or spec in BUILTIN_PARALLEL or spec.lower().endswith(".tsv")


def load_parallel_corpus(spec: str, target_file: str | None = None, errors: str = "strict") -> ParallelCorpus:
    if spec in BUILTIN_PARALLEL:
        return BUILTIN_PARALLEL[spec]()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LMForgeError(f"parallel corpus {spec} is not a file; give a .tsv file, a source file with "
                           f"--target-file, or one of {', '.join(BUILTIN_PARALLEL)}")
    if target_file:
        tgt = Path(target_file).expanduser()
        if not tgt.is_file():
            raise LMForgeError(f"--target-file {target_file} is not a file")
        return aligned_corpus(path, tgt, errors)
    return tsv_corpus(path, errors)


# --- preparation ---------------------------------------------------------------------------------
