"""LoRA adapters in PEFT's file format (``adapter_model.safetensors`` + ``adapter_config.json``).

The keys are the ones ``peft.PeftModel.from_pretrained`` reads on the Hugging Face (Llama layout) export of
the base model (``hub/export.py``)::

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

lora_A is (r, in_features) and lora_B (out_features, r); PEFT scales B A by lora_alpha / r. lmforge's fused
layers keep one (A, B) pair per PEFT module (``models/lora.py``), so the mapping is a renaming, no arithmetic.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import LMForgeError
from ..models.lora import TARGETS, LoRA, LoRAConfig, add_lora, merge_and_unload, target_slices
from ..utils import atomic_write, atomic_write_json, read_json

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
PREFIX = "base_model.model.model.layers."
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn\.\w+_proj|mlp\.\w+_proj)\.lora_([AB])"
                  r"(?:\.default)?\.weight$")


def is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).exists() and not (p / "config.json").exists()


def _layer_of(path: str) -> int:
    return int(path.split(".")[1])  # "blocks.{i}.attn.qkv"


def adapter_tensors(lora: LoRA) -> dict[str, torch.Tensor]:
    out = {}
    for path, _, layer in lora.items():
        i = _layer_of(path)
        for target, _, _ in layer.slices:
            key = f"{PREFIX}{i}.{HF_MODULE[target]}"
            out[f"{key}.lora_A.weight"] = layer.lora_A[target].detach().float().contiguous().cpu()
            out[f"{key}.lora_B.weight"] = layer.lora_B[target].detach().float().contiguous().cpu()
    return out


def adapter_config(cfg: LoRAConfig, base: str) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": cfg.r,
            "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "target_modules": [HF_MODULE[t].split(".")[1] for t in cfg.targets], "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def base_reference(base: str) -> str:
    """What adapter_config.json records as the base: an absolute path for a local file, else the name."""
    p = Path(base).expanduser()
    return str(p.resolve()) if p.exists() else base


def save_adapter(model: torch.nn.Module, lora: LoRA, directory: str | Path, base: str) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(lora)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(directory / ADAPTER_CONFIG, adapter_config(lora.cfg, base_reference(base)))
    if model.tokenizer is not None:
        model.tokenizer.save(directory)
    return directory


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / ADAPTER_CONFIG).exists():
        raise LMForgeError(f"{d} is not an adapter directory (no {ADAPTER_CONFIG}); give a run made by "
                           "lmforge finetune --method lora, or a PEFT LoRA adapter")
    conf = read_json(d / ADAPTER_CONFIG, "adapter config")
    if not isinstance(conf, dict) or conf.get("peft_type") != "LORA":
        kind = conf.get("peft_type") if isinstance(conf, dict) else None
        raise LMForgeError(f"{d / ADAPTER_CONFIG}: peft_type {kind!r} is not LORA; only LoRA adapters are read")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if conf.get(key):
            raise LMForgeError(f"{d / ADAPTER_CONFIG}: {key} adapters are not supported")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise LMForgeError(f"{d / ADAPTER_CONFIG}: per-module ranks (rank_pattern/alpha_pattern) are not supported")
    path = d / ADAPTER_WEIGHTS
    if not path.exists():
        raise LMForgeError(f"{d}: {ADAPTER_WEIGHTS} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LMForgeError(f"{path} is truncated or corrupted ({str(e)[:80]})") from None
    return conf, tensors


def apply_adapter(model: torch.nn.Module, directory: str | Path, merge: bool = True) -> torch.nn.Module:
    """Attach the LoRA adapter in ``directory`` to ``model`` (an lmforge GPT); with ``merge`` fold it into the
    weights (a plain model again, as fast as the base)."""
    conf, tensors = read_adapter(directory)
    names = {v.split(".")[1]: k for k, v in HF_MODULE.items()}
    mods = conf.get("target_modules") or []
    if isinstance(mods, str):
        raise LMForgeError(f"{directory}: target_modules as a regular expression is not supported; list the modules")
    unknown = [m for m in mods if m not in names]
    if unknown:
        raise LMForgeError(f"{directory}: target modules {', '.join(unknown)} are not LoRA targets lmforge knows "
                           f"({', '.join(names)})")
    cfg = LoRAConfig(r=int(conf["r"]), alpha=float(conf["lora_alpha"]), dropout=float(conf.get("lora_dropout", 0.0)),
                     targets=tuple(names[m] for m in mods))
    lora = add_lora(model, cfg)
    sites = {t: {_layer_of(p): p for p, _, _ in v} for t, v in target_slices(model).items()}
    seen = set()
    for key, t in tensors.items():
        m = _KEY.match(key)
        target = names.get(m.group(2).split(".")[1]) if m else None
        if m is None or target not in cfg.targets:
            raise LMForgeError(f"{directory}: unexpected tensor {key!r} in the adapter")
        i = int(m.group(1))
        if i not in sites[target]:
            raise LMForgeError(f"{directory}: the adapter has layer {i} but the model has {len(sites[target])} layers")
        layer = lora.layers[sites[target][i].replace(".", "_")]
        param = (layer.lora_A if m.group(3) == "A" else layer.lora_B)[target]
        if tuple(param.shape) != tuple(t.shape):
            raise LMForgeError(f"{directory}: {key} has shape {tuple(t.shape)}, the model needs {tuple(param.shape)}; "
                               "the adapter belongs to another base model")
        with torch.no_grad():
            param.copy_(t)
        seen.add(key)
    missing = set(adapter_tensors(lora)) - seen
    if missing:
        raise LMForgeError(f"{directory}: the adapter lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    for p in lora.parameters():
        p.requires_grad_(False)
    tpl = Path(directory) / "chat_template.jinja"
    if tpl.exists():  # a fine-tuning run's template is part of what the adapter learned
        model.chat_template = tpl.read_text(encoding="utf-8")
    return merge_and_unload(model) if merge else model


def load_adapter_run(directory: str | Path) -> torch.nn.Module:
    """A LoRA run directory as a model: its base (``base_model_name_or_path``) with the adapter merged."""
    from .resolve import load_model  # (resolve imports this module lazily too)

    conf, _ = read_adapter(directory)
    base = conf.get("base_model_name_or_path")
    if not base:
        raise LMForgeError(f"{directory}: adapter_config.json names no base model; use --adapter with the base")
    return apply_adapter(load_model(base), directory)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "TARGETS", "apply_adapter", "is_adapter_dir", "load_adapter_run",
           "read_adapter", "save_adapter"]
