"""Parallel (source -> target) corpora for encoder-decoder models: translation and summarisation.

Corpora (``corpora.py``; the de-en dictionary is found or fetched by ``fetch.py``):
  de-en      German -> English sentence pairs from Debian's ``trans-de-en`` dictionary (the example
             sentences of the Ding dictionary). Full sentences only: both sides end in . ? or !, at
             least four words each side, bracketed annotations removed, duplicates removed. The
             test/val split is fixed by a hash of the German sentence, so it never depends on options.
  code-doc   Python standard-library functions -> the first sentence of their docstring (the
             docstring is removed from the source), split by file so a module never straddles splits.
  X.tsv      any file of ``source<TAB>target`` lines
  X + --target-file Y   two line-aligned files

A prepared parallel data directory (``prepare.py``; ``meta.json`` with ``"format": "lmforge-parallel-data"``)
holds, per split, the token ids of each side (``train.src.bin``/``train.tgt.bin``, uint16/uint32) with the
start offset of every pair (``train.src.idx``/``train.tgt.idx``, int64, one more entry than pairs), and the
raw text pairs (``train.jsonl``) that BLEU is computed against. ``reader.py`` reads it, ``batches.py`` makes
training and decoding batches.
"""

from __future__ import annotations

from .batches import ParallelBatchSampler, make_batch, pad_batch, source_batch
from .corpora import (
    BUILTIN_PARALLEL,
    ParallelCorpus,
    aligned_corpus,
    code_doc_corpus,
    de_en_corpus,
    first_sentence,
    function_doc_pairs,
    hash_split,
    is_parallel_spec,
    load_parallel_corpus,
    parse_trans,
    tsv_corpus,
)
from .fetch import cache_dir, trans_de_en_path
from .prepare import prepare_parallel
from .reader import ParallelData, ParallelSplit, is_parallel_meta, load_data

__all__ = ["BUILTIN_PARALLEL", "ParallelBatchSampler", "ParallelCorpus", "ParallelData", "ParallelSplit",
           "aligned_corpus", "cache_dir", "code_doc_corpus", "de_en_corpus", "first_sentence", "function_doc_pairs",
           "hash_split", "is_parallel_meta", "is_parallel_spec", "load_data", "load_parallel_corpus", "make_batch",
           "pad_batch", "parse_trans", "prepare_parallel", "source_batch", "trans_de_en_path", "tsv_corpus"]
