"""Hugging Face checkpoint directories (GPT-2 and Llama-family) loaded into lmforge's own GPT.

No ``transformers`` at run time: ``config.json`` is mapped onto :class:`GPTConfig` and the safetensors
weights (single file or sharded with an index) are renamed onto lmforge's modules:

* GPT-2: learned positions, LayerNorm with biases, GELU (tanh approximation), tied head; its ``Conv1D``
  weights are stored (in, out) and are transposed.
* Llama, Mistral, Qwen2 (and SmolLM, which is Llama): RoPE (theta, linear scaling), RMSNorm (eps),
  SwiGLU (gate and up projections fused into one matrix), grouped-query attention, tied or untied head,
  Qwen2's QKV biases. Hugging Face's RoPE convention ("rotate half") is lmforge's, so q/k need no permutation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import LMForgeError
from ..models.gpt import GPT, GPTConfig
from ..models.weights import check_shapes
from ..tokenizers import check_tokenizer_fits
from ..tokenizers.bpe import BPETokenizer
from ..utils import read_json
from .weight_maps import GPT2, GPT2_PREFIX, LLAMA, LLAMA_PREFIX, rows

LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED = ("gpt2", *LLAMA_LIKE)


def weight_file(directory: Path, name: Any, index: Path | None = None) -> Path:
    """The path of a weight file named by a checkpoint (``model.safetensors`` or a shard of the index),
    refused unless it lies inside ``directory``: a model's files must not read ``../other.safetensors``,
    an absolute path or, through a symlink, anything else on the machine. The one exception is Hugging
    Face's cache layout, where ``snapshots/REV/NAME`` links into the repository's ``blobs/``."""
    where = f"{index}: weight shard" if index else "weight file"
    if not isinstance(name, str) or not name or "\0" in name:
        raise LMForgeError(f"{where} {name!r} is not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise LMForgeError(f"{where} {name!r} points outside the model directory {directory}; refusing to read it")
    path = directory / rel
    if not path.exists():
        raise LMForgeError(f"{directory}: {where} {name} is missing" if index else
                           f"{directory}: {name} is missing")
    root, target = directory.resolve(), path.resolve()
    inside = target.is_relative_to(root)
    hf_cache = root.parent.name == "snapshots" and target.is_relative_to(root.parent.parent / "blobs")
    if not (inside or hf_cache):
        raise LMForgeError(f"{where} {name!r} is a link to {target}, outside the model directory {directory}; "
                           "refusing to read it")
    if not target.is_file():
        raise LMForgeError(f"{where} {name!r} is not a regular file")
    return path


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        obj = read_json(index, "safetensors index")
        wmap = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise LMForgeError(f"{index} is damaged: expected {{\"weight_map\": {{tensor name: shard file}}}}")
        files = list(dict.fromkeys(weight_file(directory, f, index) for f in wmap.values()))
    elif (directory / "model.safetensors").exists() or (directory / "model.safetensors").is_symlink():
        files = [weight_file(directory, "model.safetensors")]
    else:
        raise LMForgeError(f"{directory} has no model.safetensors (nor a sharded index); only safetensors "
                           "checkpoints are read")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise LMForgeError(f"{f} is truncated or corrupted ({str(e)[:80]})") from None
    return out


_REQUIRED = object()


def _field(cfg: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED, minimum: float | None = None
           ) -> Any:
    """``config.json[key]`` checked: present (unless it has a default), of ``kind`` (int accepted for float,
    bool never taken for a number) and at least ``minimum``; a damaged config is a one-line error."""
    v = cfg.get(key, default)
    if v is _REQUIRED:
        raise LMForgeError(f"config.json of this {cfg.get('model_type')} checkpoint has no {key!r}; the checkpoint "
                           "is incomplete or damaged")
    if v is None and default is None:
        return None
    numeric = kind in (int, float)
    ok = isinstance(v, kind) or (kind is float and isinstance(v, int))
    if not ok or (numeric and isinstance(v, bool)):
        raise LMForgeError(f"config.json: {key} must be {'an' if kind is int else 'a'} {kind.__name__}, not {v!r}")
    if numeric and minimum is not None and not v >= minimum:  # also refuses nan
        raise LMForgeError(f"config.json: {key} must be at least {minimum}, not {v!r}")
    return v


def gpt_config_from_hf(cfg: dict[str, Any]) -> GPTConfig:
    if not isinstance(cfg, dict):
        raise LMForgeError("config.json must be a JSON object of settings")
    try:
        return _gpt_config_from_hf(cfg)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:  # a combination no check foresaw
        raise LMForgeError(f"config.json does not describe a model lmforge can build ({e})") from None


def _gpt_config_from_hf(cfg: dict[str, Any]) -> GPTConfig:
    mt = cfg.get("model_type")
    if mt == "gpt2":
        act = _field(cfg, "activation_function", str, "gelu_new")
        return GPTConfig(vocab_size=_field(cfg, "vocab_size", int, minimum=1),
                         block_size=_field(cfg, "n_positions", int, 1024, minimum=1),
                         n_layer=_field(cfg, "n_layer", int, minimum=1), n_head=_field(cfg, "n_head", int, minimum=1),
                         n_embd=_field(cfg, "n_embd", int, minimum=1), bias=True,
                         mlp="gelu" if act == "gelu" else "gelu_tanh", norm="layernorm",
                         norm_eps=_field(cfg, "layer_norm_epsilon", float, 1e-5, minimum=0), pos="learned",
                         tie_embeddings=_field(cfg, "tie_word_embeddings", bool, True), extra={"hf_model_type": mt})
    if mt in LLAMA_LIKE:
        d, h = _field(cfg, "hidden_size", int, minimum=1), _field(cfg, "num_attention_heads", int, minimum=1)
        if _field(cfg, "head_dim", int, None) not in (None, d // h):
            raise LMForgeError(f"unsupported: head_dim {cfg['head_dim']} != hidden_size / heads ({d // h})")
        act = _field(cfg, "hidden_act", str, "silu")
        gelu = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu2": "relu2"}.get(act)
        if act != "silu" and not (gelu and cfg.get("mlp_bias")):
            raise LMForgeError(f"unsupported activation {act!r} (SwiGLU with silu, or lmforge's own GELU export)")
        if act == "silu" and cfg.get("mlp_bias"):
            raise LMForgeError("unsupported: biases in a SwiGLU MLP (mlp_bias)")
        scaling = _field(cfg, "rope_scaling", dict, None)
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("linear", "default"):
            raise LMForgeError(f"unsupported rope_scaling {scaling!r} (linear only)")
        if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
            scaling = {"type": "linear", "factor": _field(scaling, "factor", float, minimum=1e-9)}
        else:
            scaling = None
        theta = cfg.get("rope_theta") or (_field(cfg, "rope_parameters", dict, None) or {}).get("rope_theta", 10000.0)
        theta = _field({"rope_theta": theta}, "rope_theta", float, minimum=1e-9)
        # Mistral attends to the last `sliding_window` positions only; Qwen2 only with use_sliding_window
        window = _field(cfg, "sliding_window", int, None, minimum=1) if (mt == "mistral" or cfg.get(
            "use_sliding_window")) else None
        return GPTConfig(vocab_size=_field(cfg, "vocab_size", int, minimum=1),
                         block_size=_field(cfg, "max_position_embeddings", int, 2048, minimum=1),
                         n_layer=_field(cfg, "num_hidden_layers", int, minimum=1), n_head=h,
                         n_kv_head=_field(cfg, "num_key_value_heads", int, None, minimum=1) or h, n_embd=d,
                         mlp_hidden=_field(cfg, "intermediate_size", int, minimum=1), mlp=gelu or "swiglu",
                         norm="rmsnorm", norm_eps=_field(cfg, "rms_norm_eps", float, 1e-6, minimum=0), pos="rope",
                         rope_theta=float(theta), rope_scaling=scaling, bias=False,
                         qkv_bias=True if mt == "qwen2" else bool(cfg.get("attention_bias", False)),
                         tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                         sliding_window=int(window) if window else None, extra={"hf_model_type": mt})


def _strip(t: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in t.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def gpt_state_dict_from_hf(cfg: GPTConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> lmforge's GPT state dict, by the architecture's table (hub/weight_maps.py)."""
    mt = cfg.extra["hf_model_type"]
    table, prefix = (GPT2, GPT2_PREFIX) if mt == "gpt2" else (LLAMA, LLAMA_PREFIX)
    t = _strip(t, (prefix,))

    def need(key: str) -> torch.Tensor:
        if key not in t:
            raise LMForgeError(f"checkpoint is missing tensor {key!r} for a {mt} model")
        return t[key].float()

    present = {"untied"} if not cfg.tie_embeddings else set()
    if cfg.qkv_bias:
        present.add("qkv_bias")
    sd: dict[str, torch.Tensor] = {}
    for r in rows(table, cfg.n_layer, present):
        names = r.hf
        if r.ours.endswith("mlp.fc.weight") and mt != "gpt2" and cfg.mlp != "swiglu":
            # lmforge's GELU MLP exported as gelu(gate x) * (0 x + 1): check the "up" really is constant 1
            gate, up = names
            up_w, up_b = need(up), need(up.replace(".weight", ".bias"))
            down_b = need(up.replace("up_proj.weight", "down_proj.bias"))
            if up_w.abs().max() > 0 or not torch.all(up_b == 1) or \
                    need(gate.replace(".weight", ".bias")).abs().max() > 0 or down_b.abs().max() > 0:
                raise LMForgeError("unsupported: a gated GELU MLP (only lmforge's own ungated GELU export reads back)")
            names = (gate,)
        w = torch.cat([need(n) for n in names])
        sd[r.ours] = w.t().contiguous() if r.transpose else w
    return sd


