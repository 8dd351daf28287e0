"""Supervised fine-tuning of a pretrained model, full or LoRA, on the shared trainer.

``FineTuner`` is the ``Trainer`` with three parts replaced: the data (chat/instruction examples with label
masks, ``data/sft.py``), the model (anything ``lmforge.load`` reads, optionally with LoRA adapters,
``models/lora.py``) and what a run directory keeps (LoRA: only the adapters, in PEFT's format,
``hub/peft.py``; full: the whole model). Checkpoints, exact resume, the progress bar, metrics, the loss plot
and Ctrl-C are the trainer's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..data.sft import (
    IGNORE,
    EncodedSplit,
    SFTEncoder,
    SFTSampler,
    batches_in_order,
    encode_split,
    load_sft_data,
    resolve_template,
)
from ..errors import LMForgeError
from ..models.lora import LoRAConfig, add_lora, parse_targets
from ..utils import atomic_write_json
from .config import TrainConfig
from .trainer import Trainer, TrainResult


@dataclass
class FineTuneConfig(TrainConfig):
    """``lmforge finetune`` options (the training options are TrainConfig's, with fine-tuning defaults)."""

    base: str = ""                   # MODEL: a Hugging Face directory, a GGUF file, smollm2, an lmforge GPT run
    method: str = "lora"             # lora | full
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "q,k,v,o,gate,up,down"
    epochs: float | None = None      # a budget in passes over the training examples (instead of steps/time)
    val_frac: float = 0.05
    test_frac: float = 0.05
    template: str | None = None      # a built-in template name or a Jinja file (default: the model's own)
    mask_prompt: bool = True         # train on assistant tokens only
    packing: bool = False
    max_length: int = 512            # input tokens per example (and per packed row); at most the model's context
    on_long: str = "cut"             # cut | skip examples longer than max_length
    instruction: str | None = None   # parallel data: the instruction before each source
    # fine-tuning defaults for the shared options
    model: str = "finetune"
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"
    eval_interval: int = 50
    eval_iters: int = 50             # validation batches (the whole split when it is smaller)
    log_interval: int = 5

    def validate(self) -> None:
        if self.epochs is not None:
            if self.epochs <= 0:
                raise LMForgeError("--epochs must be positive")
            if self.max_time is not None:
                raise LMForgeError("give one budget: --epochs or --max-time")
        elif self.max_steps is None and self.max_time is None:
            raise LMForgeError("give a training budget: --max-time, --epochs or --max-steps")
        if self.method not in ("lora", "full"):
            raise LMForgeError(f"unknown --method {self.method!r}; choose lora or full")
        if self.max_length < 2:
            raise LMForgeError("--max-length must be at least 2")
        if not self.base:
            raise LMForgeError("give the model to fine-tune (a Hugging Face directory, a .gguf file, smollm2 or a run)")
        saved = self.max_steps
        self.max_steps = self.max_steps or 1  # TrainConfig's own checks (a budget is checked above)
        try:
            super().validate()
        finally:
            self.max_steps = saved

    def lora(self) -> LoRAConfig:
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=parse_targets(self.lora_targets))


class SFTData:
    """The encoded splits of a fine-tuning data set (what the trainer's ``self.data`` is while fine-tuning)."""

    def __init__(self, cfg: FineTuneConfig, model: Any, block: int) -> None:
        ds = load_sft_data(cfg.data, seed=cfg.seed, val_frac=cfg.val_frac, test_frac=cfg.test_frac,
                           instruction=cfg.instruction)
        template = resolve_template(cfg.template, model.chat_template)
        self.template_text = template.text if template is not None else None
        if model.tokenizer is None:
            raise LMForgeError(f"{cfg.base} has no tokenizer to encode fine-tuning data with")
        self.tokenizer = model.tokenizer
        enc = SFTEncoder(model.tokenizer, template, cfg.mask_prompt)
        self.dataset = ds
        self.splits: dict[str, EncodedSplit] = {k: encode_split(enc, v, block, cfg.on_long)
                                                for k, v in ds.splits.items()}

    def has_split(self, name: str) -> bool:
        return bool(self.splits.get(name) and self.splits[name].examples)

    def summary(self) -> dict[str, Any]:
        s = {k: {"examples": len(v.examples), "target_tokens": v.target_tokens, "cut": v.cut, "skipped": v.skipped}
             for k, v in self.splits.items()}
        ds = self.dataset
        return {"data": ds.name, "description": ds.description, "format": ds.meta["format"],
                "duplicates_removed": ds.duplicates, "instruction": ds.instruction, "splits": s}


