from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge import load
from lmforge.data import StreamSampler, TokenData
from lmforge.errors import LMForgeError
from lmforge.evaluate import evaluate
from lmforge.generation import GenerationConfig, generate_ids
from lmforge.models.rnn import GRULM, LSTMLM, RNNLM, LSTMCellRef, RNNConfig
from lmforge.train import Trainer, TrainingInterrupted, train

from .conftest import tiny_train_config


def small(cls=LSTMLM, **kw) -> LSTMLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, n_layer=2, n_embd=16, hidden=24, block_size=16, dropout=0.0, dropout_emb=0.0,
               dropout_out=0.0, cell=cls.model_type)
    cfg.update(kw)
    return cls(RNNConfig(**cfg)).eval()


def test_lstm_cell_reference_matches_fused_kernel() -> None:
    torch.manual_seed(0)
    fused = torch.nn.LSTM(8, 12, batch_first=True)
    ref = LSTMCellRef(8, 12)
    ref.load_state_dict({k.removesuffix("_l0"): v for k, v in fused.state_dict().items()})
    x = torch.randn(3, 7, 8)
    h0 = (torch.randn(1, 3, 12), torch.randn(1, 3, 12))
    y1, (h1, c1) = fused(x, h0)
    y2, (h2, c2) = ref(x, (h0[0][0], h0[1][0]))
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c1[0], c2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [RNNLM, GRULM, LSTMLM])
def test_state_carries_across_chunks(cls) -> None:
    m = small(cls)
    idx = torch.randint(1, 40, (2, 20))
    full, _ = m.forward_logits(idx, m.init_state(2))
    state = m.init_state(2)
    a, state = m.forward_logits(idx[:, :7], state)
    b, state = m.forward_logits(idx[:, 7:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


def test_state_resets_at_document_boundary() -> None:
    m = small()
    m.eot_id = 0
    doc2 = torch.randint(1, 40, (1, 6))
    alone, _ = m.forward_logits(doc2)
    prefix = torch.cat([torch.randint(1, 40, (1, 9)), torch.zeros(1, 1, dtype=torch.long)], 1)  # ... <eot>
    both, _ = m.forward_logits(torch.cat([prefix, doc2], 1))
    torch.testing.assert_close(both[:, 10:], alone, atol=1e-5, rtol=1e-5)  # nothing leaks past <eot>


def test_tied_embeddings_with_projection() -> None:
    m = small(tie_embeddings=True)
    assert m.head.weight is m.embedding.weight and m.proj is not None
    with pytest.raises(LMForgeError, match="cell must be one of rnn, gru, lstm"):
        RNNConfig(cell="transformer")


def test_stream_sampler_is_consecutive(char_data: Path) -> None:
    split = TokenData(char_data).split("train")
    s = StreamSampler(split, batch_size=3, block_size=8)
    x1, y1 = s.next()
    x2, _ = s.next()
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    for b in range(3):  # row b of the second window continues row b of the first
        assert x2[b, 0].item() == y1[b, -1].item()
        assert x1[b, 0].item() == int(split.read(b * s.stream_len, 1)[0])


def test_lstm_trains_resumes_evaluates_generates(tmp_path: Path, char_data: Path) -> None:
    shape = dict(n_layer=1, n_embd=16, hidden=32, block_size=16)
    full = tmp_path / "full"
    train(tiny_train_config(char_data, full, model="lstm", preset="tiny", max_steps=10, model_args=shape))
    part = tmp_path / "part"
    trainer = Trainer(tiny_train_config(char_data, part, model="lstm", preset="tiny", max_steps=10,
                                        checkpoint_interval=3, model_args=shape))
    orig, calls = trainer.train_step, []

    def stop_at_7(*args: int) -> tuple[float, int, int]:
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return orig(*args)

    trainer.train_step = stop_at_7  # type: ignore[method-assign]
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    train(Trainer.config_for_resume(part, {}), resume=True)

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(full) == pytest.approx(losses(part), abs=1e-6)  # the carried state was checkpointed too
    m = load(full)
    assert isinstance(m, LSTMLM) and m.eot_id == m.tokenizer.eot_id
    r = evaluate(m, char_data, split="val")
    n_val = len(TokenData(char_data).split("val"))
    assert n_val - 16 <= r["tokens"] < n_val  # every token scored once, but each stream's first (<= 16 streams)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["loss"] < math.log(m.vocab_size)  # better than uniform after 12 steps on real text
    a = generate_ids(m, [5, 6], GenerationConfig(max_new_tokens=15, seed=1, ignore_eos=True))
    b = generate_ids(m, [5, 6], GenerationConfig(max_new_tokens=15, seed=1, ignore_eos=True, use_cache=False))
    assert a == b  # carried state == re-reading the whole sequence
    assert isinstance(lmforge.generate(m, "ROMEO:", max_new_tokens=10, seed=1), str)
