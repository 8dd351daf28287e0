"""Hugging Face checkpoints (GPT-2, Llama, Qwen2) into lmforge's GPT: logits within 1e-4 and identical
greedy decoding, against transformers (a dev dependency only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge import load
from lmforge.errors import LMForgeError
from lmforge.generation import GenerationConfig, generate_ids

transformers = pytest.importorskip("transformers")


def tiny_hf(kind: str):  # noqa: ANN201
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
    if kind == "mistral-window":  # sequences longer than the window: sliding-window attention matters
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=6,
                                                                          tie_word_embeddings=False))
    if kind == "llama-tied":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=False))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-tied", "qwen2", "mistral-window"])
def test_logits_and_greedy_match_transformers(tmp_path: Path, kind: str) -> None:
    hf = tiny_hf(kind).eval()
    with torch.no_grad():  # random biases so Qwen2's QKV biases matter
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load(tmp_path)
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    prompt = idx[0, :5]
    with torch.no_grad():
        hf_out = hf.generate(prompt[None], max_new_tokens=20, do_sample=False, min_new_tokens=20,
                             pad_token_id=0)[0, 5:].tolist()
    our_out = generate_ids(ours, prompt.tolist(), GenerationConfig(max_new_tokens=20, temperature=0,
                                                                   ignore_eos=True))[0]
    assert our_out == hf_out


def test_missing_and_unsupported(tmp_path: Path) -> None:
    hf = tiny_hf("gpt2")
    hf.save_pretrained(tmp_path / "ok", safe_serialization=True)
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(LMForgeError, match="no model.safetensors"):
        load(tmp_path / "ok")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "falcon"}')
    with pytest.raises(LMForgeError, match="unknown model type 'falcon'"):
        load(tmp_path / "odd")


def test_gpt2_vocab_merges_tokenizer_and_a_tokenizer_that_does_not_fit(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, hello there"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    n = tok.get_vocab_size()
    eot = tok.token_to_id("<|endoftext|>")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=n, n_positions=32, n_embd=16, n_layer=1,
                                                              n_head=2, bos_token_id=eot, eos_token_id=eot))
    hf.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.model.save(str(tmp_path / "m"))  # GPT-2's original vocab.json + merges.txt, no tokenizer.json
    assert (tmp_path / "m" / "vocab.json").exists() and not (tmp_path / "m" / "tokenizer.json").exists()
    m = load(tmp_path / "m")
    assert m.tokenizer.decode(m.tokenizer.encode("hello world")) == "hello world"
    assert m.tokenizer.eot_id == eot
    # the same tokenizer beside a model with a smaller vocabulary: refused, with both sizes
    small = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=n - 10, n_positions=32, n_embd=16,
                                                                 n_layer=1, n_head=2))
    small.save_pretrained(tmp_path / "s", safe_serialization=True)
    tok.save(str(tmp_path / "s" / "tokenizer.json"))
    with pytest.raises(LMForgeError, match=f"tokenizer has {n} tokens but the model's vocabulary has only {n - 10}"):
        load(tmp_path / "s")
