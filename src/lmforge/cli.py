"""The ``lmforge`` command line: parses arguments and dispatches; the work lives in the package.

How a command is built (and where a new one goes):

* each command is a pair ``_add_X(sub)`` (its parser) + ``cmd_X(args)`` (the call into a package room),
  registered in ``build_parser``; the logic lives in a room (apps/, train/, generation/, ...), never here;
* options that belong to a config dataclass are *declared there* with ``lmforge.options.option``
  (help, default, constraints; ``Literal`` = allowed values) and become flags with ``add_options``; a new
  ``TrainConfig`` field is a documented, validated ``lmforge train`` flag with no edit to this file;
* flags hand strings to the dataclass, whose validator converts and checks them, so the command line,
  YAML configs and the Python API refuse the same values with the same one-line ``LMForgeError``
  (exit code 2);
* every argument has a help text (tests/test_cli_help.py checks all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from . import __version__
from .apps import ngram_cli
from .apps.chat import load_template, no_template_message, open_session, repl
from .apps.compare import Budget, ModelSpec, compare
from .apps.demo import run_demo
from .data import PrepareConfig, check_run_data, prepare
from .data.corpora import read_text_file
from .data.parallel import is_parallel_spec, prepare_parallel
from .errors import LMForgeError
from .evaluate import EvalConfig, evaluate
from .evaluate.instructions import evaluate_instructed, instruction_for_eval, run_record
from .evaluate.seq2seq import evaluate_seq2seq
from .generation import GenerationConfig, generate_text
from .generation.fast import DECODE_CHOICES, prepare_for_decoding
from .generation.seq2seq import TranslateConfig, require_seq2seq, translate
from .hub import load_model
from .hub.export import export_hf
from .hub.peft import apply_adapter, is_adapter_dir
from .models import on_device
from .models.gpt import GPT, GPTConfig
from .models.rnn import RNNConfig
from .models.seq2seq import Seq2Seq, Seq2SeqConfig
from .options import add_options, given
from .serve import ServeConfig, Server
from .serve.batch import run_batch
from .train import TrainConfig, Trainer, TrainingInterrupted, train
from .train.finetune import FineTuneConfig, FineTuner
from .train.launch import launch_torchrun
from .utils import atomic_write_text, check_output_file, parse_duration, read_json

# The flags are built from the config dataclasses of every room, so the parser imports them all (torch
# included): function-local imports here would save no start-up time.
DEVICE_HELP = "where to run: auto (CUDA when present), cpu, cuda, cuda:N or mps; default: auto"


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped shards",
                       description="Tokenize a built-in corpus (shakespeare, python-stdlib, peoples-daily), a "
                                   "file/folder of UTF-8 text, or a parallel corpus into train/val/test shards.")
    p.set_defaults(func=cmd_prepare, options=add_options(p, PrepareConfig))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_prepare(a: argparse.Namespace) -> int:
    opts = given(a, a.options)
    if "corpus" not in opts or "out" not in opts:
        raise LMForgeError("give --corpus and --out")
    parallel = is_parallel_spec(opts["corpus"], opts.get("target_file"))
    cfg = PrepareConfig(**{**({"tokenizer": "bpe", "vocab_size": 8000} if parallel else {}), **opts})
    if parallel:
        meta = prepare_parallel(cfg.corpus, cfg.out, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                                seed=cfg.seed, val_frac=cfg.val_frac, test_frac=cfg.test_frac,
                                target_file=cfg.target_file, separate_vocab=cfg.separate_vocab, errors=cfg.errors,
                                progress=not a.no_progress, force=cfg.force)
        s = meta["splits"]
        vocab = f"vocab {meta['tokenizer']['vocab_size']}" + (
            f", source vocab {meta['source_tokenizer']['vocab_size']}" if meta["source_tokenizer"] else ", shared")
        print(f"prepared {meta['corpus']['description']} -> {cfg.out}")
        print(f"  tokenizer {meta['tokenizer']['kind']} ({vocab}), split {meta['split_mode']}")
        for k in ("train", "val", "test"):
            print(f"  {k:5s} {s[k]['pairs']:>8,} pairs {s[k]['src_tokens']:>10,} source tokens "
                  f"{s[k]['tgt_tokens']:>10,} target tokens")
        return 0
    meta = prepare(cfg, progress=not a.no_progress)
    s = meta["splits"]
    print(f"prepared {meta['corpus']['description']} -> {cfg.out}")
    print(f"  tokenizer {meta['tokenizer']['kind']} (vocab {meta['tokenizer']['vocab_size']}), {meta['dtype']} "
          f"shards, split by {meta['split_mode']}")
    for k in ("train", "val", "test"):
        print(f"  {k:5s} {s[k]['tokens']:>12,} tokens {s[k]['bytes']:>12,} bytes {s[k]['documents']:>6} docs")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (gpt, lstm, gru, rnn, seq2seq, ngram) or resume a run",
                       description="Train a language model on prepared data. Options override --config YAML, "
                                   "which overrides the preset's defaults.")
    p.add_argument("--config", default=None, metavar="YAML", help="YAML file of training options (litgpt style; "
                   "the keys are the option names below with underscores)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the run in RUN from its checkpoint "
                   "(with its own configuration; budget and logging options may be changed)")
    train_opts = add_options(p, TrainConfig)
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="start N processes on this machine through torchrun (the same as torchrun --standalone "
                        "--nproc-per-node N -m lmforge train ...; see docs/distributed.md)")
    g = p.add_argument_group("model options (override the preset; gpt, lstm/gru/rnn or seq2seq)")
    seen: set[str] = set()
    model_opts = [n for cls in (GPTConfig, RNNConfig, Seq2SeqConfig) for n in add_options(g, cls, seen=seen)]
    p.set_defaults(func=cmd_train, train_options=train_opts, model_options=model_opts,
                   ngram_options=ngram_cli.add_train_arguments(p))


# What --resume may not change: the run continues on its own data, model and directory.
FIXED_ON_RESUME = ("data", "out", "model", "preset")


def train_config_from_args(a: argparse.Namespace) -> tuple[Any, bool]:
    overrides = given(a, a.train_options)
    model_args = given(a, a.model_options)
    if a.resume:
        fixed = (["config"] if a.config else []) + [k for k in FIXED_ON_RESUME if k in overrides] + sorted(model_args)
        if fixed:
            raise LMForgeError(f"--resume continues {a.resume} with its own data, model and directory; drop "
                               f"{', '.join('--' + f.replace('_', '-') for f in fixed)} (training options such as "
                               "--max-steps or --max-time may change)")
        return Trainer.config_for_resume(a.resume, overrides), True
    base = TrainConfig.from_yaml(a.config).to_dict() if a.config else {}
    base.update(overrides)
    base["model_args"] = {**base.get("model_args", {}), **model_args}
    cfg = TrainConfig.from_dict(base, what="training option")
    if not cfg.data:
        raise LMForgeError("give --data (a directory made by lmforge prepare)")
    if not cfg.out:
        raise LMForgeError("give --out (the run directory to create)")
    return cfg, False


def cmd_train(a: argparse.Namespace) -> int:
    if a.model == "ngram":

        if not a.data or not a.out:
            raise LMForgeError("give --data and --out")
        # n-grams count the corpus once: of the budgets only --max-tokens means something (the first N tokens)
        budget = given(a, ["max_tokens"])
        ngram_cli.train_ngram_from_args(a, TrainConfig(**budget).max_tokens if budget else None)
        return 0

    if a.nproc is not None:
        return launch_torchrun(a.nproc, a.argv)
    cfg, resume = train_config_from_args(a)
    try:
        r = train(cfg, resume=resume)
    except TrainingInterrupted as e:
        if e.is_main:
            print(f"\nlmforge: {e}", file=sys.stderr)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # A clean, saved stop: exit 0 so torchrun does not report the workers as failed; the
            # `--nproc` launcher still returns 130/143 (rank 0's code, handed over in LMFORGE_EXIT_FILE).
            _REPORTED_CODE[0] = 128 + e.signum
            return 0
        return 128 + e.signum
    if not r.is_main:
        return 0
    val = f", val loss {r.val_loss:.4f}" if r.val_loss is not None else ""
    print(f"trained {r.step} steps, {r.tokens_seen:,} tokens in {r.train_time:.0f}s "
          f"({r.tokens_per_second:,.0f} tokens/s): train loss {r.train_loss:.4f}{val}")
    verb = "translate {} \"...\"" if cfg.model == "seq2seq" else "generate {} --prompt \"...\""
    print(f"saved {r.run_dir}  (try: lmforge {verb.format(r.run_dir)}; lmforge eval {r.run_dir} --split test)")
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained model (LoRA or full) on chat/instruction data",
                       description="Supervised fine-tuning on the shared trainer (checkpoints, exact resume, metrics, "
                                   "loss plot). Data: JSONL {text} | {prompt, completion} | {messages}, Alpaca JSON, "
                                   "parallel data (de-en, code-doc, .tsv) as instructions, or the built-in dialogue "
                                   "sets chatterbot[:LANGUAGE] and chitchat.")
    p.add_argument("model", nargs="?", default=None,
                   help="the model to adapt: a Hugging Face directory, a .gguf file, smollm2, or an lmforge GPT run")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the fine-tuning run RUN from its checkpoint "
                   "(with its own configuration; budget and logging options may be changed)")
    p.set_defaults(func=cmd_finetune, options=add_options(p, FineTuneConfig))


def cmd_finetune(a: argparse.Namespace) -> int:
    opts = given(a, a.options)
    if a.resume:
        fixed = [k for k in ("data", "out") if k in opts] + (["MODEL"] if a.model else [])
        if fixed:
            raise LMForgeError(f"--resume continues {a.resume} as it was configured; drop "
                               f"{', '.join(f if f == 'MODEL' else '--' + f for f in fixed)}")
        tuner = FineTuner(FineTuner.config_for_resume(a.resume, opts), resume=True)
    else:
        if not a.model or "data" not in opts or "out" not in opts:
            raise LMForgeError("give MODEL, --data and --out (e.g. lmforge finetune smollm2 --data chatterbot "
                               "--out runs/ft --max-time 10m)")
        tuner = FineTuner(FineTuneConfig(base=a.model, **opts))
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
        return 128 + e.signum
    val = f", held-out masked loss {r.val_loss:.4f}" if r.val_loss is not None else ""
    print(f"fine-tuned {r.step} steps, {r.tokens_seen:,} tokens in {r.train_time:.0f}s "
          f"({r.tokens_per_second:,.0f} tokens/s): train loss {r.train_loss:.4f}{val}")
    print(f"saved {r.run_dir}  (try: lmforge chat {r.run_dir}; lmforge export {r.run_dir} --format hf --merge "
          f"--out DIR)")
    return 0


def _load(model: str, adapter: str | None) -> Any:
    """MODEL for the commands, with a LoRA adapter merged in when --adapter is given."""
    loaded = load_model(model)
    if adapter is not None:
        apply_adapter(loaded, adapter)
    return loaded


ADAPTER_HELP = "a LoRA adapter (a run of lmforge finetune --method lora, or a PEFT adapter directory) to apply"


def _data_for_run(run: str, data: str | None) -> str:
    if data:
        return data
    p = Path(run) / "data.json"
    if p.exists():
        d = read_json(p, "run data pointer")
        d = d.get("data") if isinstance(d, dict) else None
        if not isinstance(d, str):
            raise LMForgeError(f"{p} is damaged (no \"data\" path); pass --data")
        if Path(d).exists():
            problem = check_run_data(run, d)
            if problem:
                warnings.warn(f"{problem}; the figures below are for the new data", stacklevel=1)
            return d
        raise LMForgeError(f"the data this run was trained on ({d}) is gone; pass --data")
    raise LMForgeError(f"{run} does not record its data directory; pass --data")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte on a split (BLEU/chrF for seq2seq)")
    p.add_argument("run", help="run directory (or Hugging Face directory / .gguf file)")
    p.add_argument("--data", default=None, metavar="DIR", help="prepared data (default: the run's own)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--adapter", default=None, metavar="RUN", help=ADAPTER_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_eval, options=add_options(p, EvalConfig))


def cmd_eval_seq2seq(a: argparse.Namespace, model: Any, c: Any) -> int:
    res = evaluate_seq2seq(model, _data_for_run(a.run, a.data), split=c.split, beam=c.beam, batch_size=c.batch_size,
                           length_penalty=c.length_penalty, max_pairs=c.max_pairs, progress=not a.json)
    if a.json:
        print(json.dumps(res, indent=2, ensure_ascii=False))
        return 0
    print(f"{a.run} on {c.split} ({res['pairs']:,} pairs, {'greedy' if c.beam == 1 else f'beam {c.beam}'}):")
    print(f"  loss          {res['loss']:.4f} nats/target token")
    print(f"  perplexity    {res['perplexity']:.3f}")
    _print_translation_scores(res)
    return 0


def _print_translation_scores(res: dict) -> None:
    """BLEU, chrF, speed and three samples of a translation evaluation (seq2seq or instruction-tuned)."""
    print(f"  BLEU          {res['bleu']:.2f}   {res['bleu_signature']}")
    print(f"  chrF          {res['chrf']:.2f}   {res['chrf_signature']}")
    print(f"  speed         {res['sentences_per_second']:.1f} sentences/s")
    for s in res["samples"][:3]:
        print(f"  src: {s['source']}\n  ref: {s['reference']}\n  hyp: {s['hypothesis']}")


def cmd_eval_instructed(a: argparse.Namespace, model: Any, c: Any, instruction: str, data: str) -> int:
    res = evaluate_instructed(model, data, instruction, split=c.split, beam=c.beam, batch_size=c.batch_size,
                              length_penalty=c.length_penalty, max_pairs=c.max_pairs, progress=not a.json,
                              record=run_record(a.adapter or a.run))
    if a.json:
        print(json.dumps(res, indent=2, ensure_ascii=False))
        return 0
    print(f"{a.run} on {data} {c.split} ({res['pairs']:,} pairs, {'greedy' if c.beam == 1 else f'beam {c.beam}'}, "
          f"prompt \"{instruction} ...\" in the chat template):")
    _print_translation_scores(res)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    c = EvalConfig(**given(a, a.options))  # refuse bad values before loading anything
    model = on_device(_load(a.run, a.adapter), a.device)
    if model.is_seq2seq:
        return cmd_eval_seq2seq(a, model, c)
    found = instruction_for_eval(a.adapter or a.run, a.data)
    if found is not None:  # a fine-tuned decoder-only model on parallel data: generate, score BLEU/chrF
        return cmd_eval_instructed(a, model, c, *found)
    res = evaluate(model, _data_for_run(a.run, a.data), split=c.split, batch_size=c.batch_size,
                   max_tokens=c.max_tokens, stride=c.stride, progress=not a.json)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{a.run} on {c.split} ({res['tokens']:,} tokens):")
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


GENERATE_DEFAULTS = {"max_new_tokens": 200, "temperature": 0.8}
CHAT_DEFAULTS = {"max_new_tokens": 256, "temperature": 0.0}


def _add_decoding_options(p: argparse.ArgumentParser, defaults: dict[str, Any],
                          only: tuple[str, ...] | None = None) -> None:

    p.set_defaults(options=add_options(p, GenerationConfig, only=only, defaults=defaults), defaults=defaults)
    p.add_argument("--dtype", default="fp32", choices=DECODE_CHOICES,
                   help="weights for decoding: bf16 halves, int8 quarters, int4 (group-wise) eighths the bytes read "
                        "per token; a GGUF file loads its quantized tensors straight into int8/int4; auto: fp32 or "
                        "bf16, whichever a short probe measures faster here (docs/training.md); default: fp32")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128, 256],
                   help="int4: inputs sharing one scale and zero (smaller = closer to fp32, more bytes); default: 32")


def _generation_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """The decoding options given, over the command's defaults, checked by GenerationConfig."""

    kw = {**a.defaults, **given(a, a.options)}
    cfg = GenerationConfig(**kw)  # converts, and refuses bad values before the model is loaded
    out = {k: getattr(cfg, k) for k in kw}
    if out.get("speculative") not in (None, "prompt-lookup"):  # a draft model: any loadable model
        out["speculative"] = load_model(out["speculative"])
    return out


