"""Training configuration: one dataclass whose fields are the options of ``lmforge train``, of YAML
configs (litgpt style) and of ``lmforge.train.train``. Each field declares its help and its constraints
(``lmforge.options``), so the three refuse the same values with the same words and a new field becomes
a documented, validated flag with no other edit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import LMForgeError, first_line
from ..models import model_class
from ..options import INT64_MAX, Options, option
from ..utils import MAX_TOKEN_COUNT, parse_duration, parse_token_count

MAX_COUNT = 1 << 40  # any step/interval count beyond this is a typo, not a plan


@dataclass
class TrainConfig(Options):
    data: str = option("", help="prepared data directory (lmforge prepare)", metavar="DIR", default_text="none")
    out: str = option("", help="run directory to create", metavar="DIR", default_text="none")
    model: Literal["gpt", "lstm", "gru", "rnn", "seq2seq", "ngram"] = option(
        "gpt", help="model family (ngram: counted, see the n-gram options)")
    preset: str | None = option(None, help="model preset (gpt: nano, tiny, small, gpt2; lstm/gru/rnn: tiny, small, "
                                "medium; seq2seq: tiny, small, base)", default_text="the family's default")
    model_args: dict[str, Any] = option(default_factory=dict, cli=False,
                                        help="overrides of the preset's model options (n_layer, ...)")
    # optimisation
    batch_size: int = option(32, ge=1, le=1 << 20, help="sequences per micro-batch, per process")
    grad_accum: int = option(1, ge=1, le=1 << 16, help="micro-batches per optimizer step (gradient accumulation)")
    optimizer: Literal["adamw", "muon"] = option(
        "adamw", help="adamw, or muon: Muon on the hidden weight matrices (Transformer blocks), AdamW on embeddings, "
                      "head, norms and biases")
    lr: float = option(2e-3, gt=0, le=10, help="peak learning rate (AdamW)")
    muon_lr: float = option(0.02, gt=0, le=10, help="peak learning rate of the Muon matrices (--optimizer muon); "
                                                    "follows the same schedule as --lr")
    min_lr_ratio: float = option(0.1, ge=0, le=1, help="final learning rate as a fraction of --lr")
    weight_decay: float = option(0.1, ge=0, le=10, help="AdamW weight decay (not on biases, norms, embeddings)")
    beta1: float = option(0.9, ge=0, lt=1, help="AdamW beta1 (first-moment decay)")
    beta2: float = option(0.99, ge=0, lt=1, help="AdamW beta2 (second-moment decay)")
    grad_clip: float = option(1.0, ge=0, help="clip the gradient norm to this (0 = no clipping)")
    warmup_steps: int = option(50, ge=0, le=MAX_COUNT, help="linear warmup steps")
    schedule: Literal["cosine", "linear", "constant"] = option(
        "cosine", help="learning-rate schedule after warmup (linear: constant, then a linear cooldown)")
    cooldown_frac: float = option(0.2, ge=0, le=1, help="linear schedule: share of the run spent cooling down")
    # budget: whichever comes first
    max_steps: int | None = option(None, ge=1, le=MAX_COUNT, help="stop after this many optimizer steps")
    max_time: float | None = option(None, gt=0, parse=parse_duration, metavar="DURATION",
                                    help="training time budget, e.g. 90s, 5m, 1h (lowercase m = minutes; evaluation "
                                         "time excluded; on --resume: extra time)")
    max_tokens: int | None = option(None, ge=1, le=MAX_TOKEN_COUNT, parse=parse_token_count, metavar="TOKENS",
                                    help="training token budget, e.g. 500k, 5M, 2G or 2000000 (capital M = million, "
                                         "unlike --max-time's 5m = minutes): stop at the first step boundary where "
                                         "the target tokens seen since the run began reach it")
    # evaluation, logging, checkpoints
    eval_interval: int = option(200, ge=1, le=MAX_COUNT, help="evaluate on val every N steps")
    eval_iters: int = option(20, ge=1, le=MAX_COUNT, help="batches per validation estimate")
    log_interval: int = option(10, ge=1, le=MAX_COUNT, help="log the training loss every N steps")
    checkpoint_interval: int | None = option(None, ge=1, le=MAX_COUNT, help="save a checkpoint every N steps",
                                             default_text="at every evaluation")
    # numerics and speed
    dtype: Literal["fp32", "bf16", "fp16", "auto"] = option(
        "fp32", help="autocast precision: bf16, fp16 (with a gradient scaler), or auto = bf16 on GPUs that have "
                     "it (else fp16); on a CPU, bf16 only where a short matmul probe measures it >= 1.1x faster "
                     "than fp32 (cached per machine; docs/training.md)")
    compile: bool = option(False, help="torch.compile the model")
    threads: int | None = option(None, ge=1, le=4096, help="CPU threads for torch", default_text="torch's choice")
    seed: int = option(1337, ge=0, le=INT64_MAX, help="random seed (initialisation and batches)")
    progress: bool = option(True, help="show a progress bar")
    # devices and processes (docs/distributed.md)
    device: str = option("auto", help="where to train: auto (CUDA when present, one GPU per process), cpu, cuda, "
                         "cuda:N or mps")
    strategy: Literal["auto", "none", "ddp", "fsdp"] = option(
        "auto", help="how processes share the work under torchrun: ddp (replicate the model, average gradients; "
                     "the default when WORLD_SIZE > 1), fsdp (FSDP2: shard parameters, gradients and optimizer "
                     "state per block) or none (one process)")
    backend: Literal["auto", "nccl", "gloo"] = option(
        "auto", help="torch.distributed backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo")
    global_batch: int | None = option(
        None, ge=1, le=1 << 30, help="sequences per optimizer step over all processes (fixes the global batch; "
                                     "--grad-accum is derived as global_batch / (batch_size x processes))",
        default_text="batch_size x grad_accum x processes")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.model_args = self.check_model_args(self.model, self.preset, self.model_args)

    @staticmethod
    def check_model_args(model: str, preset: str | None, model_args: dict[str, Any]) -> dict[str, Any]:
        """The model options checked against the family's config declaration, with the preset, before any
        data is read or any file written (one-line errors in the config's own words)."""
        cls = model_class(model)
        if not cls.presets:
            return model_args
        return cls.check_overrides(preset, model_args)

    def validate(self) -> None:
        """What only a training run needs (a config may be written without a budget)."""
        if self.max_steps is None and self.max_time is None and self.max_tokens is None:
            raise LMForgeError("give a training budget: --max-steps, --max-time or --max-tokens")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if path.is_dir():
            raise LMForgeError(f"config file {path} is a directory; give a YAML file")
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise LMForgeError(f"config file {path} not found") from None
        except IsADirectoryError:
            raise LMForgeError(f"config file {path} is a directory; give a YAML file") from None
        except UnicodeDecodeError as e:
            raise LMForgeError(f"config file {path} is not UTF-8 text (byte offset {e.start}); give a YAML file") \
                from None
        except (yaml.YAMLError, RecursionError) as e:
            raise LMForgeError(f"config file {path} is not valid YAML ({first_line(e)})") from None
        if not isinstance(d, dict):
            raise LMForgeError(f"config file {path} must be a mapping of option: value")
        return cls.from_dict(d, what="training option")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
