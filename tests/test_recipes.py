"""Recipe options: the Muon optimizer, QK-norm, ReLU^2 MLPs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge import load
from lmforge.errors import LMForgeError
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.train import Trainer, TrainingInterrupted, train
from lmforge.train.optim import MuonAdamW, newton_schulz5

from .conftest import step_losses, tiny_train_config

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)


def test_newton_schulz_orthogonalises_and_batches() -> None:
    torch.manual_seed(0)
    for shape in ((16, 48), (48, 16)):
        G = torch.randn(*shape)
        s = torch.linalg.svdvals(newton_schulz5(G))
        # the quintic iteration is approximate by design: singular values land near 1, not on it
        assert s.min() > 0.5 and s.max() < 1.3, s
        stack = torch.randn(3, *shape)
        torch.testing.assert_close(newton_schulz5(stack)[1], newton_schulz5(stack[1]), atol=1e-5, rtol=1e-5)


def test_adamw_groups_match_torch_adamw() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    groups = lambda m: [{"params": [m.weight], "weight_decay": 0.1}, {"params": [m.bias], "weight_decay": 0.0}]  # noqa: E731
    ours = MuonAdamW(groups(a), lr=1e-2, betas=(0.9, 0.99))
    ref = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(5):
        x = torch.randn(6, 8)
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.bias, b.bias, atol=1e-6, rtol=1e-6)


def test_muon_trains_only_hidden_matrices_and_learns(tmp_path: Path, char_data: Path) -> None:
    run = tmp_path / "muon"
    train(tiny_train_config(char_data, run, max_steps=30, optimizer="muon", muon_lr=0.02, model_args=SHAPE))
    losses = step_losses(run)
    assert losses[30] < losses[1] - 0.5
    m = GPT(GPTConfig(vocab_size=65, **SHAPE))
    hidden = {id(p) for p in m.hidden_matrices()}
    names = {n for n, p in m.named_parameters() if id(p) in hidden}
    assert names and all(n.startswith("blocks.") and n.endswith(".weight") for n in names)
    assert "wte.weight" not in names and "lm_head.weight" not in names


def test_muon_resume_is_exact(tmp_path: Path, char_data: Path) -> None:
    kw = dict(optimizer="muon", model_args=SHAPE)
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_train_config(char_data, full, max_steps=12, **kw))
    trainer = Trainer(tiny_train_config(char_data, part, max_steps=12, checkpoint_interval=4, **kw))
    orig, calls = trainer.train_step, {"n": 0}

    def crash_after_7(*args: int) -> tuple[float, int, int]:
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return orig(*args)

    trainer.train_step = crash_after_7  # type: ignore[method-assign]
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    assert json.loads((part / "checkpoint" / "state.json").read_text())["step"] == 7
    train(Trainer.config_for_resume(part, {}), resume=True)
    a, b = step_losses(full), step_losses(part)
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    wa, wb = load(full).state_dict(), load(part).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-6)


def test_muon_is_refused_where_it_cannot_work(tmp_path: Path, char_data: Path, monkeypatch) -> None:
    from lmforge.models.rnn import RNNLM

    monkeypatch.setattr(RNNLM, "hidden_matrices", lambda self: [])  # a family without hidden matrices
    with pytest.raises(LMForgeError, match="no hidden weight matrices"):
        train(tiny_train_config(char_data, tmp_path / "lstm", max_steps=2, model="lstm", preset="tiny", model_args={},
                                optimizer="muon"))
    assert not (tmp_path / "lstm").exists()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_muon_trains_every_recurrent_cell(tmp_path: Path, char_data: Path, cell: str) -> None:
    """compare's recurrent recipe (Muon on W and U) for all three cells."""
    from lmforge.apps.compare import NEURAL_RECIPES

    assert NEURAL_RECIPES[cell]["optimizer"] == "muon"
    run = tmp_path / cell
    train(tiny_train_config(char_data, run, max_steps=20, model=cell, preset="tiny", model_args={},
                            optimizer="muon"))
    losses = step_losses(run)
    assert losses[20] < losses[1] - 0.3


@pytest.mark.parametrize("over", [dict(qk_norm=True), dict(mlp="relu2"), dict(qk_norm=True, mlp="relu2")])
def test_qk_norm_and_relu2_decode_like_the_full_forward(over: dict) -> None:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, pos="rope", norm="rmsnorm", **SHAPE, **over)).eval()
    if over.get("qk_norm"):
        assert m.blocks[0].attn.q_norm is not None
    x = torch.randint(0, 50, (2, 12))
    full, _ = m(x)
    state = m.init_state(2, 32)
    step_logits = []
    logits, state = m.forward_logits(x[:, :5], state)
    step_logits.append(logits)
    for t in range(5, 12):
        logits, state = m.forward_logits(x[:, t:t + 1], state)
        step_logits.append(logits)
    torch.testing.assert_close(torch.cat(step_logits, 1), full, atol=1e-5, rtol=1e-5)


def test_recipe_options_from_the_cli_and_saved_config(tmp_path: Path, char_data: Path) -> None:
    run = tmp_path / "r"
    train(tiny_train_config(char_data, run, max_steps=3, optimizer="muon",
                            model_args=dict(SHAPE, qk_norm=True, mlp="relu2")))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["qk_norm"] is True and cfg["mlp"] == "relu2"
    assert load(run).config.qk_norm is True


def test_qk_norm_export_is_refused_in_one_line(tmp_path: Path) -> None:
    from lmforge.hub.export import hf_config_and_weights

    m = GPT(GPTConfig(vocab_size=50, pos="rope", norm="rmsnorm", qk_norm=True, **SHAPE))
    with pytest.raises(LMForgeError, match="QK-norm"):
        hf_config_and_weights(m)
