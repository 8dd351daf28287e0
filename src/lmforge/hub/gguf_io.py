"""GGUF files (llama architecture) read with the ``gguf`` package into lmforge's GPT.

Weights of any type the ``gguf`` package can dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ...)
are dequantized to fp32 on load (a 135M-parameter model takes about 540 MB in memory whatever its file size),
unless a decoding layout is asked for (``load_gguf(path, dtype="int4" | "int8")``): then the quantized blocks
go straight into :class:`~lmforge.models.quant.QuantLinear` layouts, one tensor at a time, never the whole
model in fp32. Q4_0 (w = d (q - 8)), Q4_1 (w = d q + m) and Q4_K (w = d sc q - dmin m per 32-weight
sub-block) are exactly the int4 layout's ``(q - 8) * scale + zero`` with groups of 32, so they load without
any rounding (scales are kept in bf16); Q8_0 and wider types go to int8 (per-row scales: Q8_0's 32-block
scales are folded into one per row and the int8 values rescaled). With ``int8`` every type goes to int8.
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


# --- quantized blocks -> QuantLinear layouts (numpy, one tensor at a time) ------------------------------

def _blocks(data: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's get_scale_min_k4: 12 bytes -> eight 6-bit (scale, min) pairs per 256-weight block."""
    sc = sc.astype(np.int32)
    s = np.empty(sc.shape[:-1] + (8,), np.int32)
    m = np.empty_like(s)
    s[..., :4], m[..., :4] = sc[..., 0:4] & 63, sc[..., 4:8] & 63
    s[..., 4:] = (sc[..., 8:12] & 0x0F) | ((sc[..., 0:4] >> 6) << 4)
    m[..., 4:] = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    return s, m


def gguf_int4(data: np.ndarray, kind: str, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0 / Q4_1 / Q4_K blocks -> (q (rows, cols) in [0, 15], scale, zero (rows, cols / 32)) with
    w = (q - 8) * scale + zero, exactly."""
    if kind == "Q4_0":
        b = _blocks(data, rows, 18)
        d = _f16(b[..., 0:2])
        return _nibbles(b[..., 2:]).reshape(rows, -1), d, np.zeros_like(d)
    if kind == "Q4_1":
        b = _blocks(data, rows, 20)
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        return _nibbles(b[..., 4:]).reshape(rows, -1), d, m + 8 * d
    if kind == "Q4_K":
        b = _blocks(data, rows, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _q4k_scales(b[..., 4:16])
        qs = b[..., 16:].reshape(rows, -1, 4, 32)           # four 64-weight chunks of 32 bytes
        q = np.stack([qs & 0x0F, qs >> 4], axis=3)           # (rows, nb, 4, 2, 32): sub-blocks 2j, 2j+1
        scale = d[..., None] * sc                            # (rows, nb, 8)
        zero = 8 * scale - dmin[..., None] * mn
        return q.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)
    raise ValueError(kind)


def gguf_int8(data: np.ndarray, kind: str, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Q8_0 blocks -> (q int8 (rows, cols), per-row scale): the row scale is the largest block scale and
    each block's values are rescaled by d_block / d_row (rounded); None for other types."""
    if kind != "Q8_0":
        return None
    b = _blocks(data, rows, 34)
    d = _f16(b[..., 0:2])                                    # (rows, nb)
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32)
    row = np.maximum(d.max(axis=1), 1e-12)
    q8 = np.clip(np.rint(q * (d / row[:, None])[..., None]), -127, 127).astype(np.int8)
    return q8.reshape(rows, -1), row


INT4_KINDS = ("Q4_0", "Q4_1", "Q4_K")


class _Part:
    """One GGUF tensor headed for (part of) a QuantLinear, with an optional row permutation."""

    def __init__(self, t: Any, perm_heads: int | None = None) -> None:
        self.t, self.kind, self.perm_heads = t, t.tensor_type.name, perm_heads
        self.rows = int(t.shape[-1]) if len(t.shape) > 1 else 1

    def rows_perm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.perm_heads is None else unpermute(x, self.perm_heads)

    def float(self) -> torch.Tensor:
        import gguf

        arr = np.asarray(gguf.quants.dequantize(self.t.data, self.t.tensor_type), dtype=np.float32)
        return self.rows_perm(torch.from_numpy(arr.reshape(self.rows, -1).copy()))


def quant_linear_from_gguf(parts: list[_Part], dtype: str) -> Any:
    """Concatenate GGUF tensors along the output rows into one QuantLinear (int4 when every part is a
    4-bit type and dtype is int4; int8 otherwise), without building the fp32 weight of the whole model."""
    from ..models.quant import QuantLinear, int4_supported, quantize_int8

    in_f = int(parts[0].t.shape[0])
    out_f = sum(p.rows for p in parts)
    if dtype == "int4" and all(p.kind in INT4_KINDS for p in parts) and int4_supported(out_f, in_f, 32):
        qs, scales, zeros = [], [], []
        for p in parts:
            q, s, z = gguf_int4(p.t.data, p.kind, p.rows)
            qs.append(p.rows_perm(torch.from_numpy(q.astype(np.int32))))
            scales.append(p.rows_perm(torch.from_numpy(s)))
            zeros.append(p.rows_perm(torch.from_numpy(z)))
        m = QuantLinear("int4", out_f, in_f, 32)
        m.set_int4(torch.cat(qs), torch.cat(scales), torch.cat(zeros))
        return m
    qs8, rs = [], []
    for p in parts:
        got = gguf_int8(p.t.data, p.kind, p.rows)
        if got is not None:
            q8, r = p.rows_perm(torch.from_numpy(got[0])), p.rows_perm(torch.from_numpy(got[1]))
        else:  # another type: this one tensor through fp32, then per-row int8
            q8, r = quantize_int8(p.float())
        qs8.append(q8)
        rs.append(r)
    m = QuantLinear("int8", out_f, in_f)
    m.set_int8(torch.cat(qs8), torch.cat(rs))
    return m


