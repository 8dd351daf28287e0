"""Character-level tokenizer with byte fallback.

The vocabulary is every character seen in the training text (as in nanoGPT's shakespeare_char),
plus ``<|endoftext|>`` and 256 byte tokens. A character never seen in training is written as
the byte tokens of its UTF-8 encoding (SentencePiece's "byte fallback"), so encoding and
decoding round-trip exactly on any Unicode text, Chinese and emoji included.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import LMForgeError
from ..utils import atomic_write_text
from .base import EOT, Tokenizer

N_BYTES = 256


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: Iterable[str], byte_fallback: bool = True) -> None:
        chars = sorted(set(chars))
        if any(len(c) != 1 for c in chars):
            raise LMForgeError("a character tokenizer's vocabulary holds single characters; its tokenizer.json is "
                               "damaged or of another kind: re-run lmforge prepare")
        self.chars: list[str] = chars
        self.byte_fallback = byte_fallback
        # Layout: 0 = <|endoftext|>, 1..n = characters, then the 256 byte tokens.
        self._char_to_id = {c: i + 1 for i, c in enumerate(chars)}
        self._byte_offset = 1 + len(chars)
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.int64)  # sorted
        self.lossless = byte_fallback

    @classmethod
    def train(cls, texts: Iterable[str], byte_fallback: bool = True) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(seen, byte_fallback=byte_fallback)

    @property
    def vocab_size(self) -> int:
        return self._byte_offset + (N_BYTES if self.byte_fallback else 0)

    @property
    def eot_id(self) -> int:
        return 0

    def encode_array(self, text: str) -> np.ndarray:
        if not text:
            return np.zeros(0, dtype=np.int64)
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        idx = np.searchsorted(self._codepoints, cps)
        idx_c = np.minimum(idx, max(len(self._codepoints) - 1, 0))
        found = (self._codepoints[idx_c] == cps) if len(self._codepoints) else np.zeros(len(cps), bool)
        ids = idx_c + 1
        if found.all():
            return ids
        if not self.byte_fallback:
            at = int(np.argmin(found))
            raise LMForgeError(f"character {text[at]!r} (U+{ord(text[at]):04X}, at character {at}) is not in the "
                               "char vocabulary and this tokenizer has no byte fallback (--no-byte-fallback); "
                               "remove the character or prepare the data without --no-byte-fallback")
        # Rare path: splice in the UTF-8 bytes of unseen characters.
        out: list[np.ndarray] = []
        start = 0
        for j in np.flatnonzero(~found):
            out.append(ids[start:j])
            b = np.frombuffer(text[j].encode("utf-8", "surrogatepass"), dtype=np.uint8).astype(np.int64)
            out.append(b + self._byte_offset)
            start = j + 1
        out.append(ids[start:])
        return np.concatenate(out)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: list[int] | np.ndarray) -> str:
        parts: list[str] = []
        pending = bytearray()
        for i in (int(x) for x in ids):
            if i >= self._byte_offset:
                pending.append(i - self._byte_offset)
                continue
            if pending:
                parts.append(pending.decode("utf-8", "replace"))
                pending.clear()
            if i == 0:
                parts.append(EOT)
            elif 0 < i < self._byte_offset:
                parts.append(self.chars[i - 1])
        if pending:
            parts.append(pending.decode("utf-8", "replace"))
        return "".join(parts)

    def id_to_token(self, i: int) -> str:
        if i == 0:
            return EOT
        if i < self._byte_offset:
            return self.chars[i - 1]
        return f"<0x{i - self._byte_offset:02X}>"

    def save(self, directory: str | Path, name: str = "tokenizer.json") -> Path:
        path = Path(directory) / name
        obj = {"type": "char", "version": 1, "special_tokens": [EOT],
               "byte_fallback": self.byte_fallback, "chars": "".join(self.chars)}
        atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")
        return path

    @classmethod
    def from_json(cls, obj: dict, where: str = "tokenizer.json") -> CharTokenizer:
        chars, fallback = obj.get("chars"), obj.get("byte_fallback", True)
        if not isinstance(chars, str) or not isinstance(fallback, bool):
            raise LMForgeError(f"{where} is damaged: a char tokenizer needs \"chars\" (a string) and "
                               "\"byte_fallback\" (true/false); restore it from the data directory")
        return cls(list(chars), byte_fallback=fallback)
