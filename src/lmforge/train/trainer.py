"""The training loop, written once for every gradient-trained family, from one CPU to many GPUs.

nanoGPT's loop with the production parts a user needs: AdamW with weight-decay groups (fused when
PyTorch has it), warmup + cosine/linear schedule over a step, wall-clock or token budget, gradient
accumulation and clipping, autocast (bf16, or fp16 with a gradient scaler), optional torch.compile,
periodic validation, a progress bar with loss, tokens/s and ETA, ``metrics.jsonl`` +
``loss_curve.png``, and atomic checkpoints that resume on exactly the same trajectory.

Every family trains through one method, ``model.loss((inputs, labels), state)`` (see
``models/base.py``), so the step, validation and accumulation below never branch on the family;
stateful families (RNNs) get their carried state back. Under ``torchrun`` the same loop runs in
every process (``distributed.py``: DDP or FSDP2; rank 0 alone writes); each optimizer step trains
on one *global batch* of ``batch_size x grad_accum x world`` sequences whose micro-batches are split
among the ranks deterministically (``data.Sampler``), and every micro-batch's loss is weighted by
its share of the global batch's target tokens, so any world size follows the same trajectory.

Stopping: SIGINT (Ctrl-C) and SIGTERM set a flag that the loop reads at the next step boundary
(agreed among ranks with the step's loss), so the checkpoint it then saves is exactly the state
between two steps; a KeyboardInterrupt raised inside a step (no handler installed, e.g. outside the
main thread) rolls the sampler, RNG and carried state back to the step's start before saving.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from ..data import BatchSampler, StreamSampler, check_run_data, data_fingerprint
from ..data.parallel import ParallelBatchSampler, ParallelData, load_data
from ..errors import LMForgeError
from ..models import create_model, model_class
from ..models.weights import state_dict_for_saving
from ..utils import (
    DirectoryLock,
    atomic_write_json,
    atomic_write_text,
    human,
    native_bf16,
    read_jsonl,
    refuse_nonempty,
    resolve_dtype,
    retain_freed_memory,
)
from .checkpoint import find_checkpoint, init_optimizer_state, load_checkpoint, read_state, save_checkpoint
from .config import TrainConfig
from .distributed import autocast_dtype, gradient_sync, setup, wrap
from .optim import MuonAdamW
from .schedule import learning_rate


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C or SIGTERM once the checkpoint is safely on disk."""

    def __init__(self, run_dir: Path, step: int, signum: int = signal.SIGINT, is_main: bool = True,
                 command: str = "train") -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}; checkpoint saved. Continue with: "
                         f"lmforge {command} --resume {run_dir}")
        self.run_dir, self.step, self.signum, self.is_main = run_dir, step, signum, is_main


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens_seen: int
    train_time: float
    train_loss: float
    val_loss: float | None
    tokens_per_second: float
    is_main: bool = True  # rank 0 (the process that reports)


