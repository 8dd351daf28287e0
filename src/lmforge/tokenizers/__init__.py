"""Tokenizers: character level (with byte fallback), byte-level BPE, and word level (n-grams)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from ..errors import LMForgeError
from .base import EOT, Tokenizer
from .bpe import BPETokenizer
from .char import CharTokenizer
from .word import WordTokenizer

__all__ = ["EOT", "Tokenizer", "CharTokenizer", "BPETokenizer", "load_tokenizer", "TOKENIZER_KINDS",
           "SOURCE_TOKENIZER"]

TOKENIZER_KINDS = ("char", "bpe", "word")
SOURCE_TOKENIZER = "source_tokenizer.json"  # a seq2seq model's source-side tokenizer, when vocabularies differ


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` from a file or a directory that contains one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
        obj = json.loads(text)
    except FileNotFoundError:
        raise LMForgeError(f"no tokenizer.json at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(f"tokenizer file {path} is corrupted ({e})") from None
    kind = obj.get("type")
    if kind == "char":
        return CharTokenizer.from_json(obj)
    if kind == "word":

        return WordTokenizer.from_json(obj)
    if "model" in obj:  # Hugging Face tokenizers format

        conf = path.parent / "tokenizer_config.json"  # the end-of-text token, when it is not <|endoftext|>
        eos = json.loads(conf.read_text(encoding="utf-8")).get("eos_token") if conf.exists() else None
        return BPETokenizer(HFTokenizer.from_str(text), eot=eos.get("content") if isinstance(eos, dict) else eos)
    raise LMForgeError(f"unrecognised tokenizer file {path}: expected lmforge char/word or a Hugging Face "
                       "tokenizer.json")
