"""Byte-level BPE (GPT-2 style), trained and run by Hugging Face's ``tokenizers`` library.

Byte-level means the base alphabet is the 256 bytes, so every string is encodable and decoding
restores it exactly. The file is the standard ``tokenizer.json`` that ``transformers`` reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..errors import LMForgeError
from ..utils import atomic_write
from .base import EOT, Tokenizer

MIN_VOCAB = 256 + 1 + 1  # the byte alphabet, <|endoftext|>, and at least one merge


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, hf: HFTokenizer, eot: str | int | None = None) -> None:
        """``eot``: the end-of-text token (text or id); default ``<|endoftext|>`` (lmforge's and GPT-2's)."""
        self.hf = hf
        eot_id = eot if isinstance(eot, int) else hf.token_to_id(eot or EOT)
        if eot_id is None:
            raise LMForgeError(f"BPE tokenizer has no {eot or EOT} token; retrain it with lmforge prepare")
        self._eot = eot_id
        self._special = frozenset({eot_id} | {i for i, t in hf.get_added_tokens_decoder().items() if t.special})

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              show_progress: bool = False) -> BPETokenizer:
        if vocab_size < MIN_VOCAB:
            raise LMForgeError(f"BPE vocab size {vocab_size} is too small: byte-level BPE needs at least "
                               f"{MIN_VOCAB} (256 bytes + {EOT} + merges); try --vocab-size 8192")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, i: int) -> str:
        return self.hf.id_to_token(int(i)) or ""

    def save(self, directory: str | Path, name: str = "tokenizer.json") -> Path:
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)

        atomic_write(path, lambda tmp: self.hf.save(tmp))
        eot = self.id_to_token(self._eot)
        if name == "tokenizer.json" and eot != EOT:  # e.g. SmolLM2's <|im_end|>: recorded as transformers does
            from ..utils import atomic_write_json

            atomic_write_json(path.parent / "tokenizer_config.json", {"eos_token": eot})
        return path
