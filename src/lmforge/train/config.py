"""Training configuration (a dataclass, readable from and written to YAML like litgpt's)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import LMForgeError, first_line


@dataclass
class TrainConfig:
    data: str = ""
    out: str = ""
    model: str = "gpt"
    preset: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)  # overrides of the preset (n_layer, ...)
    # optimisation
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1          # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    warmup_steps: int = 50
    schedule: str = "cosine"           # cosine | linear (constant then linear cooldown) | constant
    cooldown_frac: float = 0.2         # for `linear`: share of the run spent cooling down
    # budget: whichever comes first
    max_steps: int | None = None
    max_time: float | None = None      # seconds of training (evaluation time excluded)
    # evaluation, logging, checkpoints
    eval_interval: int = 200
    eval_iters: int = 20
    log_interval: int = 10
    checkpoint_interval: int | None = None  # default: every eval
    sample_tokens: int = 300
    # numerics and speed
    dtype: str = "fp32"                # fp32 | bf16 (autocast) | auto (bf16 where the CPU has it natively)
    compile: bool = False
    threads: int | None = None
    seed: int = 1337
    progress: bool = True

    def validate(self) -> None:
        if self.max_steps is None and self.max_time is None:
            raise LMForgeError("give a training budget: --max-steps or --max-time")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise LMForgeError(f"unknown --schedule {self.schedule!r}; choose cosine, linear or constant")
        if self.dtype not in ("fp32", "bf16", "auto"):
            raise LMForgeError(f"unknown --dtype {self.dtype!r}; choose fp32, bf16 or auto")
        for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise LMForgeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise LMForgeError("--lr must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise LMForgeError(f"unknown training option(s): {', '.join(sorted(map(str, unknown)))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        try:
            d = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
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
        return cls.from_dict(d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
