"""The ``lmforge`` command line: parses arguments and dispatches; the work lives in the package."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from . import __version__
from .errors import LMForgeError

TRAIN_OPTIONS = {  # flag dest -> TrainConfig field (None default = "not given")
    "batch_size": int, "grad_accum": int, "lr": float, "min_lr_ratio": float, "weight_decay": float,
    "beta1": float, "beta2": float, "grad_clip": float, "warmup_steps": int, "schedule": str,
    "cooldown_frac": float, "max_steps": int, "eval_interval": int, "eval_iters": int, "log_interval": int,
    "checkpoint_interval": int, "sample_tokens": int, "dtype": str, "threads": int, "seed": int,
}
MODEL_OPTIONS = {"n_layer": int, "n_head": int, "n_kv_head": int, "n_embd": int, "block_size": int,
                 "dropout": float, "pos": str, "norm": str, "mlp": str, "mlp_hidden": int, "hidden": int,
                 # seq2seq
                 "n_encoder_layer": int, "n_decoder_layer": int, "label_smoothing": float,
                 "max_source_length": int, "max_target_length": int}


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped shards",
                       description="Tokenize a built-in corpus (shakespeare, python-stdlib, peoples-daily) or a "
                                   "file/folder of UTF-8 text into train/val/test token shards.")
    p.add_argument("--corpus", required=True,
                   help="built-in corpus (shakespeare, python-stdlib, peoples-daily; parallel: de-en, code-doc), a "
                        "file or folder of UTF-8 text, or a .tsv of source<TAB>target pairs")
    p.add_argument("--target-file", default=None,
                   help="parallel data from two line-aligned files: --corpus SOURCE --target-file TARGET")
    p.add_argument("--separate-vocab", action="store_true",
                   help="parallel data: one tokenizer per side instead of one shared vocabulary")
    p.add_argument("--tokenizer", default=None, choices=["char", "bpe", "word"],
                   help="default: char (bpe for parallel corpora)")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 8192; 8000 parallel)")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--seed", type=int, default=1337, help="seed of the document split")
    p.add_argument("--val-frac", type=float, default=0.05)
    p.add_argument("--test-frac", type=float, default=0.05)
    p.add_argument("--split", default="auto", choices=["auto", "document", "contiguous"],
                   help="split whole documents (seeded) or cut one text contiguously (auto: by corpus)")
    p.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"],
                   help="what to do with invalid UTF-8 (default: stop with an error)")
    p.add_argument("--word-pattern", default=None, help="word tokenizer: regex of a token (default whitespace)")
    p.add_argument("--min-count", type=int, default=1, help="word tokenizer: rarer words become <unk>")
    p.add_argument("--lowercase", action="store_true", help="word tokenizer: lowercase the text")
    p.add_argument("--no-byte-fallback", action="store_true",
                   help="char tokenizer: no byte tokens (nanoGPT's vocabulary; unseen characters then fail)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(a: argparse.Namespace) -> int:
    from .data import PrepareConfig, prepare
    from .data.parallel import is_parallel_spec, prepare_parallel

    if is_parallel_spec(a.corpus, a.target_file):
        meta = prepare_parallel(a.corpus, a.out, tokenizer=a.tokenizer or "bpe", vocab_size=a.vocab_size or 8000,
                                seed=a.seed, val_frac=a.val_frac, test_frac=a.test_frac, target_file=a.target_file,
                                separate_vocab=a.separate_vocab, errors=a.errors, progress=not a.no_progress)
        s = meta["splits"]
        vocab = f"vocab {meta['tokenizer']['vocab_size']}" + (
            f", source vocab {meta['source_tokenizer']['vocab_size']}" if meta["source_tokenizer"] else ", shared")
        print(f"prepared {meta['corpus']['description']} -> {a.out}")
        print(f"  tokenizer {meta['tokenizer']['kind']} ({vocab}), split {meta['split_mode']}")
        for k in ("train", "val", "test"):
            print(f"  {k:5s} {s[k]['pairs']:>8,} pairs {s[k]['src_tokens']:>10,} source tokens "
                  f"{s[k]['tgt_tokens']:>10,} target tokens")
        return 0
    if a.separate_vocab:
        raise LMForgeError("--separate-vocab applies to parallel corpora only (de-en, code-doc, .tsv, --target-file)")
    meta = prepare(PrepareConfig(corpus=a.corpus, out=a.out, tokenizer=a.tokenizer or "char",
                                 vocab_size=a.vocab_size or 8192,
                                 seed=a.seed, val_frac=a.val_frac, test_frac=a.test_frac, split=a.split,
                                 errors=a.errors, word_pattern=a.word_pattern, min_count=a.min_count,
                                 lowercase=a.lowercase, byte_fallback=not a.no_byte_fallback),
                   progress=not a.no_progress)
    s = meta["splits"]
    print(f"prepared {meta['corpus']['description']} -> {a.out}")
    print(f"  tokenizer {meta['tokenizer']['kind']} (vocab {meta['tokenizer']['vocab_size']}), {meta['dtype']} "
          f"shards, split by {meta['split_mode']}")
    for k in ("train", "val", "test"):
        print(f"  {k:5s} {s[k]['tokens']:>12,} tokens {s[k]['bytes']:>12,} bytes {s[k]['documents']:>6} docs")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (gpt, lstm, gru, rnn, seq2seq, ngram) or resume a run",
                       description="Train a language model on prepared data. Options override --config YAML, "
                                   "which overrides the preset's defaults.")
    p.add_argument("--model", default=None, help="model family: gpt (default), lstm, gru, rnn, seq2seq or ngram")
    p.add_argument("--data", default=None, help="prepared data directory (lmforge prepare)")
    p.add_argument("--out", default=None, help="run directory to create")
    p.add_argument("--preset", default=None, help="model preset (gpt: nano, tiny, small, gpt2; "
                   "lstm/gru/rnn: tiny, small, medium; seq2seq: tiny, small, base)")
    p.add_argument("--config", default=None, help="YAML file of training options (litgpt style)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the run in RUN from its checkpoint")
    p.add_argument("--max-time", default=None, help="training time budget, e.g. 90s, 5m, 1h")
    for name, typ in TRAIN_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    for name, typ in MODEL_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=argparse.SUPPRESS
                       if name in ("mlp_hidden",) else None)
    p.add_argument("--tie-embeddings", dest="tie_embeddings", action="store_true", default=None)
    p.add_argument("--no-tie-embeddings", dest="tie_embeddings", action="store_false")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--no-progress", action="store_true")
    try:
        from .apps import ngram_cli

        ngram_cli.add_train_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=cmd_train)


def train_config_from_args(a: argparse.Namespace) -> tuple[Any, bool]:
    from .train import TrainConfig, Trainer
    from .utils import parse_duration

    overrides: dict[str, Any] = {k: getattr(a, k) for k in TRAIN_OPTIONS if getattr(a, k) is not None}
    if a.max_time is not None:
        overrides["max_time"] = parse_duration(a.max_time)
    if a.compile:
        overrides["compile"] = True
    if a.no_progress:
        overrides["progress"] = False
    model_args = {k: getattr(a, k) for k in (*MODEL_OPTIONS, "tie_embeddings") if getattr(a, k) is not None}
    if a.resume:
        if model_args or a.model or a.preset or a.data:
            raise LMForgeError("--resume continues a run as it was configured; drop --model/--preset/--data and "
                               "the model-shape options")
        return Trainer.config_for_resume(a.resume, overrides), True
    base = TrainConfig.from_yaml(a.config).to_dict() if a.config else TrainConfig().to_dict()
    for key in ("model", "data", "out", "preset"):
        if getattr(a, key) is not None:
            base[key] = getattr(a, key)
    base.update(overrides)
    base["model_args"] = {**base.get("model_args", {}), **model_args}
    cfg = TrainConfig.from_dict(base)
    if not cfg.data:
        raise LMForgeError("give --data (a directory made by lmforge prepare)")
    if not cfg.out:
        raise LMForgeError("give --out (the run directory to create)")
    return cfg, False


def cmd_train(a: argparse.Namespace) -> int:
    if (a.model or "") == "ngram":
        from .apps import ngram_cli

        if not a.data or not a.out:
            raise LMForgeError("give --data and --out")
        ngram_cli.train_ngram_from_args(a)
        return 0
    from .train import TrainingInterrupted, train

    cfg, resume = train_config_from_args(a)
    try:
        r = train(cfg, resume=resume)
    except TrainingInterrupted as e:
        print(f"\nlmforge: {e}", file=sys.stderr)
        return 130
    val = f", val loss {r.val_loss:.4f}" if r.val_loss is not None else ""
    print(f"trained {r.step} steps, {r.tokens_seen:,} tokens in {r.train_time:.0f}s "
          f"({r.tokens_per_second:,.0f} tokens/s): train loss {r.train_loss:.4f}{val}")
    verb = "translate {} \"...\"" if cfg.model == "seq2seq" else "generate {} --prompt \"...\""
    print(f"saved {r.run_dir}  (try: lmforge {verb.format(r.run_dir)}; lmforge eval {r.run_dir} --split test)")
    return 0


FINETUNE_OPTIONS: dict[str, tuple[type, str]] = {  # flag dest -> (type, help); FineTuneConfig fields
    "method": (str, "lora (default: low-rank adapters, base frozen) or full (every weight trains)"),
    "lora_r": (int, "LoRA rank r (default 8)"),
    "lora_alpha": (float, "LoRA alpha; updates are scaled by alpha / r (default 16)"),
    "lora_dropout": (float, "dropout on the adapters' input (default 0.05)"),
    "lora_targets": (str, "comma-separated LoRA targets among q,k,v,o,gate,up,down (PEFT's q_proj ... down_proj), "
                          "or all (default all)"),
    "epochs": (float, "budget in passes over the training examples (instead of --max-time / --max-steps)"),
    "max_steps": (int, "budget in optimizer steps"),
    "val_frac": (float, "share of the examples (conversations) held out for validation (default 0.05)"),
    "test_frac": (float, "share held out for testing (default 0.05); de-en keeps its fixed test split"),
    "template": (str, "chat template: a built-in name (chatml, simple) or a Jinja file (default: the model's own)"),
    "max_length": (int, "most tokens per example / packed row (default 512, at most the model's context)"),
    "on_long": (str, "an example longer than --max-length: cut (default) or skip; both are counted"),
    "instruction": (str, "parallel data: the instruction before each source (default per corpus, e.g. "
                         "'Translate German to English:')"),
    "batch_size": (int, "examples (or packed rows) per batch (default 8)"),
    "grad_accum": (int, "gradient accumulation steps (default 1)"),
    "lr": (float, "peak learning rate (default 2e-4)"),
    "warmup_steps": (int, "linear warmup steps (default 10)"),
    "weight_decay": (float, "AdamW weight decay (default 0)"),
    "schedule": (str, "cosine (default), linear or constant"),
    "eval_interval": (int, "validate (masked held-out loss) and checkpoint every N steps (default 50)"),
    "eval_iters": (int, "validation batches (default 50; the whole split when smaller)"),
    "log_interval": (int, "log every N steps (default 5)"),
    "dtype": (str, "fp32 (default), bf16 (autocast) or auto"),
    "threads": (int, "torch threads (default: all cores)"),
    "seed": (int, "seed of the data split, the order and the adapters' initialisation (default 1337)"),
}


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained model (LoRA or full) on chat/instruction data",
                       description="Supervised fine-tuning on the shared trainer (checkpoints, exact resume, metrics, "
                                   "loss plot). Data: JSONL {text} | {prompt, completion} | {messages}, Alpaca JSON, "
                                   "parallel data (de-en, code-doc, .tsv) as instructions, or the built-in dialogue "
                                   "sets chatterbot[:LANGUAGE] and chitchat.")
    p.add_argument("model", nargs="?", default=None,
                   help="the model to adapt: a Hugging Face directory, a .gguf file, smollm2, or an lmforge GPT run")
    p.add_argument("--data", default=None, help="fine-tuning data: a .jsonl/.json/.tsv file, de-en, code-doc, "
                                                "chatterbot, chatterbot:chinese or chitchat")
    p.add_argument("--out", default=None, help="run directory to create (never overwritten)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the fine-tuning run RUN from its checkpoint")
    p.add_argument("--max-time", default=None, help="training time budget, e.g. 90s, 10m, 1h")
    for name, (typ, text) in FINETUNE_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=text)
    p.add_argument("--no-mask-prompt", action="store_true", help="train on every token, not only the assistant's")
    p.add_argument("--packing", action="store_true",
                   help="pack examples into full rows; attention never crosses an example's boundary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(a: argparse.Namespace) -> int:
    from .train import TrainingInterrupted
    from .train.finetune import FineTuner
    from .utils import parse_duration

    opts: dict[str, Any] = {k: getattr(a, k) for k in FINETUNE_OPTIONS if getattr(a, k) is not None}
    if a.max_time is not None:
        opts["max_time"] = parse_duration(a.max_time)
    if a.no_progress:
        opts["progress"] = False
    if a.resume:
        if a.model or a.data:
            raise LMForgeError("--resume continues a run as it was configured; drop MODEL and --data")
        tuner = FineTuner(FineTuner.config_for_resume(a.resume, opts), resume=True)
    else:
        if not a.model or not a.data or not a.out:
            raise LMForgeError("give MODEL, --data and --out (e.g. lmforge finetune smollm2 --data chatterbot "
                               "--out runs/ft)")
        if a.no_mask_prompt:
            opts["mask_prompt"] = False
        if a.packing:
            opts["packing"] = True
        from .train.finetune import FineTuneConfig

        tuner = FineTuner(FineTuneConfig(base=a.model, data=a.data, out=a.out, **opts))
    summary = tuner.data.summary()
    for k, v in summary["splits"].items():
        extra = "".join(f", {v[c]} {c}" for c in ("cut", "skipped") if v[c])
        print(f"{k:5s} {v['examples']:>7,} examples {v['target_tokens']:>10,} trained tokens{extra}")
    if summary["duplicates_removed"]:
        print(f"      {summary['duplicates_removed']:,} duplicate examples removed")
    try:
        r = tuner.train()
    except TrainingInterrupted as e:
        print(f"\nlmforge: {e}", file=sys.stderr)
        return 130
    val = f", held-out masked loss {r.val_loss:.4f}" if r.val_loss is not None else ""
    print(f"fine-tuned {r.step} steps, {r.tokens_seen:,} tokens in {r.train_time:.0f}s "
          f"({r.tokens_per_second:,.0f} tokens/s): train loss {r.train_loss:.4f}{val}")
    print(f"saved {r.run_dir}  (try: lmforge chat {r.run_dir}; lmforge export {r.run_dir} --format hf --merge "
          f"--out DIR)")
    return 0


def _load(model: str, adapter: str | None) -> Any:
    """``lmforge.load`` for the commands: MODEL, with a LoRA adapter merged in when --adapter is given."""
    from . import load

    return load(model, adapter=adapter)


ADAPTER_HELP = "a LoRA adapter (a run of lmforge finetune --method lora, or a PEFT adapter directory) to apply"


def _data_for_run(run: str, data: str | None) -> str:
    from .utils import read_json

    if data:
        return data
    p = Path(run) / "data.json"
    if p.exists():
        d = read_json(p, "run data pointer")["data"]
        if Path(d).exists():
            return d
        raise LMForgeError(f"the data this run was trained on ({d}) is gone; pass --data")
    raise LMForgeError(f"{run} does not record its data directory; pass --data")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte on a split")
    p.add_argument("run", help="run directory")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--data", default=None, help="prepared data (default: the run's own)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (Transformers)")
    p.add_argument("--beam", type=int, default=1, help="seq2seq: beam size for BLEU/chrF (1 = greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="seq2seq: beam length penalty")
    p.add_argument("--max-pairs", type=int, default=None, help="seq2seq: evaluate the first N pairs only")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--adapter", default=None, metavar="RUN", help=ADAPTER_HELP)
    p.set_defaults(func=cmd_eval)


def cmd_eval_seq2seq(a: argparse.Namespace, model: Any) -> int:
    from .apps.translate import evaluate_seq2seq

    res = evaluate_seq2seq(model, _data_for_run(a.run, a.data), split=a.split, beam=a.beam,
                           batch_size=a.batch_size,
                           length_penalty=a.length_penalty, max_pairs=a.max_pairs, progress=not a.json)
    if a.json:
        print(json.dumps(res, indent=2, ensure_ascii=False))
        return 0
    print(f"{a.run} on {a.split} ({res['pairs']:,} pairs, {'greedy' if a.beam == 1 else f'beam {a.beam}'}):")
    print(f"  loss          {res['loss']:.4f} nats/target token")
    print(f"  perplexity    {res['perplexity']:.3f}")
    print(f"  BLEU          {res['bleu']:.2f}   {res['bleu_signature']}")
    print(f"  chrF          {res['chrf']:.2f}   {res['chrf_signature']}")
    print(f"  speed         {res['sentences_per_second']:.1f} sentences/s")
    for s in res["samples"][:3]:
        print(f"  src: {s['source']}\n  ref: {s['reference']}\n  hyp: {s['hypothesis']}")
    return 0


def cmd_eval_instructed(a: argparse.Namespace, model: Any, instruction: str, data: str) -> int:
    from .apps.finetune import evaluate_instructed, run_record

    res = evaluate_instructed(model, data, instruction, split=a.split, beam=a.beam, batch_size=a.batch_size,
                              length_penalty=a.length_penalty, max_pairs=a.max_pairs, progress=not a.json,
                              record=run_record(a.adapter or a.run))
    if a.json:
        print(json.dumps(res, indent=2, ensure_ascii=False))
        return 0
    print(f"{a.run} on {data} {a.split} ({res['pairs']:,} pairs, {'greedy' if a.beam == 1 else f'beam {a.beam}'}, "
          f"prompt \"{instruction} ...\" in the chat template):")
    print(f"  BLEU          {res['bleu']:.2f}   {res['bleu_signature']}")
    print(f"  chrF          {res['chrf']:.2f}   {res['chrf_signature']}")
    print(f"  speed         {res['sentences_per_second']:.1f} sentences/s")
    for s in res["samples"][:3]:
        print(f"  src: {s['source']}\n  ref: {s['reference']}\n  hyp: {s['hypothesis']}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import evaluate

    model = _load(a.run, a.adapter)
    if getattr(model, "is_seq2seq", False):
        return cmd_eval_seq2seq(a, model)
    from .apps.finetune import instruction_for_eval

    found = instruction_for_eval(a.adapter or a.run, a.data)
    if found is not None:  # a fine-tuned decoder-only model on parallel data: generate, score BLEU/chrF
        return cmd_eval_instructed(a, model, *found)
    res = evaluate(model, _data_for_run(a.run, a.data), split=a.split, batch_size=a.batch_size,
                   max_tokens=a.max_tokens, stride=a.stride, progress=not a.json)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{a.run} on {a.split} ({res['tokens']:,} tokens):")
    print(f"  loss          {res['loss']:.4f} nats/token")
    print(f"  perplexity    {res['perplexity']:.3f}")
    if "bits_per_char" in res:
        print(f"  bits/char     {res['bits_per_char']:.4f}")
    print(f"  bits/byte     {res['bits_per_byte']:.4f}")
    if "oov_tokens" in res:
        print(f"  OOV tokens    {res['oov_tokens']:,}  (perplexity excluding OOVs "
              f"{res['perplexity_excluding_oov']:.3f})")
    if "note" in res:
        print(f"  note: {res['note']}")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a model")
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole context at every step")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--chat", default=None, metavar="MESSAGE", help="one chat turn through the chat template")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--template", default=None, metavar="NAME|FILE",
                   help="chat template for --chat: a built-in name (chatml, simple) or a Jinja file "
                        "(default: the model's own)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"],
                   help="weights for decoding: bf16 halves and int8 quarters the bytes read per token")
    p.add_argument("--adapter", default=None, metavar="RUN", help=ADAPTER_HELP)
    p.set_defaults(func=cmd_generate)


def _with_dtype(model: Any, dtype: str) -> Any:
    """Lay out a Transformer's weights for decoding (bound by the bytes of weight read per token):
    transposed fp32, bf16 or weight-only int8 (lmforge.generation.fast)."""
    from .generation.fast import prepare_for_decoding
    from .models.gpt import GPT
    from .models.seq2seq import Seq2Seq

    if isinstance(model, (GPT, Seq2Seq)):
        return prepare_for_decoding(model, dtype)
    if dtype != "fp32":
        raise LMForgeError(f"--dtype {dtype} applies to Transformer models (gpt, seq2seq, Hugging Face, GGUF); "
                           f"this is a {getattr(model, 'model_type', type(model).__name__)} model")
    return model


def _print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def cmd_generate(a: argparse.Namespace) -> int:
    from .generation import generate_text

    model = _with_dtype(_load(a.run, a.adapter), a.dtype)
    if getattr(model, "is_seq2seq", False):
        raise LMForgeError(f"{a.run} is a seq2seq (encoder-decoder) model: it needs a source; use "
                           f"lmforge translate {a.run} \"TEXT\"")
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
              repetition_penalty=a.repetition_penalty, stop=a.stop, ignore_eos=a.ignore_eos,
              use_cache=not a.no_cache)
    if a.chat is not None:
        from .apps.chat import no_template_message, open_session

        session = open_session(model, a.template, system=a.system, seed=a.seed, **kw)
        if not session.chat:
            raise LMForgeError(no_template_message(a.run))
        reply = session.ask(a.chat, on_text=_print_piece if a.stream else None)
        print("" if a.stream else reply)
        return 0
    n = a.num_return_sequences
    for i in range(n if a.stream else 1):
        if n > 1:
            print(f"--- sample {i + 1} ---" if a.stream else "", end="\n" if a.stream else "")
        seed = None if a.seed is None else a.seed + i
        if a.stream:
            sys.stdout.write(a.prompt)
            generate_text(model, a.prompt, return_full_text=False, stream=True, seed=seed, **kw)
            sys.stdout.write("\n")
        else:
            outs = generate_text(model, [a.prompt], num_return_sequences=n, seed=seed, **kw)
            for j, text in enumerate(outs):
                if n > 1:
                    print(f"--- sample {j + 1} ---")
                print(text)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="prepare Shakespeare, train a small GPT for ~5 minutes, report and sample")
    p.add_argument("--max-time", default="5m", help="training time (default 5m)")
    p.add_argument("--data", default="data/shakespeare-char")
    p.add_argument("--out", default=None, help="run directory (default: runs/demo, or the next free name)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(a: argparse.Namespace) -> int:
    from .apps.demo import run_demo
    from .utils import parse_duration

    run_demo(data=a.data, out=a.out, max_time=parse_duration(a.max_time) or 300.0, progress=not a.no_progress)
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train and compare model families on the same data and budget",
                       description="Train (or load) each model with the same wall-clock budget, evaluate all on "
                                   "the same split, and write a table (terminal, JSON, CSV) and a chart (PNG).")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--budget", default="5m", help="training time per model (default 5m)")
    p.add_argument("--models", nargs="+", required=True, metavar="FAMILY:ARG",
                   help="e.g. ngram:3 ngram:6 lstm:small gpt:tiny")
    p.add_argument("--out", required=True, help="report directory (runs are kept in OUT/runs)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--eval-max-tokens", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)


def cmd_compare(a: argparse.Namespace) -> int:
    from .apps.compare import ModelSpec, compare
    from .utils import parse_duration

    budget = parse_duration(a.budget)
    for m in a.models:  # fail fast, before any training
        ModelSpec.parse(m)
    compare(a.data, budget or 300.0, a.models, a.out, split=a.split, progress=not a.no_progress,
            eval_max_tokens=a.eval_max_tokens)
    return 0


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model (REPL, or one shot with --chat)")
    p.add_argument("model", help="run directory, Hugging Face directory, .gguf file, or smollm2")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--template", default=None, metavar="NAME|FILE",
                   help="chat template: a built-in name (chatml, simple) or a Jinja file, rendered sandboxed "
                        "(default: the model's own; without one the model continues your text)")
    p.add_argument("--chat", default=None, metavar="MESSAGE", help="one message, print the reply, exit")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"], help="weights for decoding")
    p.add_argument("--adapter", default=None, metavar="RUN", help=ADAPTER_HELP)
    p.set_defaults(func=cmd_chat)


def cmd_chat(a: argparse.Namespace) -> int:
    from .apps.chat import no_template_message, open_session, repl

    model = _with_dtype(_load(a.model, a.adapter), a.dtype)
    session = open_session(model, a.template, system=a.system, max_new_tokens=a.max_new_tokens,
                           temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    if not session.chat:
        print(f"lmforge: {no_template_message(a.model)}; meanwhile the model continues each message",
              file=sys.stderr)
    if a.chat is not None:
        print(session.ask(a.chat))
    else:
        repl(session)
    return 0


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="translate (or summarise) with a seq2seq model",
                       description="Decode with greedy or beam search. Give sentences as arguments, or --input "
                                   "FILE (one source per line; - for stdin).")
    p.add_argument("run", help="seq2seq run directory")
    p.add_argument("text", nargs="*", help="source sentence(s)")
    p.add_argument("--input", default=None, help="file of sources, one per line (- = stdin)")
    p.add_argument("--output", default=None, help="write translations here (default stdout)")
    p.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy; default 4)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--no-early-stopping", action="store_true", help="keep searching after num_beams finish")
    p.add_argument("--n-best", type=int, default=1, help="print the N best translations with scores")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--on-long", default="truncate", choices=["truncate", "error"],
                   help="a source longer than the model's context: cut it with a warning, or stop")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"], help="weights for decoding")
    p.set_defaults(func=cmd_translate)


def cmd_translate(a: argparse.Namespace) -> int:
    import time

    from .apps.translate import require_seq2seq, translate
    from .models import load_model

    if bool(a.text) == bool(a.input):
        raise LMForgeError("give the source text as arguments or --input FILE (not both)")
    model = load_model(a.run)
    require_seq2seq(model, a.run)
    model = _with_dtype(model, a.dtype)
    if a.input:
        from .data.corpora import read_text_file

        raw = sys.stdin.read() if a.input == "-" else read_text_file(Path(a.input))
        texts = raw.splitlines()
        empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise LMForgeError(f"{a.input} line {empty[0]} is empty; give one source per line")
    else:
        texts = a.text
    t0 = time.perf_counter()
    outs = translate(model, texts, beam=a.beam, batch_size=a.batch_size, length_penalty=a.length_penalty,
                     early_stopping=not a.no_early_stopping, n_best=a.n_best, max_new_tokens=a.max_new_tokens,
                     on_long=a.on_long, progress=bool(a.input) and a.output is not None)
    dt = time.perf_counter() - t0
    lines = []
    for o in outs:
        if a.n_best > 1:
            lines.extend(f"{k + 1}\t{score:.4f}\t{text}" for k, (text, score) in enumerate(o))
        else:
            lines.append(o)
    if a.output:
        from .utils import atomic_write_text

        atomic_write_text(a.output, "\n".join(lines) + "\n")
        print(f"translated {len(texts)} sentences in {dt:.1f}s ({len(texts) / max(dt, 1e-9):.1f} sentences/s) "
              f"-> {a.output}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a GPT run to Hugging Face format")
    p.add_argument("run", help="run directory")
    p.add_argument("--format", default="hf", choices=["hf"], help="hf: loads in transformers' Auto classes")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--merge", action="store_true",
                   help="RUN is a LoRA run: write its base model with the adapter merged into the weights")
    p.add_argument("--adapter", default=None, metavar="RUN", help=ADAPTER_HELP + " (merged)")
    p.set_defaults(func=cmd_export)


def cmd_export(a: argparse.Namespace) -> int:
    from .hub.export import export_hf
    from .hub.peft import is_adapter_dir

    if is_adapter_dir(a.run) and not a.merge:
        raise LMForgeError(f"{a.run} holds a LoRA adapter (PEFT format, loadable with peft on the base model's "
                           "export); add --merge to write the base with the adapter merged in")
    out = export_hf(_load(a.run, a.adapter), a.out)  # type: ignore[arg-type]
    print(f"exported {a.run} -> {out} (transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Build, train, evaluate and run language models: "
                                     "n-grams, RNNs/LSTMs, GPTs and encoder-decoder Transformers.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_finetune(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_compare(sub)
    _add_export(sub)
    _add_chat(sub)
    _add_translate(sub)
    try:
        from .apps import ngram_cli

        ngram_cli.add_ngram_parser(sub)
    except ImportError:
        pass
    return parser


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    return f"lmforge: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning  # type: ignore[assignment]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LMForgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nlmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug, not bad input: one line unless asked for the traceback
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: internal error: {type(e).__name__}: {e} (set LMFORGE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
