"""ARPA files, in exactly the format KenLM writes and reads.

    \\data\\
    ngram 1=V
    ngram 2=...

    \\1-grams:
    log10 p(w)<TAB>w<TAB>log10 backoff(w)
    ...
    \\end\\

Probabilities and backoffs are base-10 logarithms; p(<s>) is written as -99, as KenLM does. Word-level
models write their words; other tokenizers' tokens are escaped so that no token contains whitespace
(``\\x20`` for a space, ``\\n`` for a newline, ``\\\\`` for a backslash), their end-of-text token is
written as ``</s>`` and the virtual sentence start as ``<s>``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..errors import LMForgeError
from ..models.ngram import NGramModel
from ..tokenizers.word import WordTokenizer
from ..utils import atomic_write, check_output_file

LOG10 = math.log(10)


def escape(token: str) -> str:
    out = []
    for ch in token:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isspace() or not ch.isprintable():
            out.append(repr(ch)[1:-1] if ch in "\n\t\r" else f"\\x{ord(ch):02x}" if ord(ch) < 256
                       else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) or "\\x00"


def unescape(word: str) -> str:
    return re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|n|t|r|\\)",
                  lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}.get(m.group(1)) or
                  chr(int(m.group(1)[1:], 16)), word)


def vocabulary_strings(model: NGramModel) -> list[str]:
    tok = model.tokenizer
    words = []
    for i in range(model.V):
        if i == model.bos:
            words.append("<s>")
        elif i == model.eos:
            words.append("</s>")
        elif tok is None:
            words.append(f"<{i}>")
        elif tok.kind == "word":
            words.append(tok.id_to_token(i))
        else:
            words.append(escape(tok.id_to_token(i)))
    return words


def _fmt(x: float) -> str:
    return "-99" if not math.isfinite(x) else f"{x:.7g}"


def export_arpa(model: NGramModel, path: str | Path, force: bool = False) -> None:
    """Write ``path`` (atomically); an existing file is replaced only with ``force``."""
    check_output_file(path, force, option="ARPA file")
    words = vocabulary_strings(model)
    V, N = model.V, model.order
    # the word ids of every n-gram, order by order (keys are context_id * V + word)
    grams: list[np.ndarray] = [np.arange(V)[:, None]]
    for n in range(2, N + 1):
        k = model.keys[n - 1]
        grams.append(np.concatenate([grams[-1][k // V], (k % V)[:, None]], axis=1))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n\\data\\\n")
            for n in range(1, N + 1):
                f.write(f"ngram {n}={len(model.keys[n - 1])}\n")
            for n in range(1, N + 1):
                f.write(f"\n\\{n}-grams:\n")
                lp = model.logp[n - 1] / LOG10
                bo = model.logbo[n - 1] / LOG10
                if n == 1:
                    lp = lp.copy()
                    lp[model.bos] = -math.inf
                g = grams[n - 1]
                for i in range(len(g)):
                    text = " ".join(words[w] for w in g[i])
                    if n < N:
                        f.write(f"{_fmt(lp[i])}\t{text}\t{_fmt(bo[i]) if math.isfinite(bo[i]) else '-99'}\n")
                    else:
                        f.write(f"{_fmt(lp[i])}\t{text}\n")
            f.write("\n\\end\\\n")

    atomic_write(path, write)


def import_arpa(path: str | Path, tokenizer=None) -> NGramModel:  # noqa: ANN001
    """Read an ARPA file into an NGramModel that scores exactly as the file says.

    Without ``tokenizer``, a word tokenizer is built from the unigrams (<s>, </s>, <unk> first)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LMForgeError(f"ARPA file {path} not found") from None
    except UnicodeDecodeError as e:
        raise LMForgeError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    i = 0

    def err(msg: str) -> LMForgeError:
        return LMForgeError(f"{path}:{i + 1}: {msg}")

    while i < len(lines) and lines[i].strip() != "\\data\\":
        i += 1
    if i == len(lines):
        raise LMForgeError(f"{path}: not an ARPA file (no \\data\\ header)")
    i += 1
    counts: list[int] = []
    while i < len(lines) and lines[i].strip().startswith("ngram "):
        m = re.match(r"ngram (\d+)=(\d+)$", lines[i].strip())
        if not m or int(m.group(1)) != len(counts) + 1:
            raise err(f"malformed count line {lines[i]!r}")
        counts.append(int(m.group(2)))
        i += 1
    if not counts:
        raise err("no 'ngram N=count' lines")
    N = len(counts)
    entries: list[list[tuple[float, tuple[str, ...], float]]] = []
    for n in range(1, N + 1):
        while i < len(lines) and not lines[i].strip():
            i += 1
        if i >= len(lines) or lines[i].strip() != f"\\{n}-grams:":
            raise err(f"expected \\{n}-grams: (file truncated?)")
        i += 1
        rows = []
        for _ in range(counts[n - 1]):
            if i >= len(lines):
                raise err(f"file ends inside the {n}-grams section (truncated?)")
            parts = lines[i].split("\t") if "\t" in lines[i] else lines[i].split()
            try:
                if "\t" in lines[i]:
                    lp, text = float(parts[0]), parts[1].split(" ")
                    bo = float(parts[2]) if len(parts) > 2 else 0.0
                else:
                    lp, text = float(parts[0]), parts[1:1 + n]
                    bo = float(parts[1 + n]) if len(parts) > 1 + n else 0.0
            except (ValueError, IndexError):
                raise err(f"malformed {n}-gram line {lines[i]!r}") from None
            if len(text) != n:
                raise err(f"expected {n} words, got {len(text)} in {lines[i]!r}")
            # log10 p must be a probability's (<= 0; -99 or -inf for zero); a backoff weight may exceed 1
            # but must be a number
            if math.isnan(lp) or lp > 0 or math.isnan(bo) or bo == math.inf:
                raise err(f"{n}-gram line {lines[i]!r}: log10 probabilities must be <= 0 and backoffs finite; "
                          "the file is damaged")
            rows.append((lp, tuple(text), bo))
            i += 1
        entries.append(rows)
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i >= len(lines) or lines[i].strip() != "\\end\\":
        raise err("missing \\end\\ (file truncated?)")
    unigrams = [w[0] for _, w, _ in entries[0]]
    if tokenizer is None:

        tokenizer = WordTokenizer([w for w in unigrams if w not in ("<s>", "</s>", "<unk>")])
        index = tokenizer.index
        bos, eos, unk, V = tokenizer.bos_id, tokenizer.eot_id, tokenizer.unk_id, tokenizer.vocab_size
    else:
        V0 = tokenizer.vocab_size
        has_bos = tokenizer.bos_id is not None
        bos = tokenizer.bos_id if has_bos else V0
        eos, unk, V = tokenizer.eot_id, tokenizer.unk_id, V0 + (0 if has_bos else 1)
        index = {escape(tokenizer.id_to_token(j)) if tokenizer.kind != "word" else tokenizer.id_to_token(j): j
                 for j in range(V0)}
        index["<s>"], index["</s>"] = bos, eos
    missing = [w for w in unigrams if w not in index]
    if missing:
        raise LMForgeError(f"{path}: {len(missing)} unigrams are not in the tokenizer's vocabulary "
                           f"(e.g. {missing[0]!r})")
    unigram_set = set(unigrams)
    for n, rows in enumerate(entries[1:], start=2):
        unknown = next((w for _, ws, _ in rows for w in ws if w not in unigram_set), None)
        if unknown is not None:
            raise LMForgeError(f"{path}: the {n}-grams use the word {unknown!r}, which is not a unigram; "
                               "the file is inconsistent")
    keys, logp, logbo = [], [], []
    prev_ids: dict[tuple[int, ...], int] = {}
    for n in range(1, N + 1):
        rows = entries[n - 1]
        if n == 1:
            lp = np.full(V, -np.inf)
            bo = np.zeros(V)
            for p, (w,), b in rows:
                j = index[w]
                lp[j] = p * LOG10 if p > -99 else -np.inf
                bo[j] = b * LOG10
            keys.append(np.arange(V, dtype=np.int64))
            logp.append(lp)
            logbo.append(bo)
            prev_ids = {(j,): j for j in range(V)}
            continue
        k = np.empty(len(rows), dtype=np.int64)
        toks_list = []
        for r, (_, ws, _) in enumerate(rows):
            toks = tuple(index[w] for w in ws)
            ctx = prev_ids.get(toks[:-1])
            if ctx is None:
                raise LMForgeError(f"{path}: the {n}-gram {' '.join(ws)!r} has no {n - 1}-gram prefix entry")
            k[r] = ctx * V + toks[-1]
            toks_list.append(toks)
        order = np.argsort(k, kind="stable")
        if np.any(np.diff(k[order]) == 0):
            raise LMForgeError(f"{path}: an {n}-gram is listed twice; the file is inconsistent")
        keys.append(k[order])
        logp.append(np.array([rows[o][0] for o in order]) * LOG10)
        logbo.append(np.array([rows[o][2] for o in order]) * LOG10)
        prev_ids = {toks_list[o]: r for r, o in enumerate(order)}
    model = NGramModel(N, V, bos, eos, unk, keys, logp, logbo, {"smoothing": "arpa", "source": str(path),
                                                                "counts": counts})
    model.tokenizer = tokenizer
    return model
