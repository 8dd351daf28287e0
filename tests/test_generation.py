from __future__ import annotations

import io

import pytest
import torch

import lmforge
from lmforge import load
from lmforge.generation import GenerationConfig, generate_ids, generate_text, process_logits
from lmforge.models.gpt import GPT, GPTConfig


def small(pos: str = "rope") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, pos=pos)).eval()


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_equals_uncached(pos: str, temperature: float) -> None:
    m = small(pos)
    # 40 new tokens > block size 16: also exercises the cache rebuild when the context is full
    kw = dict(max_new_tokens=40, temperature=temperature, seed=7, num_return_sequences=3, ignore_eos=True)
    a = generate_ids(m, [1, 2, 3], GenerationConfig(use_cache=True, **kw))
    b = generate_ids(m, [1, 2, 3], GenerationConfig(use_cache=False, **kw))
    assert a == b and len(a) == 3 and all(len(r) == 40 for r in a)


def test_greedy_is_argmax_of_full_forward() -> None:
    m = small()
    out = generate_ids(m, [5, 6], GenerationConfig(max_new_tokens=5, temperature=0, ignore_eos=True))[0]
    seq = [5, 6]
    for _ in range(5):
        logits, _ = m(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert out == seq[2:]


def test_seed_reproducible_and_varies() -> None:
    m = small()
    cfg = lambda s: GenerationConfig(max_new_tokens=20, seed=s, ignore_eos=True)  # noqa: E731
    assert generate_ids(m, [1], cfg(3)) == generate_ids(m, [1], cfg(3))
    assert generate_ids(m, [1], cfg(3)) != generate_ids(m, [1], cfg(4))


def test_top_k_top_p_filtering() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    seqs = torch.zeros(1, 1, dtype=torch.long)
    k = process_logits(logits, seqs, GenerationConfig(top_k=2))
    assert torch.isfinite(k).sum() == 2 and torch.isfinite(k[0, :2]).all()
    p = process_logits(logits, seqs, GenerationConfig(top_p=0.8))  # 0.5+0.2 < 0.8 <= 0.5+0.2+0.15
    assert torch.isfinite(p[0]).tolist() == [True, True, True, False, False]
    p1 = process_logits(logits, seqs, GenerationConfig(top_p=0.3))  # the top token always stays
    assert torch.isfinite(p1[0]).tolist() == [True, False, False, False, False]
    t = process_logits(logits, seqs, GenerationConfig(temperature=0.5))
    torch.testing.assert_close(t, logits / 0.5)


def test_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seqs = torch.tensor([[0, 1]])
    out = process_logits(logits, seqs, GenerationConfig(repetition_penalty=2.0, temperature=1.0))
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5]]))


def test_text_generation_on_trained_run(trained_run) -> None:
    m = load(trained_run)
    out = lmforge.generate(m, "ROMEO:", max_new_tokens=30, temperature=0.8, top_k=50, top_p=0.95, seed=1)
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:")
    many = lmforge.generate(m, "ROMEO:", max_new_tokens=10, seed=1, num_return_sequences=2, return_full_text=False)
    assert isinstance(many, list) and len(many) == 2
    buf = io.StringIO()
    streamed = generate_text(m, "KING:", max_new_tokens=25, seed=2, stream=buf, return_full_text=False,
                             ignore_eos=True)
    assert buf.getvalue() == streamed


def test_stop_strings(trained_run) -> None:
    m = load(trained_run)
    full = lmforge.generate(m, "A", max_new_tokens=60, temperature=0, return_full_text=False, ignore_eos=True)
    stop = full[10:12]
    cut = lmforge.generate(m, "A", max_new_tokens=60, temperature=0, return_full_text=False, ignore_eos=True,
                           stop=[stop])
    assert cut == full[: full.find(stop)]


def test_long_prompt_truncated_from_left_with_warning(trained_run) -> None:
    m = load(trained_run)
    with pytest.warns(UserWarning, match="longer than the context"):
        out = lmforge.generate(m, "x" * 100, max_new_tokens=3, return_full_text=False)
    assert isinstance(out, str)


def test_bf16_decoding(trained_run, capsys) -> None:
    from lmforge.cli import main

    assert main(["generate", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--dtype", "bf16",
                 "--temperature", "0", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 12 + 1  # 12 characters and print's newline


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_decoding_layouts(dtype: str) -> None:
    """prepare_for_decoding: transposed fp32 gives the same logits and greedy tokens; bf16 and weight-only
    int8 stay close to fp32 (same top token for most positions)."""
    import copy

    from lmforge.generation.fast import DecodeLinear, prepare_for_decoding

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=48, n_layer=2, n_head=4, n_embd=64, pos="rope",
                          norm="rmsnorm", mlp="swiglu", tie_embeddings=True, bias=True)).eval()
    fast = prepare_for_decoding(copy.deepcopy(model), dtype)
    assert all(not isinstance(m, torch.nn.Linear) for m in fast.modules())
    assert any(isinstance(m, DecodeLinear) for m in fast.modules())
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        ref, _ = model(idx)
        got, _ = fast(idx)
    if dtype == "fp32":
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    else:
        agree = (got.float().argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert agree > 0.8 and (got.float() - ref).abs().max() < 0.1 * ref.abs().max()
    cfg = GenerationConfig(max_new_tokens=15, temperature=0, ignore_eos=True)
    out = generate_ids(fast, [1, 2, 3], cfg)[0]
    assert len(out) == 15
    if dtype == "fp32":
        assert out == generate_ids(model, [1, 2, 3], cfg)[0]


def test_int8_cli_and_families_without_it(trained_run, tmp_path, capsys) -> None:
    from lmforge.cli import main

    assert main(["generate", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--dtype", "int8",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    from lmforge.models.rnn import LSTMLM

    tok = load(trained_run).tokenizer
    lstm = LSTMLM.from_preset("tiny", vocab_size=tok.vocab_size)
    lstm.tokenizer = tok
    lstm.save_pretrained(tmp_path / "lstm")
    assert main(["generate", str(tmp_path / "lstm"), "--dtype", "int8", "--max-new-tokens", "3"]) == 2
    assert "applies to Transformer models" in capsys.readouterr().err
