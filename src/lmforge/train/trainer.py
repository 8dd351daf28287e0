"""The training loop, shared by every gradient-trained family.

nanoGPT's loop with the production parts a user needs: AdamW with weight-decay groups (fused when
PyTorch has it), warmup + cosine/linear schedule over a step or wall-clock budget, gradient
accumulation and clipping, bf16 autocast, optional torch.compile, periodic validation, a progress
bar with loss, tokens/s and ETA, ``metrics.jsonl`` + ``loss_curve.png``, and atomic checkpoints
that resume on exactly the same trajectory (weights, optimizer moments, RNG and data-sampler
state are all restored). Ctrl-C saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data import BatchSampler, StreamSampler
from ..data.parallel import ParallelBatchSampler, ParallelData, load_data
from ..errors import LMForgeError
from ..evaluate import evaluate
from ..models import create_model, model_class
from ..utils import (
    atomic_write_json,
    atomic_write_text,
    human,
    native_bf16,
    read_jsonl,
    refuse_nonempty,
    resolve_dtype,
)
from .checkpoint import find_checkpoint, load_checkpoint, read_state, save_checkpoint
from .config import TrainConfig
from .schedule import learning_rate


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C once the checkpoint is safely on disk."""

    def __init__(self, run_dir: Path, step: int, command: str = "train") -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved. Continue with: "
                         f"lmforge {command} --resume {run_dir}")
        self.run_dir, self.step = run_dir, step


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens_seen: int
    train_time: float
    train_loss: float
    val_loss: float | None
    tokens_per_second: float


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_batch_fits(batch_size: int, block_size: int, vocab_size: int) -> None:
    """Refuse a batch whose logits alone (fp32 logits, their softmax and gradient: 12 bytes per entry, a lower
    bound of what a step allocates) exceed the machine's memory, before any file is written."""
    need, have = 12 * batch_size * block_size * vocab_size, physical_memory()
    if have and need > have:
        raise LMForgeError(f"--batch-size {batch_size} cannot fit in memory: its logits alone ({batch_size} x "
                           f"{block_size} tokens x {vocab_size} vocab) need {need / 2**30:.0f} GiB and this machine "
                           f"has {have / 2**30:.0f} GiB; use a smaller --batch-size (--grad-accum keeps the "
                           "effective batch)")


