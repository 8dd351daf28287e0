"""Export to Hugging Face format: transformers loads it and gives the same logits and tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge import load
from lmforge.cli import main
from lmforge.hub.export import export_hf
from lmforge.train import train

from .conftest import tiny_train_config

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("shape", [
    dict(pos="learned", norm="layernorm", mlp="gelu", tie_embeddings=True),   # -> GPT-2
    dict(pos="rope", norm="rmsnorm", mlp="gelu", tie_embeddings=False),       # -> Llama (the demo's shape)
    dict(pos="rope", norm="rmsnorm", mlp="relu2", tie_embeddings=True),       # -> Llama with ReLU^2
    dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1),              # -> Llama with GQA
])
def test_export_round_trip_through_transformers(tmp_path: Path, char_data: Path, shape: dict) -> None:
    run = tmp_path / "run"
    train(tiny_train_config(char_data, run, max_steps=5, model_args=dict(n_layer=2, n_head=2, n_embd=32,
                                                                         block_size=32, **shape)))
    ours = load(run)
    out = export_hf(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "ROMEO: what light through yonder window breaks? Ж🙂"  # unseen characters use byte fallback
    ids = ours.tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.decode(ids) == text
    x = torch.tensor([ids[:30]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)
    again = load(out)  # and lmforge reads its own export back
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], ours(x)[0], atol=1e-4, rtol=1e-4)


def test_export_cli(tmp_path: Path, trained_run: Path, capsys) -> None:
    assert main(["export", str(trained_run), "--format", "hf", "--out", str(tmp_path / "e")]) == 0
    ours, exported = load(trained_run), load(tmp_path / "e")  # the export reads back with the same logits
    x = torch.tensor([ours.tokenizer.encode("ROMEO: ")])
    with torch.no_grad():
        torch.testing.assert_close(exported(x)[0], ours(x)[0], atol=1e-4, rtol=1e-4)
    assert exported.tokenizer.encode("ROMEO: ") == ours.tokenizer.encode("ROMEO: ")
    assert main(["export", str(trained_run), "--format", "hf", "--out", str(tmp_path / "e")]) == 2
    assert "already exists" in capsys.readouterr().err
