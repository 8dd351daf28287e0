"""The tokenizer interface shared by every model family.

A tokenizer maps text to integer ids and back. Every lmforge tokenizer has a document
separator token (``<|endoftext|>``, GPT-2's name for it) so that documents can be packed into
one token stream, and saves itself as ``tokenizer.json`` inside a run or data directory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..errors import LMForgeError

EOT = "<|endoftext|>"


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses: CharTokenizer, BPETokenizer, WordTokenizer."""

    kind: str = "base"
    #: True when ``decode(encode(text)) == text`` for every string (char and byte-level BPE).
    lossless: bool = True
    #: id of a begin-of-sentence token, when the vocabulary has one (word level: <s>)
    bos_id: int | None = None
    #: id of the unknown-word token, when rare words collapse to one (word level: <unk>)
    unk_id: int | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eot_id(self) -> int:
        """Id of the end-of-text / document-separator token."""

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids whose text is never shown (streamed or returned replies skip them): control tokens such as end
        of text or end of turn. Default: the end-of-text token; byte-level BPE adds every token the file marks
        special (``<|im_start|>``, ``<|im_end|>``...)."""
        return frozenset({self.eot_id})

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int] | np.ndarray) -> str: ...

    @abstractmethod
    def save(self, directory: str | Path, name: str = "tokenizer.json") -> Path:
        """Write ``name`` (``tokenizer.json``) into ``directory`` and return its path."""

    def encode_array(self, text: str) -> np.ndarray:
        """Encode to a numpy array (subclasses override with a vectorised path)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def id_to_token(self, i: int) -> str:
        return self.decode([i])


def check_tokenizer_fits(tokenizer: Tokenizer | None, vocab_size: int, where: str) -> None:
    """A tokenizer whose ids run past the model's embedding would index rows that do not exist (or,
    worse, silently wrong ones); refuse it with the two sizes."""
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise LMForgeError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                           f"has only {vocab_size}; this tokenizer belongs to another model")