class Trainer:
    """Subclasses (fine-tuning: ``train/finetune.py``) replace ``build`` (data and model), ``_sampler``,
    ``batch_loss``, ``estimate_loss`` and ``save_model``; the loop, checkpoints and logging stay shared."""

    config_class: type[TrainConfig] = TrainConfig
    command = "train"  # the CLI command that resumes a run
    validate_at_start = False  # log the validation loss before the first step (fine-tuning: the base's loss)

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.dtype == "bf16" and not native_bf16():
            warnings.warn("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated and slower than fp32; "
                          "use --dtype auto or fp32", stacklevel=2)
        self.bf16 = resolve_dtype(cfg.dtype) == "bf16"  # `auto` decided once, not at every step
        if not resume:
            refuse_nonempty(self.run_dir, f"continue it with lmforge {self.command} --resume {self.run_dir}, or "
                            "choose another --out")
        torch.manual_seed(cfg.seed)
        self.stateful = False
        #: what checkpoints hold: the whole model (default), or only what trains (LoRA adapters)
        self.checkpoint_module: torch.nn.Module | None = None
        self.build()
        if self.checkpoint_module is None:
            self.checkpoint_module = self.model
        self.optimizer = make_optimizer(self.model, cfg)
        self.train_sampler = self._sampler("train", cfg.seed)
        self.carry: Any = None  # the carried recurrent state
        self.has_val = self.data.has_split("val")
        self.step = 0
        self.step_tokens = 0
        self.tokens_seen = 0
        self.train_time = 0.0
        self.time_budget_total: float | None = None
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.last_loss = float("nan")
        if resume:
            self._resume()
        if cfg.compile:
            # torch.compile's inductor imports torch.fx.experimental.optimization -> torch.utils.mkldnn, whose
            # classes use the deprecated @torch.jit.script_method: a warning from inside torch (2.13) about
            # torch's own code, once per compiled graph, that a user can do nothing about.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated",
                                    category=DeprecationWarning)
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    def build(self) -> None:
        """Data (``self.data``, ``self.tokenizer``) and a fresh model (``self.model``, ``self.block_size``)."""
        cfg = self.cfg
        self.data = load_data(cfg.data)
        self.tokenizer = self.data.tokenizer
        # Encoder-decoder models learn from parallel pairs, language models from token streams.
        self.seq2seq = model_class(cfg.model).is_seq2seq  # validates the name early
        parallel = isinstance(self.data, ParallelData)
        if self.seq2seq and not parallel:
            raise LMForgeError(f"--model {cfg.model} needs parallel data: prepare it from a parallel corpus (de-en, "
                               f"code-doc, a .tsv, or --target-file); {cfg.data} holds a token stream")
        if parallel and not self.seq2seq:
            raise LMForgeError(f"{cfg.data} holds parallel (source, target) pairs, which only --model seq2seq can "
                               f"learn from; prepare a text corpus for --model {cfg.model}")
        model_args = dict(cfg.model_args)
        if parallel:
            model_args.setdefault("source_vocab_size", self.data.source_vocab_size)
        else:
            n_train = len(self.data.split("train"))
            block = cfg.model_args.get("block_size")
            if block is not None and block + 2 > n_train:  # checked before allocating a huge model
                raise LMForgeError(f"block size {block} is larger than the data ({n_train} training tokens); "
                                   "use a smaller --block-size or more data")
        self.model = create_model(cfg.model, self.data.vocab_size, cfg.preset, **model_args)
        self.model.tokenizer = self.tokenizer
        if parallel:
            self.model.source_tokenizer = self.data.source_tokenizer
        self.block_size = self.model.context_length or self.model.config.block_size  # RNNs: the TBPTT window
        check_batch_fits(cfg.batch_size, self.block_size, self.data.vocab_size)
        # Stateful models (RNNs) read consecutive windows and carry their hidden state (TBPTT);
        # Transformers read random windows (nanoGPT's get_batch).
        self.stateful = self.model.stateful

    # --- resume --------------------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt = find_checkpoint(self.run_dir)
        if ckpt is None:
            raise LMForgeError(f"{self.run_dir} has no checkpoint to resume from")
        state, rng = load_checkpoint(ckpt, self.checkpoint_module, self.optimizer)
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.train_time = state["train_time"]
        self.best_val = state.get("best_val")
        self.last_val = state.get("last_val")
        torch.set_rng_state(rng["torch"])
        self.train_sampler.load_state_dict(rng["sampler"])
        if rng.get("carry") is not None:
            carry = rng["carry"]
            self.carry = tuple(carry) if isinstance(carry, list) else carry
        # A time budget given on resume is extra time on top of what was already spent.
        if self.cfg.max_time is not None:
            self.time_budget_total = self.train_time + self.cfg.max_time

    @classmethod
    def config_for_resume(cls, run_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise LMForgeError(f"cannot resume: {run_dir} is not a directory")
        ckpt = find_checkpoint(run_dir)
        if ckpt is None:
            raise LMForgeError(f"cannot resume: {run_dir} is not a run directory with a checkpoint")
        d = dict(read_state(ckpt)["config"])
        d.update({k: v for k, v in overrides.items() if v is not None})
        if "max_time" in overrides and overrides["max_time"] is not None and "max_steps" not in overrides:
            d["max_steps"] = None
        d["out"] = str(run_dir)
        return cls.config_class.from_dict(d, strict=False)  # runs of older versions may record retired options

    # --- helpers -------------------------------------------------------------------------------
    def _sampler(self, split: str, seed: int, warn: bool = True) -> Any:
        if self.seq2seq:
            c = self.model.config  # type: ignore[attr-defined]
            return ParallelBatchSampler(self.data.split(split), self.cfg.batch_size, c.max_source_length,
                                        c.max_target_length, self.tokenizer.eot_id,
                                        self.data.source_tokenizer.eot_id, seed, warn=warn)
        sampler_cls = StreamSampler if self.stateful else BatchSampler
        return sampler_cls(self.data.split(split), self.cfg.batch_size, self.block_size, seed)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def progress(self) -> float:
        """Share of the budget used, in [0, 1]: the larger of steps and time."""
        p = 0.0
        if self.cfg.max_steps:
            p = max(p, self.step / self.cfg.max_steps)
        total = self.time_budget_total or self.cfg.max_time
        if total:
            p = max(p, self.train_time / total)
        return min(p, 1.0)

    def done(self) -> bool:
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            return True
        total = self.time_budget_total or self.cfg.max_time
        return total is not None and self.train_time >= total

    @torch.no_grad()
    def estimate_loss(self, split: str = "val") -> float:
        """Mean loss over ``eval_iters`` fixed batches (same batches every time: smooth curves)."""
        if self.stateful:  # read a fixed prefix of the split as streams, carrying the state

            n = self.cfg.eval_iters * self.cfg.batch_size * self.block_size
            res = evaluate(self.model, self.data, split, batch_size=self.cfg.batch_size, max_tokens=n,
                           chunk=self.block_size)
            self.model.train()
            return res["loss"]
        sampler = self._sampler(split, 12345, warn=False)
        self.model.eval()
        losses = []
        with self._autocast():
            for _ in range(self.cfg.eval_iters):
                losses.append(self.batch_loss(sampler.next()).item())
        self.model.train()
        return sum(losses) / len(losses)

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def save(self) -> None:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "train_time": self.train_time,
                 "best_val": self.best_val, "last_val": self.last_val, "train_loss": self.last_loss,
                 "config": self.cfg.to_dict()}
        carry = list(self.carry) if isinstance(self.carry, tuple) else self.carry
        rng = {"torch": torch.get_rng_state(), "sampler": self.train_sampler.state_dict(), "carry": carry}
        save_checkpoint(self.run_dir, self.checkpoint_module, self.optimizer, rng, state)
        self.save_model()
        atomic_write_text(self.run_dir / "train_config.yaml", self.cfg.to_yaml())

    def save_model(self) -> None:
        """The top level of the run: a loadable model (Hugging Face's save_pretrained layout)."""
        self.model.save_pretrained(self.run_dir)
        atomic_write_json(self.run_dir / "data.json", {"data": str(Path(self.cfg.data).resolve()),
                                                       "corpus_sha256": self.data.meta["corpus"]["sha256"]})

    # --- the loop ------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.step == 0:
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            self._log({"event": "start", "params": self.model.num_parameters(), "config": cfg.to_dict()})
            if self.validate_at_start and self.has_val:
                self._validate()
            self.save()  # a run directory is loadable from the first moment
        else:
            self._truncate_metrics()
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.block_size
        ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
        min_lr = cfg.lr * cfg.min_lr_ratio
        by_time = cfg.max_steps is None
        total = self.time_budget_total or cfg.max_time
        bar = tqdm(total=round(total) if by_time else cfg.max_steps,
                   initial=round(self.train_time) if by_time else self.step,
                   unit="s" if by_time else "step", desc=f"train {self.run_dir.name}", disable=not cfg.progress,
                   dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]"
                   "{postfix}")
        window_tokens, window_time = 0, 0.0
        try:
            while not self.done():
                t0 = time.perf_counter()
                lr = learning_rate(self.step, self.progress(), cfg.lr, min_lr, cfg.warmup_steps, cfg.schedule,
                                   cfg.cooldown_frac)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                try:
                    self.last_loss = self.train_step()
                except (MemoryError, RuntimeError) as e:  # a failed allocation: bad input, not a bug
                    if isinstance(e, RuntimeError) and "allocate" not in str(e):
                        raise
                    raise LMForgeError(f"out of memory in a training step at --batch-size {cfg.batch_size} x "
                                       f"{self.block_size} tokens; use a smaller --batch-size (--grad-accum keeps "
                                       "the effective batch)") from None
                dt = time.perf_counter() - t0
                self.step += 1
                self.train_time += dt
                step_tokens = self.step_tokens or tokens_per_step
                self.tokens_seen += step_tokens
                if not math.isfinite(self.last_loss):
                    raise LMForgeError(f"loss became {self.last_loss} at step {self.step}; lower --lr "
                                       "(the last good checkpoint is kept)")
                window_tokens += step_tokens
                window_time += dt
                if self.step % cfg.log_interval == 0 or self.step == 1:
                    tps = window_tokens / max(window_time, 1e-9)
                    self._log({"step": self.step, "loss": round(self.last_loss, 5), "lr": lr,
                               "tokens": self.tokens_seen, "time": round(self.train_time, 3),
                               "tokens_per_s": round(tps, 1)})
                    bar.set_postfix_str(f"loss {self.last_loss:.4f} | {human(tps)} tok/s | lr {lr:.2e}"
                                        + (f" | val {self.last_val:.4f}" if self.last_val is not None else ""))
                    window_tokens, window_time = 0, 0.0
                if self.has_val and self.step % cfg.eval_interval == 0:
                    self._validate()
                if self.step % ckpt_every == 0:
                    self.save()
                if by_time:
                    bar.n = min(round(self.train_time), bar.total)
                    bar.refresh()
                else:
                    bar.update(1)
        except KeyboardInterrupt:
            bar.close()
            self.save()
            self._plot()
            raise TrainingInterrupted(self.run_dir, self.step, self.command) from None
        bar.close()
        if self.has_val and (self.last_val is None or self.step % cfg.eval_interval):
            self._validate()
        self.save()
        self._plot()
        return TrainResult(self.run_dir, self.step, self.tokens_seen, self.train_time, self.last_loss,
                           self.last_val, self.tokens_seen / max(self.train_time, 1e-9))

    def train_step(self) -> float:
        """One optimizer step (with gradient accumulation); returns the mean training loss."""
        cfg = self.cfg
        loss_sum = 0.0
        self.step_tokens = 0  # tokens actually trained on (target tokens of a seq2seq batch), 0 = fixed windows
        for _ in range(cfg.grad_accum):
            batch = self.train_sampler.next()
            self.step_tokens += self.train_sampler.last_tokens
            with self._autocast():
                loss = self.batch_loss(batch)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / cfg.grad_accum

    def batch_loss(self, batch: tuple) -> torch.Tensor:
        """The mean loss of one sampled batch (carrying a recurrent model's state across windows)."""
        x, y = batch
        if self.stateful:
            if self.train_sampler.wrapped:
                self.carry = None
            _, loss, carry = self.forward(x, y, state=self.carry)
            self.carry = self.model.detach_state(carry)  # truncate BPTT at the window edge
            return loss
        return self.forward(x, y)[1]

    def _validate(self) -> None:
        self.last_val = self.estimate_loss("val")
        self.best_val = self.last_val if self.best_val is None else min(self.best_val, self.last_val)
        self._log({"step": self.step, "val_loss": round(self.last_val, 5), "time": round(self.train_time, 3),
                   "tokens": self.tokens_seen})

    def _truncate_metrics(self) -> None:
        """On resume, drop log lines written after the checkpoint (they will be re-run)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [json.dumps(rec) for rec in read_jsonl(path)
                if isinstance(rec.get("step", 0), int) and rec.get("step", 0) <= self.step]
        atomic_write_text(path, "\n".join(keep) + ("\n" if keep else ""))
        self._log({"event": "resume", "step": self.step})

    def _plot(self) -> None:
        try:
            from ..viz.plots import plot_loss_curve  # matplotlib costs ~0.5 s; only the end-of-run plot needs it

            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png",
                            title=f"{self.run_dir.name}: {self.cfg.model} on {Path(self.cfg.data).name}")
        except Exception as e:  # a plot must never cost a finished run
            print(f"lmforge: warning: could not draw the loss curve ({e})")


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    return Trainer(cfg, resume=resume).train()