def _load_for_decoding(path: str, a: argparse.Namespace) -> Any:
    """Load ``path`` laid out for decoding (a GGUF file goes straight into int8/int4); a LoRA ``--adapter`` is
    merged into the fp32 weights first."""
    model = _load(path, a.adapter) if a.adapter is not None else load_model(path, decode_dtype=a.dtype)
    return _with_dtype(on_device(model, a.device), a.dtype, a.group_size)


def _report_speculative(kw: dict[str, Any]) -> None:
    if kw.get("speculative") is not None:
        from .generation import speculative  # (only speculative runs report)

        print(speculative.last_stats.summary(), file=sys.stderr)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a model")
    p.add_argument("run", help="run directory, Hugging Face directory, .gguf file, or smollm2")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--chat", default=None, metavar="MESSAGE", help="one chat turn through the chat template")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--template", default=None, metavar="NAME|FILE",
                   help="chat template for --chat: a built-in name (chatml, simple) or a Jinja file "
                        "(default: the model's own)")
    _add_decoding_options(p, GENERATE_DEFAULTS)
    p.add_argument("--adapter", default=None, metavar="RUN", help=ADAPTER_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_generate)


def _with_dtype(model: Any, dtype: str, group_size: int = 32) -> Any:
    """Lay out a Transformer's weights for decoding (bound by the bytes of weight read per token):
    transposed fp32, bf16, weight-only int8 or int4 (lmforge.generation.fast)."""

    if isinstance(model, (GPT, Seq2Seq)):
        return prepare_for_decoding(model, dtype, group_size)
    if dtype not in ("fp32", "auto"):  # auto: fp32 for the families without decoding layouts
        raise LMForgeError(f"--dtype {dtype} applies to Transformer models (gpt, seq2seq, Hugging Face, GGUF); "
                           f"this is a {model.model_type} model")
    return model


