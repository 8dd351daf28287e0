"""Word-level tokenizer for n-gram models (KenLM's conventions).

Words are whitespace-separated (or ``re.findall(pattern)`` matches); every non-empty line is a sentence
and ends with ``</s>``; ``<s>`` is only ever a context; words rarer than ``min_count`` in training (and
unseen words) become ``<unk>``. Not lossless: whitespace is normalised.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import LMForgeError
from ..utils import atomic_write_text
from .base import Tokenizer

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


class WordTokenizer(Tokenizer):
    kind = "word"
    lossless = False

    def __init__(self, words: list[str], pattern: str | None = None, lowercase: bool = False) -> None:
        self.words = [BOS, EOS, UNK] + [w for w in words if w not in (BOS, EOS, UNK)]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pattern = pattern
        self._re = compile_word_pattern(pattern) if pattern else None
        self.lowercase = lowercase

    bos_id, unk_id = 0, 2

    @property
    def eot_id(self) -> int:
        return 1  # </s>

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def special_ids(self) -> frozenset[int]:
        """Only ``<s>`` (never text): ``</s>`` is shown, as the line break it decodes to."""
        return frozenset({self.bos_id})

    def split(self, line: str) -> list[str]:
        if self.lowercase:
            line = line.lower()
        return [w for w in self._re.findall(line) if w] if self._re else line.split()

    @classmethod
    def train(cls, texts: Iterable[str], pattern: str | None = None, min_count: int = 1,
              lowercase: bool = False) -> WordTokenizer:
        tmp = cls([], pattern, lowercase)
        counts: Counter[str] = Counter()
        for text in texts:
            for line in text.splitlines():
                counts.update(tmp.split(line))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words, pattern, lowercase)

    def encode(self, text: str) -> list[int]:
        """Words of every line; a complete line (one that ends with a newline) also gets </s>, so a prompt
        without a final newline continues its sentence."""
        ids: list[int] = []
        get = self.index.get
        lines = text.split("\n")
        for j, line in enumerate(lines):
            ws = self.split(line)
            if ws:
                ids.extend(get(w, 2) for w in ws)
                if j < len(lines) - 1:
                    ids.append(1)
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        out, line = [], []
        for i in (int(x) for x in ids):
            if i == 1:
                out.append(" ".join(line) + "\n")
                line = []
            elif i != 0:
                line.append(self.words[i])
        if line:
            out.append(" ".join(line))
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        return self.words[int(i)]

    def save(self, directory: str | Path, name: str = "tokenizer.json") -> Path:
        path = Path(directory) / name
        obj = {"type": "word", "version": 1, "pattern": self.pattern, "lowercase": self.lowercase,
               "words": self.words}
        atomic_write_text(path, json.dumps(obj, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def from_json(cls, obj: dict, where: str = "tokenizer.json") -> WordTokenizer:
        words, pattern, lower = obj.get("words"), obj.get("pattern"), obj.get("lowercase", False)
        if not (isinstance(words, list) and all(isinstance(w, str) and w for w in words)
                and isinstance(pattern, (str, type(None))) and isinstance(lower, bool)):
            raise LMForgeError(f"{where} is damaged: a word tokenizer needs \"words\" (a list of non-empty "
                               "strings), \"pattern\" (a string or null) and \"lowercase\" (true/false)")
        if len(set(words)) != len(words) or words[:3] != [BOS, EOS, UNK]:
            raise LMForgeError(f"{where} is damaged: its word list must start with {BOS} {EOS} {UNK} and hold "
                               "each word once")
        return cls(words, pattern, lower)


def compile_word_pattern(pattern: str) -> re.Pattern:
    """``--word-pattern``: a regular expression matching one token (``re.findall``), e.g. ``\\w+|[^\\w\\s]``."""
    try:
        rx = re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:
        raise LMForgeError(f"--word-pattern {pattern!r} is not a valid regular expression ({e})") from None
    if rx.groups > 1:  # findall would return tuples, not words
        raise LMForgeError(f"--word-pattern {pattern!r} has {rx.groups} capturing groups; use (?:...) groups so "
                           "that each match is one word")
    return rx
