"""Low-rank adaptation (LoRA, Hu et al. 2021) of lmforge's GPT.

A frozen linear map W (out x in) gets a trainable low-rank update,

    h = W x + (alpha / r) * B A dropout(x),      A: (r x in),  B: (out x r),  r << min(in, out),

with A initialised like a Linear layer (Kaiming-uniform) and B = 0, so at initialisation the model is
exactly the base model; only A and B train (r * (in + out) parameters instead of in * out).

lmforge's GPT fuses some of the linear maps that Hugging Face (and PEFT) keep apart: the attention's
``qkv`` holds [W_q | W_k | W_v] and a SwiGLU MLP's ``fc`` holds [W_gate | W_up]. Each LoRA *target* is
one of PEFT's modules (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down`` = ``q_proj`` ... ``down_proj``)
and adapts only its own slice of the fused output, so an adapter maps 1:1 onto PEFT's files
(``hub/peft.py``). On a fused layer the slices' A matrices are stacked and their B matrices placed
block-diagonally, so one fused layer costs two small matmuls however many of its slices are adapted:

    delta = (dropout(x) @ [A_q; A_k; A_v]^T) @ blockdiag(B_q, B_k, B_v)^T * (alpha / r)

(the slices share one dropout mask, where PEFT draws one per module; without dropout the two agree).
The update is added by a forward hook, so the base weights keep their names and layout; ``merge``
folds B A into W for decoding (``unmerge`` takes it out again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LMForgeError

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if self.r < 1:
            raise LMForgeError("--lora-r must be at least 1")
        if not 0 <= self.dropout < 1:
            raise LMForgeError("--lora-dropout must be in [0, 1)")
        if not self.targets:
            raise LMForgeError("--lora-targets is empty; give e.g. q,k,v,o")
        self.targets = tuple(dict.fromkeys(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def target_slices(model: nn.Module) -> dict[str, list[tuple[str, int, int]]]:
    """For each LoRA target of a GPT, the (linear module path, start, end) output slices it adapts, one per
    layer. A plain GELU MLP's ``fc`` is PEFT's ``gate_proj`` (hub/export.py writes it so); it has no ``up``."""
    from .gpt import GPT

    if not isinstance(model, GPT):
        raise LMForgeError(f"LoRA adapts GPT-family models (GPT, Llama, Qwen2, SmolLM2), not "
                           f"{type(model).__name__}")
    c = model.config
    if c.pos != "rope" or c.norm != "rmsnorm":
        raise LMForgeError("LoRA adapters are written in PEFT's Llama layout; this model has GPT-2's layout "
                           "(learned positions, LayerNorm): fine-tune it with --method full")
    hd = c.n_embd // c.n_head
    q, kv = c.n_head * hd, (c.n_kv_head or c.n_head) * hd
    out: dict[str, list[tuple[str, int, int]]] = {t: [] for t in TARGETS}
    for i in range(c.n_layer):
        b = f"blocks.{i}."
        out["q"].append((b + "attn.qkv", 0, q))
        out["k"].append((b + "attn.qkv", q, q + kv))
        out["v"].append((b + "attn.qkv", q + kv, q + 2 * kv))
        out["o"].append((b + "attn.proj", 0, c.n_embd))
        if c.mlp == "swiglu":
            out["gate"].append((b + "mlp.fc", 0, c.hidden))
            out["up"].append((b + "mlp.fc", c.hidden, 2 * c.hidden))
        else:
            out["gate"].append((b + "mlp.fc", 0, c.hidden))
        out["down"].append((b + "mlp.proj", 0, c.n_embd))
    return {t: v for t, v in out.items() if v}


class LoRALayer(nn.Module):
    """The adapters of one (possibly fused) linear layer: one (A, B) pair per adapted output slice."""

    def __init__(self, linear: nn.Linear, slices: list[tuple[str, int, int]], cfg: LoRAConfig) -> None:
        super().__init__()
        self.slices = sorted(slices, key=lambda s: s[1])  # (target, start, end)
        self.out_features, self.scale = linear.out_features, cfg.scale
        self.dropout = nn.Dropout(cfg.dropout)
        dev = linear.weight.device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, s, e in self.slices:
            a = torch.empty(cfg.r, linear.in_features, device=dev)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's (and PEFT's) initialisation
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(e - s, cfg.r, device=dev))
        self.merged = False

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[A_1; A_2; ...] (n r x in) and the (out x n r) matrix with B_s in slice s's rows, zero elsewhere."""
        blocks, at = [], 0
        for name, s, e in self.slices:
            if s > at:  # an output slice no target adapts (e.g. k when only q and v are)
                blocks.append(self.lora_B[name].new_zeros(s - at, 0))
            blocks.append(self.lora_B[name])
            at = e
        if at < self.out_features:
            blocks.append(blocks[-1].new_zeros(self.out_features - at, 0))
        a = torch.cat([self.lora_A[name] for name, _, _ in self.slices])
        return a, torch.block_diag(*blocks)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stacked()
        return F.linear(F.linear(self.dropout(x), a.to(x.dtype)), b.to(x.dtype)) * self.scale

    def hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output if self.merged else output + self.delta(args[0])

    @torch.no_grad()
    def merge(self, linear: nn.Linear, sign: float = 1.0) -> None:
        for name, s, e in self.slices:
            linear.weight[s:e] += sign * self.scale * (self.lora_B[name] @ self.lora_A[name]).to(linear.weight.dtype)