def load_gguf(path: str | Path, dtype: str | None = None) -> GPT:
    """A GGUF file as lmforge's GPT: fp32 weights, or with ``dtype`` "int8"/"int4" straight in that decoding
    layout (inference only; see the module docstring)."""
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
        return _model_from_reader(reader, path, dtype)
    except LMForgeError as e:
        raise LMForgeError(f"{path}: {e}") from None
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError, OverflowError, ZeroDivisionError) as e:
        raise LMForgeError(f"{path}: the metadata and tensors do not describe a llama model lmforge can build "
                           f"({type(e).__name__}: {first_line(e, 100)})") from None


def _config(reader: Any, path: Path, tie: bool, embedding_rows: int) -> tuple[GPTConfig, list]:
    """The model config (checked metadata numbers) and the tokenizer's token list."""
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
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    if not isinstance(tokens, list):
        raise LMForgeError("GGUF metadata tokenizer.ggml.tokens must be an array of strings")
    vocab = _number(reader, a + "vocab_size", int, 0, minimum=0) or len(tokens) or embedding_rows
    cfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, n_embd=d,
                    mlp_hidden=hidden, mlp="swiglu", norm="rmsnorm", norm_eps=eps, pos="rope", rope_theta=theta,
                    tie_embeddings=tie, extra={"gguf": str(path)})
    return cfg, tokens


def _model_from_reader(reader: Any, path: Path, dtype: str | None = None) -> GPT:
    import gguf

    if dtype in ("int8", "int4"):
        return _load_gguf_quantized(path, reader, dtype)
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
    if "token_embd.weight" not in tensors:
        raise LMForgeError("tensor token_embd.weight is missing")
    cfg, tokens = _config(reader, path, "output.weight" not in tensors, tensors["token_embd.weight"].shape[0])
    n_head, n_kv = cfg.n_head, cfg.n_kv_head or cfg.n_head

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
    _attach_tokenizer(model, reader, tokens)
    return model


def _attach_tokenizer(model: GPT, reader: Any, tokens: list) -> None:
    model.tokenizer = gguf_tokenizer(reader, tokens)
    check_tokenizer_fits(model.tokenizer, model.config.vocab_size, "GGUF")
    template = _field(reader, "tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise LMForgeError("GGUF metadata tokenizer.chat_template must be a string")
    model.chat_template = template


def _load_gguf_quantized(path: Path, reader: Any, dtype: str) -> GPT:
    """Build the GPT on the meta device, put every Linear straight into its QuantLinear layout from the
    file's blocks, and materialise only embeddings, norms and RoPE tables."""
    import gguf

    from ..models.layers import rope_tables
    from ..models.quant import finish_decoding_layout

    by_name = {t.name: t for t in reader.tensors}

    def need(name: str) -> Any:
        if name not in by_name:
            raise LMForgeError(f"tensor {name} is missing")
        return by_name[name]

    def dense(name: str) -> torch.Tensor:
        t = need(name)
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, KeyError, ValueError) as e:
            raise LMForgeError(f"tensor {name} has unsupported type {t.tensor_type!r} ({e})") from None
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        return torch.from_numpy(np.asarray(arr, dtype=np.float32).reshape(shape).copy())

    emb = need("token_embd.weight")
    cfg, tokens = _config(reader, path, "output.weight" not in by_name, int(emb.shape[-1]))
    with torch.device("meta"):
        model = GPT(cfg)
    n_head, n_kv = cfg.n_head, cfg.n_kv_head or cfg.n_head
    sd = {}
    try:
        for r in rows(LLAMA, cfg.n_layer, set() if cfg.tie_embeddings else {"untied"}):
            module, _ = r.ours.rsplit(".", 1)
            if isinstance(model.get_submodule(module), torch.nn.Linear):
                parts = [_Part(need(n)) for n in r.gguf]
                if r.ours.endswith("attn.qkv.weight"):  # llama.cpp interleaves Q and K rows for its RoPE
                    parts[0].perm_heads, parts[1].perm_heads = n_head, n_kv
                model.set_submodule(module, quant_linear_from_gguf(parts, dtype))
            else:  # embeddings and norms: dense
                sd[r.ours] = torch.cat([dense(n) for n in r.gguf])
        if cfg.tie_embeddings:  # the output head reads the embedding's blocks
            model.lm_head = quant_linear_from_gguf([_Part(need("token_embd.weight"))], dtype)
    except (NotImplementedError, KeyError, ValueError) as e:
        raise LMForgeError(f"cannot lay out a tensor as {dtype} ({e})") from None
    sd["wte.weight"] = sd["wte.weight"].to(torch.bfloat16)
    model.load_state_dict(sd, strict=False, assign=True)
    cos, sin = rope_tables(cfg.block_size, cfg.n_embd // cfg.n_head, cfg.rope_theta, cfg.rope_scaling)
    model.rope_cos, model.rope_sin = cos, sin
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise LMForgeError(f"tensors do not match the metadata ({left[:3]})")
    model.eval()
    finish_decoding_layout(model, dtype)
    _attach_tokenizer(model, reader, tokens)
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
