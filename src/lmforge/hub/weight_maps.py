"""One declarative tensor-name table per architecture: lmforge's GPT <-> Hugging Face <-> GGUF.

Each row names an lmforge tensor (``{i}`` = block index) and the tensors it is made of in the other format;
several names are concatenated along the output dimension (lmforge fuses Q, K, V into ``attn.qkv`` and
SwiGLU's gate and up projections into ``mlp.fc``). Import (``hf.py``, ``gguf_io.py``) concatenates, export
(``export.py``) splits; the few numeric differences (GPT-2's transposed Conv1D weights, llama.cpp's
interleaved RoPE rows) are flags of the table or of the caller, not other name lists.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    ours: str                       # lmforge name, e.g. "blocks.{i}.attn.qkv.weight"
    hf: tuple[str, ...]             # Hugging Face names (without the "transformer." / "model." prefix)
    gguf: tuple[str, ...] = ()      # GGUF names (llama.cpp), when the architecture has a GGUF form
    transpose: bool = False         # GPT-2's Conv1D stores (in, out)
    when: str = ""                  # "" always; "bias" / "qkv_bias" / "untied": present only then


GPT2 = (
    Row("wte.weight", ("wte.weight",)),
    Row("wpe.weight", ("wpe.weight",)),
    *(Row(f"blocks.{{i}}.{n}.{p}", (f"h.{{i}}.{n}.{p}",)) for n in ("ln_1", "ln_2") for p in ("weight", "bias")),
    *(Row(f"blocks.{{i}}.{ours}.weight", (f"h.{{i}}.{theirs}.weight",), transpose=True)
      for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                           ("mlp.proj", "mlp.c_proj"))),
    *(Row(f"blocks.{{i}}.{ours}.bias", (f"h.{{i}}.{theirs}.bias",))
      for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                           ("mlp.proj", "mlp.c_proj"))),
    Row("ln_f.weight", ("ln_f.weight",)),
    Row("ln_f.bias", ("ln_f.bias",)),
    Row("lm_head.weight", ("lm_head.weight",), when="untied"),
)
GPT2_PREFIX = "transformer."

LLAMA = (
    Row("wte.weight", ("embed_tokens.weight",), ("token_embd.weight",)),
    Row("blocks.{i}.ln_1.weight", ("layers.{i}.input_layernorm.weight",), ("blk.{i}.attn_norm.weight",)),
    Row("blocks.{i}.ln_2.weight", ("layers.{i}.post_attention_layernorm.weight",), ("blk.{i}.ffn_norm.weight",)),
    Row("blocks.{i}.attn.qkv.weight", tuple(f"layers.{{i}}.self_attn.{x}_proj.weight" for x in "qkv"),
        tuple(f"blk.{{i}}.attn_{x}.weight" for x in "qkv")),
    Row("blocks.{i}.attn.qkv.bias", tuple(f"layers.{{i}}.self_attn.{x}_proj.bias" for x in "qkv"),
        when="qkv_bias"),
    Row("blocks.{i}.attn.proj.weight", ("layers.{i}.self_attn.o_proj.weight",), ("blk.{i}.attn_output.weight",)),
    Row("blocks.{i}.mlp.fc.weight", ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
        ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight")),
    Row("blocks.{i}.mlp.proj.weight", ("layers.{i}.mlp.down_proj.weight",), ("blk.{i}.ffn_down.weight",)),
    Row("ln_f.weight", ("norm.weight",), ("output_norm.weight",)),
    Row("lm_head.weight", ("lm_head.weight",), ("output.weight",), when="untied"),
)
LLAMA_PREFIX = "model."


def rows(table: tuple[Row, ...], n_layer: int, present: set[str]) -> Iterator[Row]:
    """The table's rows with ``{i}`` expanded for each block; conditional rows only when ``when`` is in
    ``present`` (e.g. {"untied", "qkv_bias"})."""
    for r in table:
        if r.when and r.when not in present:
            continue
        if "{i}" not in r.ours:
            yield r
            continue
        for i in range(n_layer):
            yield Row(r.ours.format(i=i), tuple(n.format(i=i) for n in r.hf), tuple(n.format(i=i) for n in r.gguf),
                      r.transpose, r.when)
