"""GGUF files (llama architecture) read with the ``gguf`` package into lmforge's GPT.

Weights of any type the ``gguf`` package can dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ...)
are dequantized to fp32 on load: a 135M-parameter model takes about 540 MB in memory whatever its file size.
llama.cpp stores Q and K in an interleaved RoPE layout (its converter permutes them); they are permuted back
to the "rotate half" layout lmforge and Hugging Face use. The tokenizer (GPT-2-style byte-level BPE: tokens
and merges) and the chat template come from the file's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from ..errors import LMForgeError, first_line
from ..models.gpt import GPT, GPTConfig
from ..models.weights import check_shapes
from ..tokenizers import check_tokenizer_fits
from ..tokenizers.bpe import BPETokenizer
from .weight_maps import LLAMA, rows


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    if len(f.types) > 1 or (f.types and f.types[0].name == "ARRAY"):  # arrays
        vals = [f.parts[i] for i in f.data]
        if f.types[-1].name == "STRING":
            return [bytes(v).decode("utf-8", "replace") for v in vals]
        return [v.tolist()[0] if hasattr(v, "tolist") else v for v in vals]
    v = f.parts[f.data[0]]
    if f.types[0].name == "STRING":
        return bytes(v).decode("utf-8", "replace")
    return v.tolist()[0]


_REQUIRED = object()


def _number(reader: Any, key: str, kind: type, default: Any = _REQUIRED, minimum: float = 1) -> Any:
    """A numeric metadata value, checked: present unless it has a default, a number (not a string, an
    array or a bool), finite, whole for ``int`` and at least ``minimum``. A file without
    ``llama.attention.head_count`` is then a one-line error, not ``int(None)``."""
    v = _field(reader, key)
    if v is None:
        if default is _REQUIRED:
            raise LMForgeError(f"GGUF metadata has no {key}; the file is incomplete or not a llama model")
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise LMForgeError(f"GGUF metadata {key} must be a number, not {str(v)[:40]!r}")
    if kind is int and v != int(v):
        raise LMForgeError(f"GGUF metadata {key} must be a whole number, not {v!r}")
    if v < minimum:
        raise LMForgeError(f"GGUF metadata {key} must be at least {minimum}, not {v!r}")
    return kind(v)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's permute: interleaved (x0, x1) pairs back to rotate-half halves."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | Path) -> GPT:
    import gguf  # the gguf package costs start-up time; only GGUF files need it

    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"GGUF file {path} not found")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LMForgeError(f"{path} is not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError, MemoryError) as e:
        # the gguf package reports a malformed header with whatever numpy or struct raised
        raise LMForgeError(f"{path}: cannot read GGUF ({type(e).__name__}: {str(e)[:100]}; truncated?)") from None
    try:
        return _model_from_reader(reader, path)
    except LMForgeError as e:
        raise LMForgeError(f"{path}: {e}") from None
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError, OverflowError, ZeroDivisionError) as e:
        raise LMForgeError(f"{path}: the metadata and tensors do not describe a llama model lmforge can build "
                           f"({type(e).__name__}: {first_line(e, 100)})") from None


def _model_from_reader(reader: Any, path: Path) -> GPT:
    import gguf

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise LMForgeError(f"unsupported GGUF architecture {str(arch)[:40]!r} (llama only)")
    a = f"{arch}."
    n_head = _number(reader, a + "attention.head_count", int)
    n_kv = _number(reader, a + "attention.head_count_kv", int, n_head)
    d = _number(reader, a + "embedding_length", int)
    n_layer = _number(reader, a + "block_count", int)
    hidden = _number(reader, a + "feed_forward_length", int)
    block = _number(reader, a + "context_length", int, 2048)
    eps = _number(reader, a + "attention.layer_norm_rms_epsilon", float, 1e-5, minimum=0)
    theta = _number(reader, a + "rope.freq_base", float, 10000.0, minimum=1e-9)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, KeyError, ValueError) as e:
            raise LMForgeError(f"tensor {t.name} has unsupported type {t.tensor_type!r} ({e})") from None
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        if int(np.prod(shape)) != arr.size:
            raise LMForgeError(f"tensor {t.name} data is truncated")
        tensors[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a writable copy
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    if not isinstance(tokens, list):
        raise LMForgeError("GGUF metadata tokenizer.ggml.tokens must be an array of strings")
    if "token_embd.weight" not in tensors:
        raise LMForgeError("tensor token_embd.weight is missing")
    vocab = _number(reader, a + "vocab_size", int, 0, minimum=0) or len(tokens) or \
        tensors["token_embd.weight"].shape[0]
    cfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, n_embd=d,
                    mlp_hidden=hidden, mlp="swiglu", norm="rmsnorm", norm_eps=eps, pos="rope", rope_theta=theta,
                    tie_embeddings="output.weight" not in tensors, extra={"gguf": str(path)})

    def need(name: str) -> torch.Tensor:
        if name not in tensors:
            raise LMForgeError(f"tensor {name} is missing")
        return tensors[name]

    sd = {}
    for r in rows(LLAMA, cfg.n_layer, set() if cfg.tie_embeddings else {"untied"}):
        parts = [need(n) for n in r.gguf]
        if r.ours.endswith("attn.qkv.weight"):  # llama.cpp interleaves Q and K rows for its RoPE
            parts = [unpermute(parts[0], n_head), unpermute(parts[1], n_kv), parts[2]]
        sd[r.ours] = torch.cat(parts)
    model = GPT(cfg)
    check_shapes(model, sd, "GGUF")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise LMForgeError(f"tensors do not match the metadata ({missing[:3]}, {unexpected[:3]})")
    model.eval()
    model.tokenizer = gguf_tokenizer(reader, tokens)
    check_tokenizer_fits(model.tokenizer, cfg.vocab_size, "GGUF")
    template = _field(reader, "tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise LMForgeError("GGUF metadata tokenizer.chat_template must be a string")
    model.chat_template = template
    return model


def gguf_tokenizer(reader: Any, tokens: list[str]):  # noqa: ANN201
    if not tokens:
        return None
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise LMForgeError(f"unsupported GGUF tokenizer {kind!r} (GPT-2-style byte-level BPE only)")


    raw_merges = _field(reader, "tokenizer.ggml.merges") or []
    if not all(isinstance(t, str) for t in tokens) or not isinstance(raw_merges, list) or \
            not all(isinstance(m, str) and " " in m for m in raw_merges):
        raise LMForgeError("GGUF tokenizer metadata is damaged: tokens and merges must be arrays of strings "
                           "(merges as 'a b')")
    merges = [tuple(m.split(" ", 1)) for m in raw_merges]
    try:
        hf = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise LMForgeError(f"GGUF tokenizer metadata is damaged ({str(e)[:100]})") from None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type") or []
    if not isinstance(types, list):
        raise LMForgeError("GGUF metadata tokenizer.ggml.token_type must be an array")
    special = [tokens[i] for i, ty in enumerate(types[:len(tokens)]) if ty == 3]  # CONTROL tokens
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return BPETokenizer(hf, eot=int(eos) if eos is not None else None)