class LoRA(nn.Module):
    """Every adapter of a model, keyed by the adapted linear layer's path ("blocks.0.attn.qkv" ->
    "blocks_0_attn_qkv"). Attached as ``model.lora``; the base model's parameters are frozen."""

    def __init__(self, model: nn.Module, cfg: LoRAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        sites = target_slices(model)
        unknown = [t for t in cfg.targets if t not in sites]
        if unknown:
            raise LMForgeError(f"LoRA target(s) {', '.join(unknown)} match no module of this model; its modules "
                               f"are {', '.join(sites)} (PEFT's {', '.join(_peft_name(t) for t in sites)})")
        per_layer: dict[str, list[tuple[str, int, int]]] = {}
        for t in cfg.targets:
            for path, s, e in sites[t]:
                per_layer.setdefault(path, []).append((t, s, e))
        modules = dict(model.named_modules())
        self.paths = list(per_layer)
        self.layers = nn.ModuleDict({p.replace(".", "_"): LoRALayer(modules[p], sl, cfg)
                                     for p, sl in per_layer.items()})
        self._hooks = [modules[p].register_forward_hook(self.layers[p.replace(".", "_")].hook) for p in self.paths]
        self._linears = [modules[p] for p in self.paths]

    def items(self) -> list[tuple[str, nn.Linear, LoRALayer]]:
        return [(p, lin, self.layers[p.replace(".", "_")]) for p, lin in zip(self.paths, self._linears)]

    @property
    def merged(self) -> bool:
        return any(layer.merged for _, _, layer in self.items())

    def merge(self) -> None:
        """W <- W + (alpha / r) B A on every adapted slice (decoding then costs nothing extra)."""
        for _, lin, layer in self.items():
            if not layer.merged:
                layer.merge(lin, +1.0)
                layer.merged = True

    def unmerge(self) -> None:
        for _, lin, layer in self.items():
            if layer.merged:
                layer.merge(lin, -1.0)
                layer.merged = False

    def remove(self) -> None:
        """Detach the hooks (after ``merge`` the model is a plain model with the adapted weights)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _peft_name(target: str) -> str:
    return {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}[target]


def parse_targets(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``q,k,v`` or PEFT's names (``q_proj,v_proj``) or ``all``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for t in (x.strip() for x in items):
        if not t:
            continue
        if t == "all":
            out.extend(TARGETS)
            continue
        out.append(t[:-5] if t.endswith("_proj") else t)
    return tuple(out)


def add_lora(model: nn.Module, cfg: LoRAConfig) -> LoRA:
    """Freeze ``model`` and attach LoRA adapters as ``model.lora``; returns them."""
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoRA(model, cfg).train(model.training)
    model.lora = lora  # a submodule: its parameters follow .to(), .train() and the optimizer's groups
    return lora


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights and drop them: a plain model (for export or fast decoding)."""
    lora = model.lora
    lora.merge()
    lora.remove()
    del model.lora
    return model


__all__ = ["LoRAConfig", "LoRA", "TARGETS", "add_lora", "merge_and_unload", "parse_targets", "target_slices"]
