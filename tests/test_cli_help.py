"""Every flag of every command documents itself: a help sentence, and for options declared on a config
dataclass, the default and (for a fixed set) the allowed values."""

from __future__ import annotations

import argparse

import pytest

from lmforge.cli import build_parser


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(prefix or "lmforge", parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += commands(sub, f"{prefix} {name}".strip())
    return out


ALL = commands(build_parser())


def test_all_commands_found() -> None:
    names = {n for n, _ in ALL}
    assert {"prepare", "train", "eval", "generate", "chat", "translate", "export", "compare", "demo",
            "ngram export", "ngram import", "ngram query"} <= names


@pytest.mark.parametrize("name, parser", ALL, ids=[n for n, _ in ALL])
def test_every_option_has_help(name: str, parser: argparse.ArgumentParser) -> None:
    missing = [a.option_strings or [a.dest] for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and (not a.help or a.help == argparse.SUPPRESS)]
    assert not missing, f"lmforge {name}: no help text for {missing}"


def test_train_help_shows_defaults_and_choices(capsys: pytest.CaptureFixture) -> None:
    parser = dict(ALL)["train"]
    flags = {s: a for a in parser._actions for s in a.option_strings}
    assert "--sample-tokens" not in flags  # never read: removed
    for flag in ("--lr", "--batch-size", "--schedule", "--dtype", "--pos", "--norm", "--mlp", "--n-layer",
                 "--warmup-steps", "--max-steps", "--order", "--smoothing", "--seed"):
        assert "default:" in flags[flag].help, flag
    assert "one of: cosine, linear, constant" in flags["--schedule"].help
    assert "one of: fp32, bf16, fp16, auto" in flags["--dtype"].help
    assert "one of: learned, sinusoidal, rope" in flags["--pos"].help
    assert "one of: gelu, gelu_tanh, relu2, swiglu" in flags["--mlp"].help
    assert "one of: adamw, muon" in flags["--optimizer"].help
    assert "allowed: >= 0 and < 1" in flags["--beta1"].help
    assert "default: 0.002" in flags["--lr"].help
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--tie-embeddings, --no-tie-embeddings" in text and "from the preset" in text