def load_hf_tokenizer(directory: Path):  # noqa: ANN201


    has_json = (directory / "tokenizer.json").exists()
    has_bpe_files = (directory / "vocab.json").exists() and (directory / "merges.txt").exists()
    if not has_json and not has_bpe_files:
        return None

    eos = None
    for name in ("tokenizer_config.json", "generation_config.json", "config.json"):
        p = directory / name
        if p.exists():
            c = read_json(p, "tokenizer settings")
            if not isinstance(c, dict):
                continue
            tok = c.get("eos_token")
            eos = (tok.get("content") if isinstance(tok, dict) else tok) if tok else None
            eos = eos if isinstance(eos, str) else None
            if eos is None and isinstance(c.get("eos_token_id"), int):
                eos = c["eos_token_id"]
            if eos is not None:
                break
    if has_json:
        try:
            hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise LMForgeError(f"{directory / 'tokenizer.json'} cannot be read by the tokenizers library "
                               f"({e})") from None
    else:  # GPT-2's original files: byte-level BPE from vocab.json + merges.txt

        try:
            hf = HFTokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
        except Exception as e:
            raise LMForgeError(f"{directory}: vocab.json/merges.txt are not a byte-level BPE tokenizer ({e})") from None
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        if isinstance(eos, str) and hf.token_to_id(eos) is not None:

            hf.add_special_tokens([AddedToken(eos, special=True, normalized=False)])
    return BPETokenizer(hf, eot=eos)


