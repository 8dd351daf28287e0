"""Corpora, preparation into token shards, and batching."""

from .corpora import BUILTIN_CORPORA, Corpus, Document, load_corpus
from .dataset import BatchSampler, StreamSampler, TokenData, TokenSplit
from .prepare import PrepareConfig, prepare

__all__ = ["BUILTIN_CORPORA", "Corpus", "Document", "load_corpus", "BatchSampler", "StreamSampler", "TokenData",
           "TokenSplit", "PrepareConfig", "prepare"]
