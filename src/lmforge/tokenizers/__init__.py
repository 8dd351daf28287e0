"""Tokenizers: character level (with byte fallback), byte-level BPE, and word level (n-grams)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from ..errors import LMForgeError
from ..utils import read_json
from .base import EOT, Tokenizer, check_tokenizer_fits
from .bpe import BPETokenizer
from .char import CharTokenizer
from .word import WordTokenizer

__all__ = ["EOT", "Tokenizer", "CharTokenizer", "BPETokenizer", "load_tokenizer", "TOKENIZER_KINDS",
           "SOURCE_TOKENIZER", "check_tokenizer_fits"]

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
    except IsADirectoryError:
        raise LMForgeError(f"{path} is a directory, not a tokenizer file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(f"tokenizer file {path} is corrupted ({e})") from None
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "char":
        return CharTokenizer.from_json(obj, str(path))
    if kind == "word":

        return WordTokenizer.from_json(obj, str(path))
    if isinstance(obj, dict) and "model" in obj:  # Hugging Face tokenizers format

        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # the tokenizers library raises plain Exception subclasses of its own
            raise LMForgeError(f"tokenizer file {path} cannot be read by the tokenizers library "
                               f"({str(e)[:120]})") from None
        conf = path.parent / "tokenizer_config.json"  # the end-of-text token, when it is not <|endoftext|>
        eos = read_json(conf, "tokenizer config").get("eos_token") if conf.exists() else None
        return BPETokenizer(hf, eot=eos.get("content") if isinstance(eos, dict) else eos)
    raise LMForgeError(f"unrecognised tokenizer file {path}: expected lmforge char/word or a Hugging Face "
                       "tokenizer.json")