class HFCheckpoint:
    """Registry entry for Hugging Face model types: ``from_pretrained`` returns an lmforge GPT."""

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GPT:
        directory = Path(directory)
        try:
            cfg = gpt_config_from_hf(read_json(directory / "config.json", "model config"))
        except LMForgeError as e:
            raise LMForgeError(f"{directory}: {e}") from None
        model = GPT(cfg)
        sd = gpt_state_dict_from_hf(cfg, read_safetensors(directory))
        check_shapes(model, sd, str(directory))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
        if missing or unexpected:
            raise LMForgeError(f"{directory}: weights do not match the config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        model.eval()
        model.tokenizer = load_hf_tokenizer(directory)
        check_tokenizer_fits(model.tokenizer, cfg.vocab_size, str(directory))
        model.chat_template = hf_chat_template(directory)
        return model


def hf_chat_template(directory: Path) -> str | None:
    """``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates of which the
    ``default`` one is used), else a ``chat_template.jinja`` file beside it, as transformers reads them."""
    p = directory / "tokenizer_config.json"
    conf = read_json(p, "tokenizer config") if p.exists() else {}
    tpl = conf.get("chat_template") if isinstance(conf, dict) else None
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl
                 if isinstance(t, dict) and isinstance(t.get("name"), str)}
        tpl = named.get("default")
    if not tpl and (directory / "chat_template.jinja").exists():
        try:
            tpl = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            raise LMForgeError(f"{directory / 'chat_template.jinja'} cannot be read as UTF-8 text ({e})") from None
    if tpl is not None and not isinstance(tpl, str):
        raise LMForgeError(f"{p}: chat_template must be a string")
    return tpl or None
