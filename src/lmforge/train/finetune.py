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
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..data.sft import (
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
from ..options import Options, option
from ..utils import atomic_write_json
from .config import MAX_COUNT, TrainConfig
from .trainer import Trainer, TrainResult


@dataclass
class FineTuneConfig(TrainConfig):
    """``lmforge finetune`` options: TrainConfig's training options (with fine-tuning defaults) and these."""

    base: str = option("", cli=False, help="the model to adapt: a Hugging Face directory, a .gguf file, smollm2 or "
                       "an lmforge GPT run")
    data: str = option("", metavar="DATA", default_text="none",
                       help="fine-tuning data: a .jsonl/.json/.tsv file, de-en, code-doc, chatterbot, "
                            "chatterbot:chinese (any chatterbot-corpus language) or chitchat")
    method: Literal["lora", "full"] = option("lora", help="lora: low-rank adapters, base frozen; full: every "
                                             "weight trains")
    lora_r: int = option(8, ge=1, le=4096, help="LoRA rank r")
    lora_alpha: float = option(16.0, gt=0, help="LoRA alpha: updates are scaled by alpha / r")
    lora_dropout: float = option(0.05, ge=0, lt=1, help="dropout on the adapters' input")
    lora_targets: str = option("q,k,v,o,gate,up,down", metavar="LIST",
                               help="comma-separated LoRA targets among q,k,v,o,gate,up,down (PEFT's q_proj ... "
                                    "down_proj), or all")
    epochs: float | None = option(None, gt=0, help="budget in passes over the training examples (sets the "
                                  "number of steps; instead of --max-time / --max-steps)")
    val_frac: float = option(0.05, ge=0, lt=1, help="share of the examples (conversations) held out for validation")
    test_frac: float = option(0.05, ge=0, lt=1, help="share held out for testing (de-en keeps its fixed test split)")
    template: str | None = option(None, metavar="NAME|FILE", default_text="the model's own",
                                  help="chat template: a built-in name (chatml, simple) or a Jinja file")
    mask_prompt: bool = option(True, help="train on the assistant's tokens only (--no-mask-prompt: every token)")
    packing: bool = option(False, help="pack examples into full rows; attention never crosses an example's boundary")
    max_length: int = option(512, ge=2, le=1 << 20, help="most tokens per example / packed row (at most the "
                             "model's context)")
    on_long: Literal["cut", "skip"] = option("cut", help="an example longer than --max-length: cut or skip it "
                                             "(both are counted)")
    instruction: str | None = option(None, default_text="per corpus, e.g. 'Translate German to English:'",
                                     help="parallel data: the instruction before each source")
    # TrainConfig's options that fine-tuning does not use, and its own defaults for the shared ones
    model: str = option("finetune", cli=False, help="(fine-tuning adapts --base; no model family to choose)")
    preset: str | None = option(None, cli=False, help="(unused: the base model fixes the shape)")
    batch_size: int = option(8, ge=1, le=1 << 20, help="examples (or packed rows) per micro-batch")
    lr: float = option(2e-4, gt=0, le=10, help="peak learning rate (AdamW)")
    weight_decay: float = option(0.0, ge=0, le=10, help="AdamW weight decay")
    warmup_steps: int = option(10, ge=0, le=MAX_COUNT, help="linear warmup steps")
    eval_interval: int = option(50, ge=1, le=MAX_COUNT, help="validate (the held-out masked loss) and checkpoint "
                                "every N steps")
    eval_iters: int = option(50, ge=1, le=MAX_COUNT, help="validation batches (the whole split when smaller)")
    log_interval: int = option(5, ge=1, le=MAX_COUNT, help="log the training loss every N steps")
    compile: bool = option(False, help="torch.compile each Transformer block (regional; the output head stays eager). "
                           "Measured slower than eager for LoRA on a CPU (docs/finetune.md)")

    def __post_init__(self) -> None:
        Options.__post_init__(self)  # no model family to check model_args against

    def validate(self) -> None:
        if not self.base:
            raise LMForgeError("give the model to fine-tune (a Hugging Face directory, a .gguf file, smollm2 or a run)")
        if self.epochs is not None and self.max_time is not None:
            raise LMForgeError("give one budget: --epochs or --max-time")
        if self.epochs is None and self.max_steps is None and self.max_time is None and self.max_tokens is None:
            raise LMForgeError("give a training budget: --max-time, --epochs, --max-steps or --max-tokens")
        if self.val_frac + self.test_frac >= 1:
            raise LMForgeError("--val-frac and --test-frac must sum to less than 1")

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
    """One process (CPU or one GPU): DDP/FSDP are refused (the held-out loss and LoRA checkpoints are
    per-process)."""

    config_class = FineTuneConfig
    command = "finetune"
    validate_at_start = True
    cfg: FineTuneConfig

    def build(self) -> None:
        from ..hub import load_model
        from ..models.gpt import GPT

        cfg = self.cfg
        if self.rt.distributed:
            raise LMForgeError(f"lmforge finetune runs in one process ({self.rt.world} were started); run it "
                               "without torchrun")
        self.seq2seq = False
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
            if self.amp_dtype is not None:
                low_precision_frozen_linears(model, self.amp_dtype)
        self.model = model
        if cfg.epochs is not None:  # whole epochs of batches (each epoch has its own order and packing)
            sampler = self._sampler("train", cfg.seed)
            whole, part = int(cfg.epochs), cfg.epochs - int(cfg.epochs)
            steps = sum(sampler.batches_per_epoch(e) for e in range(whole))
            steps += math.ceil(part * sampler.batches_per_epoch(whole))
            cfg.max_steps = max(steps, 1)

    def compile_steps(self) -> tuple[Any, Any]:
        """``--compile``, regionally: each Transformer block is compiled on its own (fused norms, RoPE, SwiGLU,
        LoRA dropout and scaling) and identical blocks share one graph, so compiling costs one block's time, not
        the whole model's; the output head stays eager, so only target positions go through it (a whole-model
        graph cannot select them: their number is data-dependent)."""
        for block in self.model.shard_units():
            block.compile()
        return self.wrapped, self.wrapped

    def _sampler(self, split: str, seed: int, warn: bool = True, n_streams: int | None = None) -> SFTSampler:
        return SFTSampler(self.data.splits[split].examples, self.cfg.batch_size, self.block_size, seed,
                          self.tokenizer.eot_id, packing=self.cfg.packing)

    @torch.no_grad()
    def estimate_loss(self, split: str = "val") -> float:
        """Mean masked loss over every target token of the split's first ``eval_iters`` batches (all of a
        small split, each example once, in order: the trainer's shared estimate draws ``eval_iters`` batches,
        which would repeat the examples of a small split): the held-out loss of the assistant turns."""
        ex = self.data.splits[split].examples[: self.cfg.eval_iters * self.cfg.batch_size]
        self.model.eval()
        total, count = 0.0, 0
        with self._autocast():
            for x, y in batches_in_order(ex, self.cfg.batch_size, self.tokenizer.eot_id):
                loss, n, _ = self.eval_fn(x.to(self.rt.device), y.to(self.rt.device), None)
                total += float(loss) * int(n)
                count += int(n)
        self.model.train()
        return total / max(count, 1)

    def save_model(self) -> None:
        from ..hub.peft import save_adapter

        if not self.rt.is_main:
            return
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


def low_precision_frozen_linears(model: Any, dtype: torch.dtype) -> None:
    """Store the frozen Linear weights (and biases) of the blocks in the autocast dtype. Autocast casts them to it
    at every forward anyway, so the products are the same bit for bit; casting once saves those copies (4 % of a
    bf16 LoRA step on SmolLM2, CPU) and halves the blocks' weight memory. The norms and the embedding keep fp32;
    so does the output head (tied to the embedding, which reads it in fp32), multiplied under autocast by a cached
    copy in the autocast dtype (``CachedCastLinear``) when it is frozen."""
    for block in model.blocks:
        for m in block.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad:
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.data = p.data.to(dtype)
    if type(model.lm_head) is torch.nn.Linear and not model.lm_head.weight.requires_grad:
        model.lm_head = CachedCastLinear.of(model.lm_head)


class CachedCastLinear(torch.nn.Linear):
    """A frozen Linear (the output head, whose weight is the fp32 embedding's when tied) that under autocast
    multiplies by a copy of its weight in the autocast dtype made once, not at every forward as autocast does
    (SmolLM2's head: 28 M values, 1.2 % of a bf16 LoRA step on a CPU): the same products bit for bit. The copy
    is made again when the weight changes: another tensor, an in-place update (its version counter), another
    autocast dtype. Outside autocast, or with a weight that trains, it is ``nn.Linear``. The weight is the same
    Parameter (ties and state_dict keys unchanged); the copy is not state."""

    _cast: tuple[tuple, torch.Tensor] | None = None  # (what it was made from, the copy)

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> CachedCastLinear:
        m = cls(linear.in_features, linear.out_features, bias=False, device="meta")  # no weight made
        m.weight, m.bias = linear.weight, linear.bias
        return m.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev, w = x.device.type, self.weight
        if not torch.is_autocast_enabled(dev) or w.requires_grad:
            return super().forward(x)
        dtype = torch.get_autocast_dtype(dev)
        key = (w.data_ptr(), w._version, w.dtype, dtype)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, w.detach().to(dtype))
        return F.linear(x.to(dtype), self._cast[1], None if self.bias is None else self.bias.to(dtype))


def finetune(model: str, data: str, out: str, resume: bool = False, **options: Any) -> TrainResult:
    """Fine-tune ``model`` (anything ``lmforge.load`` reads) on ``data``; options are FineTuneConfig's fields."""
    if resume:
        cfg = FineTuner.config_for_resume(out, options)
    else:
        cfg = FineTuneConfig(base=model, data=data, out=out, **options)
    return FineTuner(cfg, resume=resume).train()


__all__ = ["FineTuneConfig", "FineTuner", "finetune"]
