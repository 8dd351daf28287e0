"""Export lmforge GPT runs to Hugging Face format (``AutoModelForCausalLM`` / ``AutoTokenizer`` load them).

* learned positions + LayerNorm + GELU  -> GPT-2 (zero biases where lmforge has none; Conv1D (in, out) layout)
* RoPE + RMSNorm                        -> Llama. SwiGLU maps directly; a plain GELU MLP is written exactly as
  Llama's gated MLP with ``hidden_act="gelu"``, ``mlp_bias=True``, gate = lmforge's fc, and an "up"
  projection with zero weights and bias 1 (so act(gate x) * 1), down = lmforge's projection.

Tokenizers: byte-level BPE is already a ``tokenizer.json``; the character tokenizer becomes a Hugging Face BPE
with no merges and ``byte_fallback`` (the same ids, the same <0xNN> fallback for unseen characters).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models

from ..errors import LMForgeError
from ..models.gpt import GPT
from ..tokenizers import EOT, BPETokenizer, CharTokenizer
from ..utils import atomic_directory, atomic_write, atomic_write_json, refuse_nonempty
from .weight_maps import GPT2, GPT2_PREFIX, LLAMA, LLAMA_PREFIX, rows


def hf_config_and_weights(model: GPT) -> tuple[dict, dict[str, torch.Tensor]]:
    c = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    hd = c.n_embd // c.n_head

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n)

    if c.qk_norm:
        raise LMForgeError("QK-norm has no GPT-2 or Llama form in Hugging Face; export a model trained without "
                           "--qk-norm")
    if c.pos == "learned" and c.norm == "layernorm" and c.mlp in ("gelu", "gelu_tanh"):
        if (c.n_kv_head or c.n_head) != c.n_head:
            raise LMForgeError("GPT-2 format has no grouped-query attention")
        cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
               "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
               "activation_function": "gelu_new" if c.mlp == "gelu_tanh" else "gelu",
               "layer_norm_epsilon": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
               "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        w = {}
        for r in rows(GPT2, c.n_layer, set() if c.tie_embeddings else {"untied"}):
            t = sd.get(r.ours)
            if t is None:  # a bias lmforge does not have: zeros of the weight's output size
                t = zeros(sd[r.ours.removesuffix(".bias") + ".weight"].shape[0])
            name = r.hf[0] if r.ours == "lm_head.weight" else GPT2_PREFIX + r.hf[0]
            w[name] = t.t().contiguous() if r.transpose else t
        return cfg, w
    if c.pos == "rope" and c.norm == "rmsnorm":
        if c.rope_scaling:
            raise LMForgeError("export of RoPE scaling is not supported")
        kv = c.n_kv_head or c.n_head
        gated = c.mlp == "swiglu"
        cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size,
               "hidden_size": c.n_embd, "intermediate_size": c.hidden, "num_hidden_layers": c.n_layer,
               "num_attention_heads": c.n_head, "num_key_value_heads": kv, "head_dim": hd,
               "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
               "tie_word_embeddings": c.tie_embeddings, "attention_bias": bool(c.qkv_bias or c.bias),
               "mlp_bias": (not gated) or c.bias,
               "hidden_act": "silu" if gated else {"gelu_tanh": "gelu_pytorch_tanh"}.get(c.mlp, c.mlp)}
        present = ({"qkv_bias"} if cfg["attention_bias"] else set()) | (set() if c.tie_embeddings else {"untied"})
        w = {}
        for r in rows(LLAMA, c.n_layer, present):
            t = sd.get(r.ours)
            if t is None:  # QKV biases lmforge does not have
                t = zeros((c.n_head + 2 * kv) * hd)
            if len(r.hf) == 3:  # fused Q, K, V
                parts = t.split([c.n_head * hd, kv * hd, kv * hd])
            elif len(r.hf) == 2:  # fused gate and up; a GELU MLP is act(gate x) * up(x) with up(x) = 0 x + 1
                parts = t.chunk(2, dim=0) if gated else (t, torch.zeros_like(t))
            else:
                parts = (t,)
            w.update((n if r.ours == "lm_head.weight" else LLAMA_PREFIX + n, x) for n, x in zip(r.hf, parts))
        for i in range(c.n_layer):  # biases Llama has and the table does not map (o_proj, MLP)
            p, q = f"blocks.{i}.", f"model.layers.{i}."
            if cfg["attention_bias"]:
                w[q + "self_attn.o_proj.bias"] = sd.get(p + "attn.proj.bias", zeros(c.n_embd))
            if cfg["mlp_bias"]:
                fb = sd.get(p + "mlp.fc.bias")
                w[q + "mlp.gate_proj.bias"] = fb.chunk(2)[0] if (fb is not None and gated) else \
                    (fb if fb is not None else zeros(c.hidden))
                w[q + "mlp.up_proj.bias"] = fb.chunk(2)[1] if (fb is not None and gated) else \
                    (zeros(c.hidden) if gated else torch.ones(c.hidden))
                w[q + "mlp.down_proj.bias"] = sd.get(p + "mlp.proj.bias", zeros(c.n_embd))
        return cfg, w
    raise LMForgeError(f"no Hugging Face architecture matches pos={c.pos}, norm={c.norm}, mlp={c.mlp}; "
                       "GPT-2 (learned + layernorm + gelu) and Llama (rope + rmsnorm) are supported")


def char_tokenizer_to_hf(tok: CharTokenizer):  # noqa: ANN201

    vocab = {EOT: 0}
    for i, ch in enumerate(tok.chars):
        vocab[ch] = i + 1
    if tok.byte_fallback:
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = tok._byte_offset + b
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=tok.byte_fallback, unk_token=None,
                              ignore_merges=True))
    hf.add_special_tokens([EOT])
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return hf


def export_hf(model: GPT, out: str | Path) -> Path:
    """Write the Hugging Face directory ``out``, built in a temporary sibling and renamed into place at the
    end: a failure (a tokenizer with no Hugging Face form, a full disk, Ctrl-C) leaves no half-written
    ``out``."""
    if not isinstance(model, GPT):
        raise LMForgeError(f"only GPT models export to Hugging Face format, not {model.model_type}")
    out = refuse_nonempty(out)
    tok = model.tokenizer
    if tok is not None and not isinstance(tok, (BPETokenizer, CharTokenizer)):  # fail before writing anything
        raise LMForgeError(f"the {tok.kind} tokenizer has no Hugging Face form; only char and bpe runs export")
    with atomic_directory(out) as tmp:
        _write_hf(model, tmp)
    return out


def _write_hf(model: GPT, out: Path) -> None:
    cfg, weights = hf_config_and_weights(model)
    tok = model.tokenizer
    if tok is not None:
        cfg["eos_token_id"] = cfg["bos_token_id"] = tok.eot_id
    atomic_write_json(out / "config.json", cfg)
    atomic_write(out / "model.safetensors",
                 lambda tmp: save_file({k: v.contiguous() for k, v in weights.items()}, tmp,
                                       metadata={"format": "pt"}))
    atomic_write_json(out / "generation_config.json", {"eos_token_id": tok.eot_id if tok else None})
    if tok is not None:
        if isinstance(tok, BPETokenizer):
            hf = tok.hf
        elif isinstance(tok, CharTokenizer):
            hf = char_tokenizer_to_hf(tok)
        else:
            raise LMForgeError(f"the {tok.kind} tokenizer has no Hugging Face form")
        atomic_write(out / "tokenizer.json", lambda tmp: hf.save(tmp))
        eot = tok.id_to_token(tok.eot_id)
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eot, "bos_token": eot,
                "model_max_length": model.config.block_size, "clean_up_tokenization_spaces": False}
        if model.chat_template is not None:  # transformers' apply_chat_template reads it here
            conf["chat_template"] = model.chat_template
        atomic_write_json(out / "tokenizer_config.json", conf)
    (out / "README.md").write_text(f"Exported by lmforge from a {model.config.n_layer}-layer GPT "
                                   f"({json.dumps(cfg['model_type'])}).\n", encoding="utf-8")