def _print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def cmd_generate(a: argparse.Namespace) -> int:
    kw = _generation_kwargs(a)
    model = _load_for_decoding(a.run, a)
    if model.is_seq2seq:
        raise LMForgeError(f"{a.run} is a seq2seq (encoder-decoder) model: it needs a source; use "
                           f"lmforge translate {a.run} \"TEXT\"")
    n = kw.pop("num_return_sequences", 1)
    seed0 = kw.pop("seed", None)
    if a.chat is not None:

        session = open_session(model, a.template, system=a.system, seed=seed0, **kw)
        if not session.chat:
            raise LMForgeError(no_template_message(a.run))
        reply = session.ask(a.chat, on_text=_print_piece if a.stream else None)
        print("" if a.stream else reply)
        _report_speculative(kw)
        return 0
    for i in range(n if a.stream else 1):
        if n > 1:
            print(f"--- sample {i + 1} ---" if a.stream else "", end="\n" if a.stream else "")
        seed = None if seed0 is None else seed0 + i
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
    _report_speculative(kw)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="prepare Shakespeare, train a small GPT for ~5 minutes, report and sample")
    p.add_argument("--max-time", default="5m", help="training time; default: 5m")
    p.add_argument("--data", default="data/shakespeare-char", help="prepared data directory (made if missing); "
                   "default: data/shakespeare-char")
    p.add_argument("--out", default=None, help="run directory (default: runs/demo, or the next free name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_demo(a: argparse.Namespace) -> int:
    run_demo(data=a.data, out=a.out, max_time=parse_duration(a.max_time) or 300.0, progress=not a.no_progress)
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train and compare model families on the same data and budget",
                       description="Train (or load) each model with the same budget, wall-clock training time "
                                   "(equal compute) or training tokens (equal data), evaluate all on the same "
                                   "split, and write a table (terminal, JSON, CSV) and a chart (PNG).")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--budget", default="5m", metavar="TIME|TOKENS",
                   help="per model: training TIME, a number with s, m/min or h (lowercase m = MINUTES: 5m, 300s, "
                        "1h), or training TOKENS, a number with k/K, M or G (thousand, capital M = MILLION, "
                        "billion) and/or tok/tokens (5M, 200k, 20000tok); 5m and 5M differ only in case. A bare "
                        "number is refused as ambiguous. N-grams count the first N training tokens once. "
                        "Default: 5m")
    p.add_argument("--models", nargs="+", required=True, metavar="FAMILY:ARG",
                   help="e.g. ngram:3 ngram:6 lstm:small gpt:tiny")
    p.add_argument("--out", required=True, help="report directory (runs are kept in OUT/runs and reused when "
                   "trained under the same budget)")
    p.add_argument("--split", default="test", choices=["val", "test"], help="split to score; default: test")
    p.add_argument("--eval-max-tokens", type=int, default=None, help="score at most this many tokens per model")
    p.add_argument("--force", action="store_true",
                   help="replace the report (table.txt, compare.json/csv/png) of an earlier comparison in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_compare)


def cmd_compare(a: argparse.Namespace) -> int:
    budget = Budget.parse(a.budget)
    for m in a.models:  # fail fast, before any training
        ModelSpec.parse(m)
    compare(a.data, budget, a.models, a.out, split=a.split, progress=not a.no_progress,
            eval_max_tokens=a.eval_max_tokens, force=a.force, device=a.device)
    return 0


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model (REPL, or one shot with --chat)")
    p.add_argument("model", help="run directory, Hugging Face directory, .gguf file, or smollm2")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--template", default=None, metavar="NAME|FILE",
                   help="chat template: a built-in name (chatml, simple) or a Jinja file, rendered sandboxed "
                        "(default: the model's own; without one the model continues your text)")
    p.add_argument("--chat", default=None, metavar="MESSAGE", help="one message, print the reply, exit")
    _add_decoding_options(p, CHAT_DEFAULTS, only=("max_new_tokens", "temperature", "top_k", "top_p",
                                                  "repetition_penalty", "seed", "compile", "speculative",
                                                  "draft_tokens"))
    p.add_argument("--adapter", default=None, metavar="RUN", help=ADAPTER_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_chat)