class FineTuner(Trainer):
    config_class = FineTuneConfig
    command = "finetune"
    validate_at_start = True
    cfg: FineTuneConfig

    def build(self) -> None:
        from ..models import load_model
        from ..models.gpt import GPT

        cfg = self.cfg
        model = load_model(cfg.base)
        if not isinstance(model, GPT):
            raise LMForgeError(f"{cfg.base} is a {model.model_type} model; fine-tuning takes GPT-family models "
                               "(Hugging Face GPT-2/Llama/Qwen2/Mistral directories, GGUF files, smollm2, lmforge "
                               "GPT runs)")
        model.float()  # GGUF weights are dequantised on load; training runs in fp32 (bf16 via --dtype autocast)
        self.block_size = min(cfg.max_length, model.context_length)
        self.data = SFTData(cfg, model, self.block_size)
        self.tokenizer = self.data.tokenizer
        self.lora = add_lora(model, cfg.lora()) if cfg.method == "lora" else None
        if self.lora is not None:
            self.checkpoint_module = self.lora  # checkpoints hold the adapters only
        self.model = model
        if cfg.epochs is not None:  # whole epochs of batches (each epoch has its own order and packing)
            sampler = self._sampler("train", cfg.seed)
            whole, part = int(cfg.epochs), cfg.epochs - int(cfg.epochs)
            steps = sum(sampler.batches_per_epoch(e) for e in range(whole))
            steps += math.ceil(part * sampler.batches_per_epoch(whole))
            cfg.max_steps = max(steps, 1)

    def _sampler(self, split: str, seed: int, warn: bool = True) -> SFTSampler:
        return SFTSampler(self.data.splits[split].examples, self.cfg.batch_size, self.block_size, seed,
                          self.tokenizer.eot_id, packing=self.cfg.packing)

    def batch_loss(self, batch: tuple) -> torch.Tensor:
        x, y, doc = batch
        return self.forward(x, y, doc_ids=doc)[1]

    @torch.no_grad()
    def estimate_loss(self, split: str = "val") -> float:
        """Mean masked loss over every target token of the split's first ``eval_iters`` batches (all of a
        small split): the held-out loss of the assistant turns."""
        ex = self.data.splits[split].examples[: self.cfg.eval_iters * self.cfg.batch_size]
        self.model.eval()
        total, count = 0.0, 0
        with self._autocast():
            for x, y in batches_in_order(ex, self.cfg.batch_size, self.tokenizer.eot_id):
                n = int((y != IGNORE).sum())
                total += float(self.forward(x, y)[1]) * n
                count += n
        self.model.train()
        return total / max(count, 1)

    def save_model(self) -> None:
        from ..hub.peft import save_adapter

        if self.lora is not None:
            save_adapter(self.model, self.lora, self.run_dir, self.cfg.base)
        else:
            self.model.save_pretrained(self.run_dir)
        c = self.cfg
        atomic_write_json(self.run_dir / "finetune.json", {
            **self.data.summary(), "base": c.base, "method": c.method,
            "split_options": {"seed": c.seed, "val_frac": c.val_frac, "test_frac": c.test_frac}})
        if self.data.template_text is not None:
            (self.run_dir / "chat_template.jinja").write_text(self.data.template_text, encoding="utf-8")


def finetune(model: str, data: str, out: str, resume: bool = False, **options: Any) -> TrainResult:
    """Fine-tune ``model`` (anything ``lmforge.load`` reads) on ``data``; options are FineTuneConfig's fields."""
    if resume:
        cfg = FineTuner.config_for_resume(out, options)
    else:
        cfg = FineTuneConfig(base=model, data=data, out=out, **options)
    return FineTuner(cfg, resume=resume).train()


__all__ = ["FineTuneConfig", "FineTuner", "finetune"]