class StopSignals:
    """While active, SIGINT and SIGTERM only record that a stop was asked for; the loop stops at the
    next step boundary. Handlers can only be installed in the main thread; elsewhere Ctrl-C stays a
    KeyboardInterrupt (which the loop also handles)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum  # repeats (torchrun forwards the terminal's SIGINT) change nothing

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def make_optimizer(model: Any, cfg: TrainConfig, fused: bool, ns_dtype: torch.dtype = torch.float32
                   ) -> torch.optim.Optimizer:
    """AdamW, or Muon + AdamW; ``ns_dtype``: Muon's Newton-Schulz iterations run in bf16 when the steps do (where
    bf16 matmuls are the faster ones: what ``--dtype auto`` measured), as the reference implementation does."""
    groups = model.param_groups(cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if cfg.optimizer == "muon":
        hidden = [p for p in model.hidden_matrices() if p.requires_grad]
        if not hidden:
            raise LMForgeError(f"--optimizer muon: a {model.model_type} model declares no hidden weight matrices for "
                               "Muon; use --optimizer adamw")
        ids = {id(p) for p in hidden}
        groups = [dict(g, params=[p for p in g["params"] if id(p) not in ids]) for g in groups]
        # no weight decay on the Muon matrices: at lr 0.02 it would shrink them e^-0.002 per step, far more
        # than AdamW's lr x wd, and short CPU runs do not need the regularisation
        groups.append({"params": hidden, "weight_decay": 0.0, "muon": True, "lr": cfg.muon_lr,
                       "lr_scale": cfg.muon_lr / cfg.lr})
        return MuonAdamW([g for g in groups if g["params"]], ns_dtype=ns_dtype, **kw)
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
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


def _to(x: Any, device: torch.device) -> Any:
    """A batch (a tensor or a dict of tensors) on ``device``: pinned, non-blocking copies to a GPU."""
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _leaves(state: Any) -> list[torch.Tensor]:
    if state is None:
        return []
    return [state] if isinstance(state, torch.Tensor) else list(state)


class Trainer:
    """Subclasses (fine-tuning: ``train/finetune.py``) replace ``build`` (data and model), ``_sampler``,
    ``estimate_loss`` and ``save_model``; the loop, the step, checkpoints and logging stay shared."""

    config_class: type[TrainConfig] = TrainConfig
    command = "train"  # the CLI command that resumes a run
    validate_at_start = False  # log the validation loss before the first step (fine-tuning: the base's loss)

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        cfg.validate()
        retain_freed_memory()  # every step reuses the last one's activation memory instead of faulting it in
        self.cfg = cfg
        self.run_lock: DirectoryLock | None = None
        self.data_lock: DirectoryLock | None = None
        self.rt = setup(cfg.device, cfg.strategy, cfg.backend)
        try:
            with self.rt.collectively():
                self._build(resume)
            if resume:
                self._resume()
        except BaseException:
            self._release()
            self.rt.close()
            raise

    # --- construction --------------------------------------------------------------------------
    def _build(self, resume: bool) -> None:
        cfg, rt = self.cfg, self.rt
        self.run_dir = Path(cfg.out)
        if not rt.is_main:
            warnings.filterwarnings("ignore")  # rank 0 speaks for all
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.dtype == "bf16" and rt.device.type == "cpu" and not native_bf16() and rt.is_main:
            warnings.warn("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated and slower than fp32; "
                          "use --dtype auto or fp32", stacklevel=3)
        dtype = cfg.dtype
        if dtype == "auto" and rt.device.type == "cpu":  # measured once, by rank 0; every rank follows its choice
            dtype = rt.broadcast(resolve_dtype("auto", "train", rt.device) if rt.is_main else None)
        self.amp_dtype = autocast_dtype(dtype, rt.device)  # decided once, not every step
        #: the precision the steps run in (``auto`` resolved), recorded in metrics.jsonl's start/resume events
        self.precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=self.amp_dtype == torch.float16)
        # Batch arithmetic: the global batch is fixed by the run; accumulation fills it on any world size.
        if cfg.global_batch:
            per_step = cfg.batch_size * rt.world
            if cfg.global_batch % per_step:
                raise LMForgeError(f"the global batch of {cfg.global_batch} sequences does not divide among "
                                   f"{rt.world} process(es) x --batch-size {cfg.batch_size}; make it a multiple "
                                   f"of {per_step}")
            self.accum = cfg.global_batch // per_step
        else:
            self.accum = cfg.grad_accum
        self.global_batch = cfg.batch_size * self.accum * rt.world
        cfg.grad_accum, cfg.global_batch = self.accum, self.global_batch  # recorded in the run
        # The data: a shared lock keeps `prepare --out DATA` from rewriting it under a running run.
        if Path(cfg.data).is_dir():
            self.data_lock = DirectoryLock(cfg.data, shared=True, busy=f"data directory {cfg.data} is being "
                                           "rewritten by lmforge prepare; wait for it to finish")
        if rt.is_main:
            self._claim_run_dir(resume)
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        #: what checkpoints hold: the whole model (default), or only what trains (LoRA adapters)
        self.checkpoint_module: torch.nn.Module | None = None
        self.build()
        if self.checkpoint_module is None:
            self.checkpoint_module = self.model
        if rt.strategy == "fsdp" and cfg.optimizer == "muon":
            raise LMForgeError("--optimizer muon orthogonalises whole matrices and FSDP shards them across processes; "
                               "use --strategy ddp (or none) with Muon, or --optimizer adamw with FSDP")
        if rt.strategy == "fsdp" and not self.model.shard_units():
            raise LMForgeError(f"--strategy fsdp shards Transformer blocks, and a {cfg.model} model has none; use "
                               "--strategy ddp")
        self.stateful = self.model.stateful
        # Stateful models (RNNs) read consecutive windows of global-batch-many streams and carry their
        # hidden state (TBPTT); Transformers read random windows (nanoGPT's get_batch).
        self.train_sampler = self._sampler("train", cfg.seed, n_streams=self.global_batch)
        self.has_val = self.data.has_split("val")
        if self.stateful and self.has_val:
            self._sampler("val", 0, n_streams=self.global_batch)  # a too-small val split fails now, not later
        self.save_keys = list(state_dict_for_saving(self.model))  # top-level file: tied tensors once
        self.model.to(rt.device)
        self.wrapped = wrap(rt, self.model)
        # Evaluation skips DDP's wrapper (no gradient sync; buffers need no broadcast); FSDP must all-gather.
        self.loss_step = self.wrapped.module if rt.strategy == "ddp" else self.wrapped
        self.optimizer = make_optimizer(self.model, cfg, fused=rt.strategy != "fsdp",
                                        ns_dtype=torch.bfloat16 if self.amp_dtype == torch.bfloat16 else torch.float32)
        init_optimizer_state(self.optimizer)
        torch.manual_seed(cfg.seed + 1 + rt.rank)  # dropout masks differ between ranks
        self.carry: list[Any] = [None] * self.accum  # the carried recurrent state of each micro-batch
        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0
        self.time_budget_total: float | None = None
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.last_loss = float("nan")
        self.saved_step = -1
        self.fresh = not resume
        if cfg.compile:
            # torch.compile's inductor imports torch.fx.experimental.optimization -> torch.utils.mkldnn, whose
            # classes use the deprecated @torch.jit.script_method: a warning from inside torch (2.13) about
            # torch's own code, once per compiled graph, that a user can do nothing about.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated",
                                    category=DeprecationWarning)
        self.step_fn, self.eval_fn = self.compile_steps() if cfg.compile else (self.wrapped, self.wrapped)

    def compile_steps(self) -> tuple[Any, Any]:
        """``--compile``: the training and evaluation steps, each compiled whole (one graph of the model)."""
        step = torch.compile(self.wrapped)
        return step, torch.compile(self.loss_step) if self.loss_step is not self.wrapped else step

    def build(self) -> None:
        """Data (``self.data``, ``self.tokenizer``) and a fresh model (``self.model``, ``self.block_size``,
        ``self.seq2seq``)."""
        cfg, rt = self.cfg, self.rt
        self.data = load_data(cfg.data)
        self.tokenizer = self.data.tokenizer
        cls = model_class(cfg.model)  # validates the name early
        self.seq2seq = cls.is_seq2seq
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
        self.model: Any = create_model(cfg.model, self.data.vocab_size, cfg.preset, **model_args)
        self.model.tokenizer = self.tokenizer
        if parallel:
            self.model.source_tokenizer = self.data.source_tokenizer
        self.block_size = self.model.context_length or self.model.config.block_size  # RNNs: the TBPTT window
        if rt.device.type == "cpu":
            check_batch_fits(cfg.batch_size, self.block_size, self.data.vocab_size)

    def _claim_run_dir(self, resume: bool) -> None:
        """Rank 0: lock the run directory (resume) or check that a new one may be created."""
        out = self.run_dir
        if resume:
            self.run_lock = DirectoryLock(out, busy=f"run directory {out} is in use by another lmforge process "
                                          "(a training run); wait for it to finish or stop it")
            problem = check_run_data(out, self.cfg.data)
            if problem:
                raise LMForgeError(f"cannot resume: {problem}; resuming would train on other tokens. Prepare the "
                                   "original data again, or start a new run")
            return
        refuse_nonempty(out, f"continue it with lmforge {self.command} --resume {out}, or choose another --out")
        # A start killed before its first checkpoint left a hidden sibling that nobody holds: remove it.
        for stale in out.parent.glob(f".{out.name}.start-*") if out.parent.is_dir() else []:
            if not DirectoryLock.is_held(stale):
                shutil.rmtree(stale, ignore_errors=True)

    def _resume(self) -> None:
        ckpt = self.rt.broadcast(str(find_checkpoint(self.run_dir) or ""))
        self.rt.agree(None if ckpt else f"{self.run_dir} has no checkpoint to resume from")
        ckpt = Path(ckpt)
        state = read_state(ckpt)
        extra = self._extra_template(state)
        state, extra = load_checkpoint(ckpt, self.rt, self.checkpoint_module, self.optimizer, extra)
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.train_time = state["train_time"]
        self.best_val = state.get("best_val")
        self.last_val = state.get("last_val")
        self.saved_step = self.step
        if "legacy_rng" in extra:
            rng = extra["legacy_rng"]
            torch.set_rng_state(rng["torch"])
            self.train_sampler.load_state_dict(rng["sampler"])
            carry = rng.get("carry")
            self.carry[0] = tuple(carry) if isinstance(carry, list) else carry
        else:
            self.train_sampler.load_state_dict(extra["sampler"])
            rng = extra["rng"]
            torch.set_rng_state(rng["cpu"][self.rt.rank % rng["cpu"].shape[0]])
            if "cuda" in rng and self.rt.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"][self.rt.rank % rng["cuda"].shape[0]], self.rt.device)
            self._set_carry(extra.get("carry", {}), state.get("carry_layout"))
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
        budgets = ("max_steps", "max_time", "max_tokens")
        if any(overrides.get(k) is not None for k in budgets):  # a new budget replaces the saved ones
            for k in budgets:
                if overrides.get(k) is None:
                    d[k] = None
        if overrides.get("batch_size") is not None and overrides.get("global_batch") is None:
            d["global_batch"] = d.get("global_batch")  # a new per-process batch keeps the run's global batch
        d["out"] = str(run_dir)
        return cls.config_class.from_dict(d, strict=False)  # runs of older versions may record retired options

    # --- checkpoint contents beyond weights and optimizer --------------------------------------
    def _rng_states(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG state, stacked (rank-indexed): the same tensor on all ranks."""
        states = {"cpu": torch.get_rng_state()}
        if self.rt.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.rt.device)
        gathered = self.rt.all_gather(states)
        return {k: torch.stack([g[k] for g in gathered]) for k in states}

    def _carry_all(self) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """The carried states of all ranks' micro-batches, by global micro-batch index, and their layout."""
        mine = [(isinstance(c, tuple), [t.detach().cpu() for t in _leaves(c)]) for c in self.carry]
        per_rank = self.rt.all_gather(mine) if self.stateful else [mine]
        flat = [c for rank_carry in per_rank for c in rank_carry]
        tensors = {f"{j}.{i}": t for j, (_, c) in enumerate(flat) for i, t in enumerate(c)}
        layout = [[is_tuple, [list(t.shape) for t in c]] for is_tuple, c in flat]  # a tuple (LSTM's h, c) or one tensor
        return tensors, layout

    def _set_carry(self, tensors: dict[str, torch.Tensor], layout: list[Any] | None) -> None:
        if not self.stateful or not layout:
            return
        for k in range(self.accum):
            j = self.rt.rank * self.accum + k
            is_tuple, shapes = layout[j]
            leaves = [tensors[f"{j}.{i}"].to(self.rt.device) for i in range(len(shapes))]
            self.carry[k] = None if not leaves else tuple(leaves) if is_tuple else leaves[0]

    def _extra_template(self, state: dict[str, Any]) -> dict[str, Any]:
        """Tensors of the shapes a checkpoint holds, for DCP to load into."""
        world = int(state.get("world_size", 1))
        rng = {"cpu": torch.zeros((world, torch.get_rng_state().numel()), dtype=torch.uint8)}
        if "cuda_rng" in state.get("rng_devices", []) and self.rt.device.type == "cuda":
            rng["cuda"] = torch.zeros((world, torch.cuda.get_rng_state(self.rt.device).numel()), dtype=torch.uint8)
        layout = state.get("carry_layout") or []
        carry = {f"{j}.{i}": torch.zeros(shape) for j, (_, c) in enumerate(layout) for i, shape in enumerate(c)}
        extra: dict[str, Any] = {"sampler": copy.deepcopy(self.train_sampler.state_dict()), "rng": rng}
        if carry:
            extra["carry"] = carry
        return extra

    # --- helpers -------------------------------------------------------------------------------
    def _sampler(self, split: str, seed: int, warn: bool = True, n_streams: int | None = None) -> Any:
        if self.seq2seq:
            c = self.model.config
            return ParallelBatchSampler(self.data.split(split), self.cfg.batch_size, c.max_source_length,
                                        c.max_target_length, self.tokenizer.eot_id,
                                        self.data.source_tokenizer.eot_id, seed, warn=warn and self.rt.is_main)
        if self.stateful:
            return StreamSampler(self.data.split(split), self.cfg.batch_size, self.block_size, seed,
                                 n_streams=n_streams)
        return BatchSampler(self.data.split(split), self.cfg.batch_size, self.block_size, seed)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is not None:
            return torch.autocast(self.rt.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def progress(self) -> float:
        """Share of the budget used, in [0, 1]: the largest of steps, time and tokens."""
        p = 0.0
        if self.cfg.max_steps:
            p = max(p, self.step / self.cfg.max_steps)
        if self.cfg.max_tokens:
            p = max(p, self.tokens_seen / self.cfg.max_tokens)
        total = self.time_budget_total or self.cfg.max_time
        if total:
            p = max(p, self.train_time / total)
        return min(p, 1.0)

    def _bar_count(self, unit: str) -> int:
        return {"step": self.step, "tok": self.tokens_seen, "s": round(self.train_time)}[unit]

    def done(self) -> bool:
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            return True
        if self.cfg.max_tokens is not None and self.tokens_seen >= self.cfg.max_tokens:
            return True
        total = self.time_budget_total or self.cfg.max_time
        return total is not None and self.train_time >= total

    @torch.no_grad()
    def estimate_loss(self, split: str = "val") -> float:
        """Mean loss per target token over a fixed sample of ``split`` (the same every time: smooth
        curves), shared among the ranks and all-reduced. Random windows: ``eval_iters`` batches dealt
        round-robin; streams (RNNs): ``eval_iters`` consecutive windows of the global batch's streams."""
        rt = self.rt
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # sum of loss x targets, targets
        if self.stateful:
            sampler = self._sampler(split, 0, n_streams=self.global_batch)
            carry: list[Any] = [None] * self.accum
            work = []
            for _ in range(self.cfg.eval_iters):
                work += [(k, b, 1.0) for k, b in enumerate(sampler.step_batches(rt.rank, rt.world, self.accum))]
        else:
            sampler = self._sampler(split, 12345, warn=False)
            work, pad = [], None
            for j in range(self.cfg.eval_iters):
                fsdp_pad = rt.strategy == "fsdp" and j == 0
                b = sampler.draw(read=j % rt.world == rt.rank or fsdp_pad)
                if b is not None and j % rt.world == rt.rank:
                    work.append((0, b, 1.0))
                pad = b if fsdp_pad else pad
            rounds = -(-self.cfg.eval_iters // rt.world)
            while rt.strategy == "fsdp" and len(work) < rounds:  # FSDP: every rank takes part in every forward
                work.append((0, pad, 0.0))  # (weight 0: it only keeps the collectives in step)
        with self._autocast():
            for k, (x, y), weight in work:
                loss, n, state = self.eval_fn(_to(x, rt.device), _to(y, rt.device),
                                              carry[k] if self.stateful else None)
                if self.stateful:
                    carry[k] = state
                total += torch.stack([loss.double() * n, n.double()]) * weight
        rt.all_reduce(total)
        self.model.train()
        return float(total[0] / total[1].clamp(min=1))

    def _log(self, record: dict[str, Any]) -> None:
        if self.rt.is_main:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def save(self) -> None:
        """Collective: the DCP checkpoint (every rank), then the top-level model files (rank 0)."""
        rt, cfg = self.rt, self.cfg
        carry, layout = self._carry_all()
        extra: dict[str, Any] = {"sampler": self.train_sampler.state_dict(), "rng": self._rng_states()}
        if carry:
            extra["carry"] = carry
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "train_time": self.train_time,
                 "best_val": self.best_val, "last_val": self.last_val, "train_loss": self.last_loss,
                 "world_size": rt.world, "strategy": rt.strategy, "global_batch": self.global_batch,
                 "rng_devices": ["cuda_rng"] if "cuda" in extra["rng"] else [], "carry_layout": layout,
                 "config": cfg.to_dict()}
        save_checkpoint(self.run_dir, rt, self.checkpoint_module, self.optimizer, extra, state)
        self.save_model()
        if rt.is_main:
            atomic_write_text(self.run_dir / "train_config.yaml", cfg.to_yaml())
        rt.barrier()
        self.saved_step = self.step

    def save_model(self) -> None:
        """Collective: the top level of the run, a loadable model (Hugging Face's save_pretrained layout)."""
        rt, cfg = self.rt, self.cfg
        weights = None
        if rt.strategy == "fsdp":  # gather the shards into full tensors on rank 0 (collective)
            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            weights = {k: full[k] for k in self.save_keys} if rt.is_main else None
        if rt.is_main:
            # The top level is a loadable model (Hugging Face's save_pretrained layout), on the CPU.
            self.model.save_pretrained(self.run_dir, weights=weights if weights is not None else
                                       {k: v for k, v in self.model.state_dict().items() if k in self.save_keys})
            atomic_write_json(self.run_dir / "data.json", {
                "data": str(Path(cfg.data).resolve()), "corpus_sha256": self.data.meta["corpus"]["sha256"],
                "fingerprint": data_fingerprint(cfg.data)})

    def _start_run_dir(self) -> None:
        """A new run is built in a hidden sibling and renamed into place after its first checkpoint, so
        the run directory is either absent or complete, whenever the process dies."""
        start = None
        if self.rt.is_main:
            out = self.run_dir
            out.parent.mkdir(parents=True, exist_ok=True)
            start = Path(tempfile.mkdtemp(prefix=f".{out.name}.start-", dir=out.parent))
            umask = os.umask(0)
            os.umask(umask)
            start.chmod(0o777 & ~umask)  # mkdtemp makes it private; a run directory is an ordinary one
            self.run_lock = DirectoryLock(start)  # follows the directory through the rename
        self.run_dir = Path(self.rt.broadcast(str(start)))

    def _publish_run_dir(self) -> None:
        out = Path(self.cfg.out)
        error = None
        if self.rt.is_main:
            try:
                os.rename(self.run_dir, out)  # replaces an empty directory; fails on a non-empty one
            except OSError:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                error = f"run directory {out} was created by another process meanwhile; choose another --out"
        self.rt.agree(error)
        self.run_dir = out

    # --- the loop ------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        try:
            with StopSignals() as stop:
                return self._train(stop)
        finally:
            self._release()
            self.rt.close()

    def _release(self) -> None:
        for lock in (self.run_lock, self.data_lock):
            if lock is not None:
                lock.release()

    def _train(self, stop: StopSignals) -> TrainResult:
        cfg, rt = self.cfg, self.rt
        if self.fresh:
            self._start_run_dir()
            self._log({"event": "start", "params": self.model.num_parameters(), "config": cfg.to_dict(),
                       "world_size": rt.world, "strategy": rt.strategy, "device": str(rt.device),
                       "global_batch": self.global_batch, "precision": self.precision})
            if self.validate_at_start and self.has_val:
                self._validate()
            self.save()  # a run directory is loadable from the first moment
            self._publish_run_dir()
        elif rt.is_main:
            self._truncate_metrics()
        if rt.is_main:
            fixed = isinstance(self.train_sampler, (BatchSampler, StreamSampler))  # windows of block_size tokens
            tokens = f" ({self.global_batch * self.block_size:,} tokens)" if fixed else ""
            where = f"{rt.world} processes, {rt.strategy}, {rt.backend}" if rt.distributed else "1 process"
            print(f"lmforge: global batch {self.global_batch} sequences{tokens} = {cfg.batch_size} per process x "
                  f"{self.accum} accumulation x {rt.world} process(es); {where} on {rt.device.type}", flush=True)
        self.model.train()
        ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
        min_lr = cfg.lr * cfg.min_lr_ratio
        # the bar counts what the budget counts: steps, else tokens, else seconds
        unit = "step" if cfg.max_steps is not None else "tok" if cfg.max_tokens is not None else "s"
        total = cfg.max_steps if unit == "step" else cfg.max_tokens if unit == "tok" else \
            round(self.time_budget_total or cfg.max_time)
        bar = tqdm(total=total, initial=self._bar_count(unit), unit=unit, desc=f"train {Path(cfg.out).name}",
                   disable=not (cfg.progress and rt.is_main), dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]{postfix}")
        window_tokens, window_time = 0, 0.0
        stopped = 0  # the stop signal all ranks agreed on (one process: its own, read before each step)
        try:
            while not self.done() and not stopped:
                if not rt.distributed and stop.signum:
                    stopped = stop.signum
                    break
                t0 = time.perf_counter()
                lr = learning_rate(self.step, self.progress(), cfg.lr, min_lr, cfg.warmup_steps, cfg.schedule,
                                   cfg.cooldown_frac)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)  # Muon's matrices follow the schedule at their own peak
                try:
                    self.last_loss, step_tokens, stopped = self.train_step(stop.signum)
                except (MemoryError, RuntimeError) as e:  # a failed allocation: bad input, not a bug
                    if isinstance(e, RuntimeError) and "allocate" not in str(e) and "out of memory" not in str(e):
                        raise
                    raise LMForgeError(f"out of memory in a training step at --batch-size {cfg.batch_size} x "
                                       f"{self.block_size} tokens; use a smaller --batch-size (--grad-accum or "
                                       "--global-batch keep the effective batch)") from None
                dt = time.perf_counter() - t0
                self.step += 1
                self.train_time += dt
                self.tokens_seen += step_tokens
                if not math.isfinite(self.last_loss):
                    raise LMForgeError(f"loss became {self.last_loss} at step {self.step}; lower --lr "
                                       "(the last good checkpoint is kept)")
                window_tokens += step_tokens
                window_time += dt
                if self.step % cfg.log_interval == 0 or self.step == 1:
                    tps = window_tokens / max(window_time, 1e-9)
                    self._log({"step": self.step, "loss": self.last_loss, "lr": lr,
                               "tokens": self.tokens_seen, "time": round(self.train_time, 3),
                               "tokens_per_s": round(tps, 1)})
                    bar.set_postfix_str(f"loss {self.last_loss:.4f} | {human(tps)} tok/s | lr {lr:.2e}"
                                        + (f" | val {self.last_val:.4f}" if self.last_val is not None else ""))
                    window_tokens, window_time = 0, 0.0
                if self.has_val and self.step % cfg.eval_interval == 0:
                    self._validate()
                if self.step % ckpt_every == 0:
                    self.save()
                bar.update(min(self._bar_count(unit), bar.total) - bar.n)
        except KeyboardInterrupt:  # no handler installed (not the main thread): raised wherever it struck
            bar.close()
            if self.consistent and not rt.distributed:  # ranks cannot agree on a save mid-collective
                self._stop_and_save(signal.SIGINT)
            raise TrainingInterrupted(Path(cfg.out), self.saved_step, signal.SIGINT, rt.is_main,
                                      self.command) from None
        bar.close()
        if stopped and not self.done():
            self._stop_and_save(stopped)
        if self.has_val and (self.last_val is None or self.step % cfg.eval_interval):
            self._validate()
        self.save()
        self._plot()
        return TrainResult(Path(cfg.out), self.step, self.tokens_seen, self.train_time, self.last_loss,
                           self.last_val, self.tokens_seen / max(self.train_time, 1e-9), rt.is_main)

    def _stop_and_save(self, signum: int) -> None:
        if self.saved_step != self.step:  # saved once: not again when the last step was just checkpointed
            self.save()
        self._plot()
        raise TrainingInterrupted(Path(self.cfg.out), self.step, signum, self.rt.is_main, self.command)

    def train_step(self, stop_asked: int = 0) -> tuple[float, int, int]:
        """One optimizer step on this rank's share of the global batch (with gradient accumulation);
        returns the global mean training loss per target token, the global number of target tokens,
        and the stop signal any rank received (all agreed in one all-reduce)."""
        rt, cfg = self.rt, self.cfg
        # What a step consumes, taken before it: an interrupt inside the step rolls back to this.
        snapshot = (copy.deepcopy(self.train_sampler.state_dict()), torch.get_rng_state(), list(self.carry))
        try:
            batches = self.train_sampler.step_batches(rt.rank, rt.world, self.accum)
            if self.stateful and self.train_sampler.wrapped:
                self.carry = [None] * self.accum
            counts = [int((y != -100).sum()) for _, y in batches]  # target tokens, counted on the host
            n_global = torch.tensor([float(sum(counts))], device=rt.device)
            if isinstance(self.train_sampler, ParallelBatchSampler):  # variable: every rank must know the total
                rt.all_reduce(n_global)
            else:  # fixed windows: the same count on every rank
                n_global *= rt.world
            n_total = float(n_global.item())
            loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
            for k, (x, y) in enumerate(batches):
                # DDP/FSDP average gradients over ranks; weight each micro-batch by its share of the
                # global batch's targets (x world, undoing the average), so every world size agrees.
                weight = counts[k] * rt.world / max(n_total, 1.0)
                with gradient_sync(rt, self.wrapped, k == len(batches) - 1):
                    with self._autocast():
                        loss, _, state = self.step_fn(_to(x, rt.device), _to(y, rt.device),
                                                      self.carry[k] if self.stateful else None)
                    self.scaler.scale(loss * weight).backward()
                if self.stateful:
                    self.carry[k] = self.model.detach_state(state)  # truncate BPTT at the window edge
                loss_sum += loss.detach().double() * counts[k]
        except KeyboardInterrupt:
            self.train_sampler.load_state_dict(snapshot[0])
            torch.set_rng_state(snapshot[1])
            self.carry = snapshot[2]
            self.optimizer.zero_grad(set_to_none=True)
            raise
        self.consistent = False  # an interrupt from here until the update is done leaves no clean state
        stats = torch.stack([loss_sum, torch.tensor(float(stop_asked), dtype=torch.float64, device=rt.device)])
        rt.all_reduce(stats)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.consistent = True
        signum = int(stats[1].item())
        if signum:  # a sum over ranks: name one of the signals actually sent
            signum = stop_asked or (signal.SIGTERM if signum % signal.SIGTERM == 0 else signal.SIGINT)
        return float(stats[0].item() / max(n_total, 1.0)), int(n_total), signum

    consistent = True  # model, optimizer, sampler and RNG describe the same step boundary

    def _validate(self) -> None:
        self.last_val = self.estimate_loss("val")
        self.best_val = self.last_val if self.best_val is None else min(self.best_val, self.last_val)
        self._log({"step": self.step, "val_loss": self.last_val, "time": round(self.train_time, 3),
                   "tokens": self.tokens_seen})

    def _truncate_metrics(self) -> None:
        """On resume, drop log lines written after the checkpoint (they will be re-run)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [json.dumps(rec) for rec in read_jsonl(path)
                if isinstance(rec.get("step", 0), int) and rec.get("step", 0) <= self.step]
        atomic_write_text(path, "\n".join(keep) + ("\n" if keep else ""))
        self._log({"event": "resume", "step": self.step, "world_size": self.rt.world,
                   "strategy": self.rt.strategy, "precision": self.precision})

    def _plot(self) -> None:
        if not self.rt.is_main:
            return
        try:
            from ..viz.plots import plot_loss_curve  # matplotlib costs ~0.5 s; only the end-of-run plot needs it

            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png",
                            title=f"{self.run_dir.name}: {self.cfg.model} on {Path(self.cfg.data).name}")
        except Exception as e:  # a plot must never cost a finished run
            print(f"lmforge: warning: could not draw the loss curve ({e})")


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    return Trainer(cfg, resume=resume).train()