def cmd_chat(a: argparse.Namespace) -> int:
    kw = _generation_kwargs(a)
    model = _load_for_decoding(a.model, a)
    session = open_session(model, a.template, system=a.system, **kw)
    if not session.chat:
        print(f"lmforge: {no_template_message(a.model)}; meanwhile the model continues each message",
              file=sys.stderr)
    if a.chat is not None:
        print(session.ask(a.chat))
        _report_speculative(kw)
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
    p.add_argument("--dtype", default="fp32", choices=DECODE_CHOICES,
                   help="weights for decoding (auto: fp32 or bf16, whichever is measured faster here); default: fp32")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--force", action="store_true", help="replace the --output file if it exists")
    p.set_defaults(func=cmd_translate, options=add_options(p, TranslateConfig, defaults=TRANSLATE_DEFAULTS))


TRANSLATE_DEFAULTS = {"beam": 4}


def cmd_translate(a: argparse.Namespace) -> int:
    if bool(a.text) == bool(a.input):
        raise LMForgeError("give the source text as arguments or --input FILE (not both)")
    if a.output:
        check_output_file(a.output, a.force)  # before any decoding
    c = TranslateConfig(**{**TRANSLATE_DEFAULTS, **given(a, a.options)})
    model = on_device(load_model(a.run), a.device)
    require_seq2seq(model, a.run)
    model = _with_dtype(model, a.dtype)
    if a.input:

        raw = sys.stdin.read() if a.input == "-" else read_text_file(Path(a.input))
        texts = raw.splitlines()
        empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise LMForgeError(f"{a.input} line {empty[0]} is empty; give one source per line")
    else:
        texts = a.text
    t0 = time.perf_counter()
    outs = translate(model, texts, beam=c.beam, batch_size=c.batch_size, length_penalty=c.length_penalty,
                     early_stopping=c.early_stopping, n_best=c.n_best, max_new_tokens=c.max_new_tokens,
                     on_long=c.on_long, progress=bool(a.input) and a.output is not None)
    dt = time.perf_counter() - t0
    lines = []
    for o in outs:
        if c.n_best > 1:
            lines.extend(f"{k + 1}\t{score:.4f}\t{text}" for k, (text, score) in enumerate(o))
        else:
            lines.append(o)
    if a.output:

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
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--merge", action="store_true",
                   help="RUN is a LoRA run: write its base model with the adapter merged into the weights")
    p.add_argument("--adapter", default=None, metavar="RUN", help=ADAPTER_HELP + " (merged)")
    p.set_defaults(func=cmd_export)


