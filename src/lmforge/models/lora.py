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
block-diagonally; each slice draws its own dropout mask, as PEFT's modules do, all in one call, and one
batched matmul applies the n masked copies of x to their A matrices:

    h_s   = (x * m_s) @ A_s^T                               m_s ~ Bernoulli(1 - p), independent per slice s
    delta = [h_1 | h_2 | ...] @ blockdiag(B_1, B_2, ...)^T * (alpha / r) / (1 - p)

Dropout's 1 / (1 - p) and alpha / r scale the tiny B matrix rather than the (tokens x out) activations, and
the update is added inside the second matmul (``addmm``), so LoRA adds no full-size elementwise pass but
the mask's. The update is added by a forward hook, so the base weights keep their names and layout;
``merge`` folds B A into W for decoding (``unmerge`` takes it out again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
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

    def cast_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        """Forward pre-hook: under autocast, cast the layer's input to the autocast dtype once, for the frozen
        product and the adapter alike (autocast would cast it for each of them; the values are the same)."""
        x = args[0]
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.dtype == torch.float32:
            return (x.to(torch.get_autocast_dtype(dev)),) + args[1:]
        return None

    def hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        """output + the adapters' update (see the module's docstring), x = args[0]: (..., in)."""
        if self.merged:
            return output
        x = args[0].flatten(0, -2)                             # (N, in)
        a, b = self.stacked()                                  # (n r, in), (out, n r)
        p = self.dropout.p if self.training else 0.0
        b = (b * (self.scale / (1 - p))).to(x.dtype)           # both scales on the (out x n r) matrix
        n = len(self.slices)
        if p == 0:
            h = F.linear(x, a.to(x.dtype))                     # (N, n r)
        elif kernels.usable(x.device):  # lmforge's kernel: a mask per slice drawn where it is used, never stored
            h = torch.ops.lmforge.lora_dropout_a(x.contiguous(), a, n, p, dropout_seed())
        else:
            keep = dropout_keep((n, *x.shape), p, x.device)    # (n, N, in): a mask per slice
            h = masked_product(x, a.to(x.dtype), keep)
        out = output.flatten(0, -2)                            # (N, out): the frozen product, not saved for backward
        if out.dtype != h.dtype:  # (an input in another dtype than the layer's output) autocast's addmm casts
            return torch.addmm(out, h, b.t()).view(output.shape)
        return out.addmm_(h, b.t()).view(output.shape)         # the update added inside the matmul, in place

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
        self._hooks = [h for p in self.paths for h in (
            modules[p].register_forward_pre_hook(self.layers[p.replace(".", "_")].cast_input),
            modules[p].register_forward_hook(self.layers[p.replace(".", "_")].hook))]
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


def dropout_seed() -> torch.Tensor:
    """One 64-bit seed from torch's generator for the kernel's counter-based masks: ``torch.manual_seed`` fixes
    them, and a resumed run draws the same ones."""
    return torch.empty((), dtype=torch.int64).random_(-2**63, None)


def dropout_keep(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A dropout keep mask (bool): each element independently True with probability 1 - p, to within 2^-32 (a
    32-bit uniform integer against round(p 2^32)). Where the kernel runs (``kernels.usable``), the masks it draws
    for the same seed: ``shape`` is (slices, rows, features), and ``torch.manual_seed(s); dropout_keep(...)``
    regenerates what ``torch.manual_seed(s)`` then a layer's forward used. Otherwise a CPU's ``bernoulli_``
    draws a 64-bit number and converts a double per element; here one 64-bit draw makes two elements, three
    times cheaper. A compiled graph draws ``rand`` (its own fused generator, to within 2^-24)."""
    if torch.compiler.is_compiling():
        return torch.rand(shape, device=device) >= p
    if kernels.usable(torch.device(device)):
        n, rows, cols = shape[0], math.prod(shape[1:-1]), shape[-1]
        return torch.ops.lmforge.dropout_keep(dropout_seed(), n, rows, cols, p).view(shape)
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-2**63, None)
    return (bits.view(torch.int32)[:n] >= round(p * 2**32) - 2**31).view(shape)


def masked_product(x: torch.Tensor, a: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[(x * keep_1) A_1^T | (x * keep_2) A_2^T | ...]: x (N, in), a = [A_1; A_2; ...] (n r, in), keep (n, N, in)
    bool -> (N, n r): the n masked copies of x in one batched matmul."""
    n = keep.shape[0]
    if n == 1:
        return F.linear(torch.where(keep[0], x, 0), a)
    h = torch.bmm(torch.where(keep, x, 0), a.view(n, a.shape[0] // n, -1).transpose(1, 2))  # (n, N, r)
    return h.transpose(0, 1).flatten(1)


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


__all__ = ["LoRAConfig", "LoRA", "TARGETS", "add_lora", "dropout_keep", "merge_and_unload", "parse_targets",
           "target_slices"]
