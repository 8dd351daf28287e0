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

from ..errors import LMForgeError
from ..models.gpt import GPT, GPTConfig
from ..tokenizers.bpe import BPETokenizer
from .hf import check_tokenizer_fits
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
    except (ValueError, OSError, IndexError) as e:
        raise LMForgeError(f"{path}: cannot read GGUF ({str(e)[:100]}; truncated?)") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise LMForgeError(f"{path}: unsupported GGUF architecture {arch!r} (llama only)")
    a = f"{arch}."
    n_head = int(_field(reader, a + "attention.head_count"))
    n_kv = int(_field(reader, a + "attention.head_count_kv", n_head))
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, KeyError, ValueError) as e:
            raise LMForgeError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type!r} ({e})") from None
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        if int(np.prod(shape)) != arr.size:
            raise LMForgeError(f"{path}: tensor {t.name} data is truncated")
        tensors[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a writable copy
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    vocab = int(_field(reader, a + "vocab_size", 0) or len(tokens) or tensors["token_embd.weight"].shape[0])
    d = int(_field(reader, a + "embedding_length"))
    cfg = GPTConfig(vocab_size=vocab, block_size=int(_field(reader, a + "context_length", 2048)),
                    n_layer=int(_field(reader, a + "block_count")), n_head=n_head, n_kv_head=n_kv, n_embd=d,
                    mlp_hidden=int(_field(reader, a + "feed_forward_length")), mlp="swiglu", norm="rmsnorm",
                    norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)), pos="rope",
                    rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
                    tie_embeddings="output.weight" not in tensors, extra={"gguf": str(path)})

    def need(name: str) -> torch.Tensor:
        if name not in tensors:
            raise LMForgeError(f"{path}: tensor {name} is missing")
        return tensors[name]

    sd = {}
    for r in rows(LLAMA, cfg.n_layer, set() if cfg.tie_embeddings else {"untied"}):
        parts = [need(n) for n in r.gguf]
        if r.ours.endswith("attn.qkv.weight"):  # llama.cpp interleaves Q and K rows for its RoPE
            parts = [unpermute(parts[0], n_head), unpermute(parts[1], n_kv), parts[2]]
        sd[r.ours] = torch.cat(parts)
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise LMForgeError(f"{path}: tensors do not match the metadata ({missing[:3]}, {unexpected[:3]})")
    model.eval()
    model.tokenizer = gguf_tokenizer(reader, tokens)

    check_tokenizer_fits(model.tokenizer, cfg.vocab_size, str(path))
    model.chat_template = _field(reader, "tokenizer.chat_template")
    return model


def gguf_tokenizer(reader: Any, tokens: list[str]):  # noqa: ANN201
    if not tokens:
        return None
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise LMForgeError(f"unsupported GGUF tokenizer {kind!r} (GPT-2-style byte-level BPE only)")


    merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
    hf = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type") or []
    special = [tokens[i] for i, ty in enumerate(types) if ty == 3]  # CONTROL tokens
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return BPETokenizer(hf, eot=int(eos) if eos is not None else None)