def cmd_export(a: argparse.Namespace) -> int:
    if is_adapter_dir(a.run) and not a.merge:
        raise LMForgeError(f"{a.run} holds a LoRA adapter (PEFT format, loadable with peft on the base model's "
                           "export); add --merge to write the base with the adapter merged in")
    out = export_hf(_load(a.run, a.adapter), a.out)  # type: ignore[arg-type]
    print(f"exported {a.run} -> {out} (transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


SERVE_ONLY = ("host", "port", "api_key", "max_body")  # ServeConfig fields that batch jobs do without


def _add_serve_options(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> list[str]:
    """The model, ``--template`` and the flags declared on lmforge.serve.ServeConfig."""
    p.add_argument("model", help="run directory, Hugging Face directory, .gguf file, or smollm2")
    p.add_argument("--template", default=None, metavar="NAME|FILE",
                   help="chat template: a built-in name (chatml, simple) or a Jinja file, rendered sandboxed "
                        "(default: the model's own; without one, chat requests get HTTP 400)")
    return add_options(p, ServeConfig, exclude=exclude)


def serve_config_from_args(a: argparse.Namespace) -> ServeConfig:
    opts = given(a, a.options)
    if "api_key" in a.options and "api_key" not in opts and os.environ.get("LMFORGE_API_KEY"):
        opts["api_key"] = os.environ["LMFORGE_API_KEY"]
    if a.template is not None:
        tpl, stop = load_template(a.template)
        opts.update(chat_template=tpl.text, chat_stop=stop)
    return ServeConfig(model=a.model, **opts)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching and a web page",
                       description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, /tokenize, "
                                   "/detokenize, /v1/models, /health, /metrics, and a chat page at /.")
    p.set_defaults(func=cmd_serve, options=_add_serve_options(p))


def cmd_serve(a: argparse.Namespace) -> int:
    server = Server(serve_config_from_args(a), log_level="info")
    print(f"lmforge: serving {a.model} on {server.url} (web page at {server.url}/, OpenAI API at "
          f"{server.url}/v1); loading the model...", file=sys.stderr, flush=True)
    server.run()
    return 0


def _add_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="run an OpenAI batch file (JSONL requests) through the batching engine",
                       description="Each input line is {custom_id, method, url, body} (OpenAI's batch format, url "
                                   "/v1/completions or /v1/chat/completions). Results are appended to --output as "
                                   "they finish; a rerun skips custom_ids already there.")
    options = _add_serve_options(p, exclude=SERVE_ONLY)
    p.add_argument("--input", required=True, help="requests, one JSON object per line")
    p.add_argument("--output", required=True, help="results file (JSONL; appended to when resuming)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch, options=options)


def cmd_batch(a: argparse.Namespace) -> int:
    s = run_batch(serve_config_from_args(a), a.input, a.output, progress=not a.no_progress)
    print(f"{s['done']} requests done ({s['failed']} failed), {s['skipped']} already in {a.output}, "
          f"{s['completion_tokens']:,} tokens generated in {s['seconds']:.1f}s "
          f"({s['completion_tokens'] / max(s['seconds'], 1e-9):,.1f} tokens/s) -> {a.output}", file=sys.stderr)
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="per-token surprisal, attention maps and logit lens as one offline HTML page",
                       description="Score a text with any model and look inside: tokens coloured by surprisal or "
                                   "rank, attention (Transformers), logit lens, n-gram back-off, RNN state norm.")
    p.add_argument("run", help="run directory, Hugging Face directory, GGUF file or smollm2")
    p.add_argument("--text", default=None, help="the text to inspect (a seq2seq model: the target; default: "
                                                "its own greedy translation of --source)")
    p.add_argument("--file", default=None, help="read the text from this UTF-8 file instead")
    p.add_argument("--source", default=None, help="seq2seq models: the source sentence")
    p.add_argument("--html", default=None, help="write the report as one offline HTML page here")
    p.add_argument("--json", default=None, help="write the report's arrays as JSON here (attention in bertviz's "
                                                "per-layer (heads, dest, src) shape)")
    p.add_argument("--top-k", type=int, default=10, help="alternatives listed for each token (default 10)")
    p.add_argument("--layers", default=None, help="attention/logit-lens layers to keep, e.g. 0,3,5-7 or -1 "
                                                  "(default all)")
    p.add_argument("--heads", default=None, help="attention heads to keep, e.g. 0-3 (default all)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride for texts longer than the "
                                                            "context (as lmforge eval --stride)")
    p.add_argument("--force", action="store_true", help="replace existing --html/--json files")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(a: argparse.Namespace) -> int:
    import lmforge  # the facade: inspect() also writes the HTML/JSON files

    from .data.corpora import read_text_file

    if a.text is not None and a.file is not None:
        raise LMForgeError("give --text or --file, not both")
    text = read_text_file(Path(a.file)) if a.file else a.text
    if text is None and a.source is None:
        raise LMForgeError("give the text to inspect: --text \"...\" or --file FILE (seq2seq: --source)")
    rep = lmforge.inspect(a.run, text, source=a.source, html=a.html, json=a.json, top_k=a.top_k, layers=a.layers,
                          heads=a.heads, stride=a.stride, force=a.force)
    s = rep["summary"]
    print(f"{a.run}: {s['tokens']:,} tokens, loss {s['loss']:.4f} nats/token, perplexity {s['perplexity']:.3f}, "
          f"{s['bits_per_byte']:.4f} bits/byte; rank top 10/100/1000/beyond: "
          f"{'/'.join(str(c) for c in s['rank_histogram'])}")
    for path in (a.html, a.json):
        if path:
            print(f"wrote {path}")
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
    _add_inspect(sub)
    _add_serve(sub)
    _add_batch(sub)
    ngram_cli.add_ngram_parser(sub)
    return parser


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    return f"lmforge: warning: {message}\n"


_REPORTED_CODE: list[int | None] = [None]  # the exit code to report to the `--nproc` launcher, if not the own


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # while parsing or importing, before the command's own handling
        print("\nlmforge: interrupted", file=sys.stderr)
        code = 130
    exit_file = os.environ.get("LMFORGE_EXIT_FILE")  # set by `lmforge train --nproc` (train/launch.py)
    if exit_file:
        if os.environ.get("RANK", "0") == "0":
            Path(exit_file).write_text(str(_REPORTED_CODE[0] or code))
        if code == 2:  # an error every rank agreed on, already said in one line: the launcher returns 2,
            return 0   # and torchrun need not add its report of failed workers
    return code


def _main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning  # type: ignore[assignment]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except LMForgeError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets the error; rank 0 says it
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
