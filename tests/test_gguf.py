"""GGUF (llama) files written with the gguf package from a tiny transformers Llama: same logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import load
from lmforge.errors import LMForgeError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: rotate-half layout -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, path: Path, qtype) -> None:  # noqa: ANN001
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta") else 10000.0)
    sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(c.num_hidden_layers):
        for a, b in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                     ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                     ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                     ("mlp.down_proj", "ffn_down")):
            names[f"model.layers.{i}.{a}.weight"] = f"blk.{i}.{b}.weight"
    for k, name in names.items():
        x = sd[k]
        if name.endswith("attn_q.weight"):
            x = permute(x, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            x = permute(x, c.num_key_value_heads)
        if x.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(x, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qname, atol", [("F32", 1e-4), ("F16", 2e-2), ("Q8_0", 5e-2)])
def test_gguf_llama_matches_transformers(tmp_path: Path, qname: str, atol: float) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path / f"m-{qname}.gguf"
    write_gguf(hf, path, getattr(gguf.GGMLQuantizationType, qname))
    ours = load(path)
    x = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=atol, rtol=0)


def test_bad_gguf(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(LMForgeError, match="bad magic"):
        load(tmp_path / "bad.gguf")
    (tmp_path / "trunc.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x05" * 20)
    with pytest.raises(LMForgeError, match="trunc.gguf"):
        load(tmp_path / "trunc.gguf")


@pytest.mark.parametrize("qname, dtype, mode", [("Q4_0", "int4", "int4"), ("Q4_1", "int4", "int4"),
                                                ("Q8_0", "int4", "int8"), ("Q4_1", "int8", "int8"),
                                                ("Q8_0", "int8", "int8")])
def test_gguf_straight_into_decoding_layouts(tmp_path: Path, qname: str, dtype: str, mode: str) -> None:
    """Quantized GGUF tensors go straight into int4/int8 layouts (4-bit files into int4 exactly, Q8_0 into
    int8) and give the logits of the file's weights dequantized to fp32, up to bf16 activations."""
    from lmforge.hub import load_model
    from lmforge.models.quant import QuantLinear

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    path = tmp_path / f"m-{qname}.gguf"
    write_gguf(transformers.LlamaForCausalLM(cfg).eval(), path, getattr(gguf.GGMLQuantizationType, qname))
    ref = load_model(path)
    fast = load_model(path, decode_dtype=dtype)
    assert fast.decode_dtype == dtype
    assert {m.mode for m in fast.modules() if isinstance(m, QuantLinear)} == {mode}
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in fast.parameters())  # no fp32 matrices
    x = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        want, got = ref(x)[0], fast(x)[0].float()
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < (0.03 if mode == "int4" else 0.05), err
