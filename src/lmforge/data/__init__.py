"""Corpora, preparation into token shards, and batching."""

from .corpora import BUILTIN_CORPORA, Corpus, Document, load_corpus
from .dataset import BatchSampler, Sampler, StreamSampler, TokenData, TokenSplit, check_run_data, data_fingerprint
from .prepare import PrepareConfig, prepare

__all__ = ["BUILTIN_CORPORA", "Corpus", "Document", "load_corpus", "BatchSampler", "StreamSampler", "TokenData",
           "TokenSplit", "PrepareConfig", "prepare", "Sampler", "check_run_data", "data_fingerprint"]
