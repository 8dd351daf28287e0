"""Fine-tuning: label masks, packing, LoRA (init, merge, PEFT round trip), resume, bad input, the CLI.

The base model is a tiny random Llama-shaped lmforge GPT with a small byte-level BPE tokenizer that knows
ChatML's <|im_start|>/<|im_end|>, exported to Hugging Face format (what transformers and peft load)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lmforge
from lmforge import kernels
from lmforge.cli import main
from lmforge.data.sft import (
    IGNORE,
    Example,
    SFTEncoder,
    SFTSampler,
    encode_split,
    load_sft_data,
    pack_rows,
    pad_rows,
)
from lmforge.errors import LMForgeError
from lmforge.hub.export import export_hf
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.lora import LoRAConfig, LoRALayer, add_lora, dropout_keep
from lmforge.tokenizers import BPETokenizer
from lmforge.tokenizers.chat_template import TEMPLATES, ChatTemplate

from .conftest import sample_text

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, of course."}]


def chat_tokenizer() -> BPETokenizer:
    from tokenizers import AddedToken

    tok = BPETokenizer.train([sample_text(20_000)], 400)
    tok.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return BPETokenizer(tok.hf, eot="<|im_end|>")


def tiny_model(tok: BPETokenizer, seed: int = 0, n_layer: int = 2) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32,
                      mlp="swiglu", norm="rmsnorm", pos="rope", tie_embeddings=False)).eval()
    m.tokenizer = tok
    m.chat_template = TEMPLATES["chatml"][0]
    return m


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base model as a Hugging Face (Llama) directory."""
    return export_hf(tiny_model(chat_tokenizer()), tmp_path_factory.mktemp("base") / "hf")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    rows = []
    for i in range(40):
        rows.append({"messages": [{"role": "user", "content": f"Say the number {i} twice."},
                                  {"role": "assistant", "content": f"{i} {i}"},
                                  {"role": "user", "content": "Now once."},
                                  {"role": "assistant", "content": f"{i}"}]})
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return p


def ft_options(**kw) -> dict:
    base = dict(max_steps=6, batch_size=4, eval_interval=3, eval_iters=2, log_interval=1, warmup_steps=2, lr=5e-3,
                progress=False, val_frac=0.1, test_frac=0.1, max_length=96, lora_dropout=0.0)
    base.update(kw)
    return base


# --- label masks ---------------------------------------------------------------------------------
def test_label_mask_is_assistant_tokens_only_and_loss_matches_a_hand_computation() -> None:
    tok = chat_tokenizer()
    model = tiny_model(tok)
    enc = SFTEncoder(tok, ChatTemplate(TEMPLATES["chatml"][0]), mask_prompt=True).encode(Example("t", messages=CONV))
    # The trained tokens, found by hand: each assistant turn's content and its <|im_end|>\n, in both turns.
    pieces = [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
               "<|im_start|>assistant\n", False), ("Paris.<|im_end|>\n", True),
              ("<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n", False),
              ("Rome, of course.<|im_end|>\n", True)]
    ids, trained = [], []
    for text, on in pieces:
        t = tok.encode(text)
        ids += t
        trained += [on] * len(t)
    assert enc.ids == ids
    assert [lab != IGNORE for lab in enc.labels] == trained
    assert sum(trained) >= 8
    # loss = mean over trained positions t >= 1 of -log p(ids[t] | ids[<t]), from the full logits
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(model(x)[0][0].float(), dim=-1)
        nll = [-float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if trained[t]]
        expect = sum(nll) / len(nll)
        xb, yb = pad_rows([enc], tok.eot_id)
        got = float(model(xb, yb)[1])
    assert got == pytest.approx(expect, abs=1e-5)
    # --no-mask-prompt trains every token
    full = SFTEncoder(tok, ChatTemplate(TEMPLATES["chatml"][0]), mask_prompt=False).encode(Example("t", messages=CONV))
    assert full.labels == full.ids


def test_packing_equals_the_unpacked_mean_loss() -> None:
    tok = chat_tokenizer()
    model = tiny_model(tok)
    enc = SFTEncoder(tok, ChatTemplate(TEMPLATES["chatml"][0]))
    exs = [enc.encode(Example(str(i), messages=[{"role": "user", "content": "word " * (i + 1)},
                                                {"role": "assistant", "content": "answer " * (2 * i + 1)}]))
           for i in range(5)]
    total, count = 0.0, 0
    with torch.no_grad():
        for e in exs:  # each example alone, token-weighted
            x, y = pad_rows([e], tok.eot_id)
            n = int((y != IGNORE).sum())
            total += float(model(x, y)[1]) * n
            count += n
        rows = [exs[:3], exs[3:]]
        x, y, doc = pack_rows(rows, max(sum(len(e.ids) - 1 for e in r) for r in rows) + 3, tok.eot_id)
        assert doc[0, -1] == 3 and (y[0, doc[0] == 3] == IGNORE).all()  # the padding tail is its own document
        packed = float(model(x, y, doc_ids=doc)[1])
    assert packed == pytest.approx(total / count, abs=1e-5)
    # the sampler packs whole examples into rows of the block size
    s = SFTSampler(exs, 2, 128, seed=0, pad_id=tok.eot_id, packing=True)
    inputs, y = s.next()
    assert inputs["input_ids"].shape[1] == 128 and inputs["doc_ids"].shape == y.shape


# --- LoRA ----------------------------------------------------------------------------------------
def test_lora_at_init_is_the_base_model_and_only_adapters_train() -> None:
    tok = chat_tokenizer()
    model = tiny_model(tok)
    x = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        base = model(x)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1))
    with torch.no_grad():
        assert torch.equal(model(x)[0], base)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("lora.") for n in trainable)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the base never moved
    assert any(float(p.detach().abs().max()) > 0 for n, p in lora.named_parameters() if "lora_B" in n)


def test_merged_equals_unmerged() -> None:
    tok = chat_tokenizer()
    model = tiny_model(tok)
    lora = add_lora(model, LoRAConfig(r=4, alpha=8, targets=("q", "v", "gate", "down")))
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.05)
    x = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        unmerged = model(x)[0]
        w = model.blocks[0].attn.qkv.weight.clone()
        lora.merge()
        torch.testing.assert_close(model(x)[0], unmerged, atol=1e-5, rtol=0)
        assert not torch.equal(model.blocks[0].attn.qkv.weight, w)
        lora.unmerge()
        torch.testing.assert_close(model.blocks[0].attn.qkv.weight, w, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x)[0], unmerged, atol=1e-5, rtol=0)


def peft_update(layer: LoRALayer, x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """PEFT's LoRA update of one (possibly fused) layer, module by module: for each adapted slice s,
    (alpha / r) B_s A_s dropout_s(x), dropout_s scaling the kept elements by 1 / (1 - p); zero elsewhere."""
    out = torch.zeros(*x.shape[:-1], layer.out_features, dtype=torch.float64)
    for k, (name, s, e) in enumerate(layer.slices):
        xd = x.double() if keep is None else torch.where(keep[k], x.double(), 0) / (1 - p)
        out[..., s:e] = xd @ layer.lora_A[name].double().t() @ layer.lora_B[name].double().t() * layer.scale
    return out


@pytest.fixture(params=["kernel", "pytorch"])
def dropout_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways LoRA's dropout runs: lmforge's kernel (``lora_dropout_a``, lmforge/kernels) and, where the kernels
    are not built, PyTorch's operations (masks drawn by ``dropout_keep``, one batched matmul)."""
    if request.param == "kernel" and not kernels.available():
        pytest.skip("lmforge's kernels are not built here")
    if request.param == "pytorch":
        monkeypatch.setattr(kernels, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_update_is_peft_module_by_module(p: float, dropout_path: str) -> None:
    """A fused layer's update (stacked A, block-diagonal B, a mask per slice, scales on B, added inside the
    matmul) equals PEFT's per-module formula with an independent mask per module: the masks are
    ``dropout_keep``'s for (modules, tokens, features), regenerated here from the same seed; the gradients with
    respect to A, B and x match too. p = 0 is the update without masks."""
    tok = chat_tokenizer()
    model = tiny_model(tok)
    lora = add_lora(model, LoRAConfig(r=4, alpha=12, dropout=p, targets=("q", "v", "gate", "up", "down")))
    with torch.no_grad():
        for prm in lora.parameters():
            prm.normal_(0, 0.1)
    model.train()
    for path, lin, layer in lora.items():
        x = torch.randn(2, 7, lin.in_features, requires_grad=True)
        torch.manual_seed(5)
        got = lin(x)
        torch.manual_seed(5)
        n = len(layer.slices)
        keep = dropout_keep((n, 14, lin.in_features), p, x.device).view(n, 2, 7, -1) if p else None
        want = F.linear(x, lin.weight).double() + peft_update(layer, x, keep, p)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=path)
        w = torch.randn_like(want)
        params = [x, *layer.parameters()]
        for g1, g2 in zip(torch.autograd.grad((got.double() * w).sum(), params),
                          torch.autograd.grad((want * w).sum(), params)):
            torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5, msg=path)
    with torch.no_grad():  # evaluation: no dropout, the deterministic update
        model.eval()
        lin, layer = lora.items()[0][1:]
        x = torch.randn(2, 7, lin.in_features)
        torch.testing.assert_close(lin(x).double(), F.linear(x, lin.weight).double() + peft_update(layer, x, None, p),
                                   atol=1e-5, rtol=1e-5)


def test_dropout_keep_is_bernoulli_and_independent(dropout_path: str) -> None:
    """The keep mask is i.i.d. Bernoulli(1 - p): the kept share, and the share dropped by two modules' masks at
    once (p^2 when independent, p when shared), and by one module's masks at two steps, within 5 standard
    errors; ``torch.manual_seed`` gives the same masks again."""
    torch.manual_seed(0)
    for p in (0.05, 0.3):
        keep = dropout_keep((3, 64, 1001), p, torch.device("cpu"))   # an odd element count (a half 64-bit draw)
        n = keep[0].numel()
        drop = ~keep
        assert abs(float(drop.float().mean()) - p) < 5 * math.sqrt(p * (1 - p) / keep.numel())
        both = float((drop[0] & drop[1]).float().mean())
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)
        first = drop[:, :, 0].float().mean()     # no position is favoured (e.g. the first of a draw)
        assert abs(float(first) - p) < 5 * math.sqrt(p * (1 - p) / (3 * 64))
        later = ~dropout_keep((3, 64, 1001), p, torch.device("cpu"))  # the next step's masks
        assert abs(float((drop & later).float().mean()) - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (3 * n))
    torch.manual_seed(3)
    again = [dropout_keep((2, 5, 9), 0.5, torch.device("cpu")) for _ in range(2)]
    torch.manual_seed(3)
    assert all(torch.equal(a, dropout_keep((2, 5, 9), 0.5, torch.device("cpu"))) for a in again)
    assert not torch.equal(*again)


def lora_twin(tok: BPETokenizer, n_layer: int = 2) -> GPT:
    """A tiny model with seeded, non-zero LoRA adapters (r=4, no dropout), in training mode: two calls give
    identical copies to compare one path against another."""
    m = tiny_model(tok, n_layer=n_layer)
    torch.manual_seed(1)
    lora = add_lora(m, LoRAConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.05)
    return m.train()


def test_frozen_linears_stored_in_the_autocast_dtype_give_the_same_step(tmp_path: Path, base_dir: Path,
                                                                        chat_data: Path) -> None:
    """LoRA under bf16 autocast keeps the frozen block weights in bf16 (autocast cast them at every forward):
    the loss and the adapters' gradients are the same bit for bit, and ``finetune --dtype bf16`` does it."""
    from lmforge.train.finetune import CachedCastLinear, FineTuneConfig, FineTuner, low_precision_frozen_linears

    tok = chat_tokenizer()
    models = [lora_twin(tok), lora_twin(tok)]
    low_precision_frozen_linears(models[1], torch.bfloat16)
    assert models[1].blocks[0].mlp.fc.weight.dtype == torch.bfloat16
    assert models[1].blocks[0].ln_1.weight.dtype == models[1].lm_head.weight.dtype == torch.float32
    assert isinstance(models[1].lm_head, CachedCastLinear)  # the head multiplies by a cached bf16 copy
    x = torch.randint(0, tok.vocab_size, (2, 24))
    y = x.clone()
    y[:, :10] = IGNORE
    losses = []
    for m in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x, y)[1]
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(models[0].lora.parameters(), models[1].lora.parameters()):
        assert torch.equal(a.grad, b.grad)
    tuner = FineTuner(FineTuneConfig(base=str(base_dir), data=str(chat_data), out=str(tmp_path / "r"),
                                     **ft_options(max_steps=2, dtype="bf16")))
    assert tuner.model.blocks[1].attn.qkv.weight.dtype == torch.bfloat16
    assert math.isfinite(tuner.train().train_loss)


def test_cached_cast_head_is_autocasts_product_and_follows_its_weight() -> None:
    """The head's cached bf16 copy (CachedCastLinear): the logits autocast gives, bit for bit; tied to the
    embedding, it stays tied (the same Parameter, the same state_dict); a changed weight (in place or replaced)
    is cast again; outside autocast it is the fp32 Linear."""
    from lmforge.train.finetune import CachedCastLinear

    tok = chat_tokenizer()
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, mlp="swiglu",
                      norm="rmsnorm", pos="rope", tie_embeddings=True)).requires_grad_(False)
    plain = m.lm_head
    keys = list(m.state_dict())
    head = m.lm_head = CachedCastLinear.of(plain)
    assert head.weight is m.wte.weight and list(m.state_dict()) == keys
    x = torch.randn(5, 32)
    for change in (None, lambda: m.wte.weight.mul_(-0.5), lambda: setattr(head, "weight", nn.Parameter(
            torch.randn_like(head.weight), requires_grad=False))):
        if change is not None:
            with torch.no_grad():
                change()
        plain.weight = head.weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(head(x), plain(x)) and head(x).dtype == torch.bfloat16
    assert torch.equal(head(x), plain(x)) and head(x).dtype == torch.float32


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_share_one_graph(tmp_path: Path, base_dir: Path, chat_data: Path) -> None:
    """``finetune --compile`` compiles each block (regional compilation): the loss and the adapters' gradients
    equal the eager model's, the blocks share graphs (two: the first block's input needs no gradient, the
    others' do; more blocks cost no more compiling), and a run trains."""
    from torch._dynamo.utils import counters

    from lmforge.train.finetune import FineTuneConfig, FineTuner

    tok = chat_tokenizer()
    eager, compiled = lora_twin(tok, n_layer=4), lora_twin(tok, n_layer=4)
    torch._dynamo.reset()
    counters.clear()
    for block in compiled.blocks:
        block.compile()
    x = torch.randint(0, tok.vocab_size, (2, 24))
    y = x.clone()
    y[:, :10] = IGNORE  # masked prompt positions: the eager head sees only the targets
    losses = []
    for m in (eager, compiled):
        loss = m(x, y)[1]
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (n, a), (_, b) in zip(eager.lora.named_parameters(), compiled.lora.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=n)
    assert counters["stats"]["unique_graphs"] == 2  # block 0, and blocks 1-3 together
    run = tmp_path / "c"
    tuner = FineTuner(FineTuneConfig(base=str(base_dir), data=str(chat_data), out=str(run),
                                     **ft_options(max_steps=2, compile=True)))
    assert tuner.step_fn is tuner.wrapped and all(hasattr(b, "_compiled_call_impl") for b in tuner.model.blocks)
    assert tuner.train().step == 2


def test_peft_round_trip(tmp_path: Path, base_dir: Path, chat_data: Path) -> None:
    """An lmforge LoRA run loads in peft on the base's Hugging Face export with the same logits, and an adapter
    peft writes loads in lmforge."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run = tmp_path / "run"
    lmforge.finetune(base_dir, chat_data, run, **ft_options(lora_targets="q,k,v,o,gate,up,down"))
    conf = json.loads((run / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 8 and conf["lora_alpha"] == 16
    assert conf["base_model_name_or_path"] == str(base_dir.resolve())
    assert sorted(conf["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = peft.PeftModel.from_pretrained(hf, run).eval()
    ours = lmforge.load(base_dir, adapter=run)
    x = torch.randint(0, ours.vocab_size, (2, 24))
    with torch.no_grad():
        ref = peft_model(x).logits
        got = ours(x)[0]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        base_logits = lmforge.load(base_dir)(x)[0]
    assert (got - base_logits).abs().max() > 1e-3  # the adapter trained: it changes the model
    # the run directory alone loads too (base from adapter_config.json, adapter merged)
    with torch.no_grad():
        torch.testing.assert_close(lmforge.load(run)(x)[0], ref, atol=1e-4, rtol=1e-4)
    # and the other way: an adapter written by peft (random B) loads in lmforge with the same logits
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    pm = peft.get_peft_model(hf2, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(lmforge.load(base_dir, adapter=tmp_path / "peft")(x)[0], pm(x).logits,
                                   atol=1e-4, rtol=1e-4)


def test_resume_is_exact(tmp_path: Path, base_dir: Path, chat_data: Path) -> None:
    """Ctrl-C after 3 of 7 steps, resume: the same losses and adapter weights as the uninterrupted run (LoRA
    dropout on, so the restored RNG matters; packing, so the sampler's state does)."""
    from safetensors.torch import load_file

    from lmforge.train import TrainingInterrupted
    from lmforge.train.finetune import FineTuneConfig, FineTuner

    opts = ft_options(max_steps=7, packing=True, lora_dropout=0.1, checkpoint_interval=1)
    lmforge.finetune(base_dir, chat_data, tmp_path / "a", **opts)
    tuner = FineTuner(FineTuneConfig(base=str(base_dir), data=str(chat_data), out=str(tmp_path / "b"), **opts))
    orig, calls = tuner.train_step, {"n": 0}

    def ctrl_c_at_step_4(stop_asked: int = 0) -> tuple[float, int, int]:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return orig(stop_asked)

    tuner.train_step = ctrl_c_at_step_4  # type: ignore[method-assign]
    with pytest.raises(TrainingInterrupted, match="lmforge finetune --resume"):
        tuner.train()
    assert lmforge.finetune(None, None, tmp_path / "b", resume=True).step == 7
    a, b = (load_file(tmp_path / r / "adapter_model.safetensors") for r in "ab")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)

    def losses(run: Path) -> dict:
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys() and all(la[k] == pytest.approx(lb[k], abs=1e-6) for k in la)


def test_full_fine_tuning_run_is_a_loadable_model(tmp_path: Path, base_dir: Path, chat_data: Path) -> None:
    r = lmforge.finetune(base_dir, chat_data, tmp_path / "full", **ft_options(method="full", max_steps=4, lr=1e-2))
    assert r.val_loss is not None
    m = lmforge.load(tmp_path / "full")
    assert m.chat_template == TEMPLATES["chatml"][0] and m.tokenizer.eot_id == m.tokenizer.hf.token_to_id("<|im_end|>")
    metrics = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    vals = [x["val_loss"] for x in metrics if "val_loss" in x]
    assert vals[0] > vals[-1]  # logged before the first step, and it falls


# --- data ----------------------------------------------------------------------------------------
def test_formats_are_detected(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    (tmp_path / "pc.jsonl").write_text('{"prompt": "2+2=", "completion": "4"}\n')
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add.", "input": "2 2", "output": "4"},
                                                 {"instruction": "Greet.", "input": "", "output": "Hi"}]))
    assert load_sft_data(str(tmp_path / "t.jsonl"), val_frac=0, test_frac=0).meta["format"] == "text"
    pc = load_sft_data(str(tmp_path / "pc.jsonl"), val_frac=0, test_frac=0)
    assert pc.splits["train"][0].prompt == "2+2=" and pc.splits["train"][0].completion == "4"
    al = load_sft_data(str(tmp_path / "a.json"), val_frac=0, test_frac=0)
    users = sorted(e.messages[0]["content"] for e in al.splits["train"])
    assert users == ["Add.\n\n2 2", "Greet."]
    tsv = tmp_path / "p.tsv"
    tsv.write_text("Guten Morgen.\tGood morning.\nDanke.\tThanks.\n")
    ex = load_sft_data(str(tsv), val_frac=0, test_frac=0, instruction="Translate German to English:").splits["train"]
    assert {e.messages[0]["content"] for e in ex} == {"Translate German to English: Guten Morgen.",
                                                      "Translate German to English: Danke."}


def test_builtin_dialogue_sets_deduplicated_and_split_by_conversation() -> None:
    a = load_sft_data("chatterbot", seed=3, val_frac=0.1, test_frac=0.1)
    b = load_sft_data("chatterbot", seed=3, val_frac=0.1, test_frac=0.1)
    assert [e.key() for e in a.splits["val"]] == [e.key() for e in b.splits["val"]]  # seeded
    keys = {k: {e.key() for e in v} for k, v in a.splits.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert a.duplicates > 0 and sum(map(len, keys.values())) == len(set().union(*keys.values()))
    zh = load_sft_data("chatterbot:chinese")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh.splits["train"][0].messages[0]["content"] +
               zh.splits["train"][0].messages[1]["content"])
    cc = load_sft_data("chitchat", val_frac=0.01, test_frac=0.01)
    # 7,168 conversations, 3,150 of them a single turn with no reply to learn from
    assert 4000 <= sum(len(v) for v in cc.splits.values()) + cc.duplicates <= 7168 - 3150
    assert all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(cc.splits["train"][0].messages))


# --- bad input: one line, nothing overwritten ----------------------------------------------------
def _err(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_input(tmp_path: Path, base_dir: Path, chat_data: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n')
    err = _err(["finetune", str(base_dir), "--data", str(bad), "--out", str(tmp_path / "r"), "--max-steps", "1"],
               capsys)
    assert "bad.jsonl line 2: malformed JSON" in err
    miss = tmp_path / "miss.jsonl"
    miss.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    assert 'line 2: missing field "completion"' in _err(["finetune", str(base_dir), "--data", str(miss), "--out",
                                                         str(tmp_path / "r"), "--max-steps", "1"], capsys)
    unknown = tmp_path / "u.jsonl"
    unknown.write_text('{"question": "a"}\n')
    assert "no known format" in _err(["finetune", str(base_dir), "--data", str(unknown), "--out", str(tmp_path / "r"),
                                      "--max-steps", "1"], capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "  "}]}) + "\n")
    assert "line 1: message 2 is an empty assistant turn" in _err(
        ["finetune", str(base_dir), "--data", str(empty), "--out", str(tmp_path / "r"), "--max-steps", "1"], capsys)
    # messages for a model without a chat template: the error names --template
    m = tiny_model(chat_tokenizer())
    m.chat_template = None
    no_tpl = export_hf(m, tmp_path / "no-template")
    err = _err(["finetune", str(no_tpl), "--data", str(chat_data), "--out", str(tmp_path / "r"), "--max-steps", "1"],
               capsys)
    assert "--template" in err and "no chat template" in err.replace("has none", "no chat template")
    # LoRA targets that match nothing: the error lists the ones that exist
    err = _err(["finetune", str(base_dir), "--data", str(chat_data), "--out", str(tmp_path / "r"), "--max-steps", "1",
                "--lora-targets", "q,attn_c"], capsys)
    assert "attn_c" in err and "q, k, v, o, gate, up, down" in err
    assert not (tmp_path / "r").exists()
    # an existing run directory is never overwritten
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("precious")
    assert "already exists" in _err(["finetune", str(base_dir), "--data", str(chat_data), "--out", str(keep),
                                     "--max-steps", "1"], capsys)
    assert (keep / "mine.txt").read_text() == "precious" and len(list(keep.iterdir())) == 1


def test_long_examples_are_cut_or_skipped_and_counted() -> None:
    tok = chat_tokenizer()
    enc = SFTEncoder(tok, ChatTemplate(TEMPLATES["chatml"][0]))
    exs = [Example("short", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
           Example("long", messages=[{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "word " * 200}]),
           Example("long prompt", messages=[{"role": "user", "content": "word " * 200},
                                            {"role": "assistant", "content": "ok"}])]
    cut = encode_split(enc, exs, 40, "cut")
    assert (len(cut.examples), cut.cut, cut.skipped) == (2, 2, 1)  # the long prompt leaves nothing to train
    assert all(len(e.ids) <= 41 for e in cut.examples)
    skip = encode_split(enc, exs, 40, "skip")
    assert (len(skip.examples), skip.cut, skip.skipped) == (1, 0, 2)


# --- the CLI, end to end -------------------------------------------------------------------------
def test_cli_finetune_generate_chat_export_and_eval(tmp_path: Path, base_dir: Path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    tsv = tmp_path / "pairs.tsv"
    words = ["eins one", "zwei two", "drei three", "vier four", "fünf five", "sechs six", "sieben seven", "acht eight"]
    tsv.write_text("".join(f"{w.split()[0]} und {v.split()[0]}.\t{w.split()[1]} and {v.split()[1]}.\n"
                           for w in words for v in words), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["finetune", str(base_dir), "--data", str(tsv), "--out", str(run), "--max-steps", "4", "--lr", "5e-3",
                 "--instruction", "Translate German to English:", "--no-progress", "--val-frac", "0.1",
                 "--test-frac", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "trained tokens" in out and "fine-tuned 4 steps" in out
    assert main(["generate", str(base_dir), "--adapter", str(run), "--chat", "Translate German to English: eins.",
                 "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert main(["chat", str(run), "--chat", "hi", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "test", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["pairs"] == 6 and 0 <= res["bleu"] <= 100 and res["samples"][0]["source"]
    assert main(["eval", str(base_dir), "--adapter", str(run), "--data", str(tsv), "--split", "test", "--beam", "2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["beam"] == 2
    _err(["export", str(run), "--format", "hf", "--out", str(tmp_path / "x")], capsys)
    assert main(["export", str(run), "--format", "hf", "--merge", "--out", str(tmp_path / "merged")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    x = torch.randint(0, hf.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, lmforge.load(run)(x)[0], atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)


def test_epochs_budget_and_help(tmp_path: Path, base_dir: Path, chat_data: Path) -> None:
    r = lmforge.finetune(base_dir, chat_data, tmp_path / "e", **ft_options(max_steps=None, epochs=1, batch_size=8))
    assert r.step == math.ceil(32 / 8)  # 40 conversations - 4 val - 4 test
    with pytest.raises(LMForgeError, match="one budget"):
        lmforge.finetune(base_dir, chat_data, tmp_path / "f", **ft_options(max_steps=None, epochs=1, max_time=5))


def test_an_lmforge_run_with_a_template_of_our_choice(tmp_path: Path, trained_run: Path, capsys) -> None:
    """MODEL may be an lmforge GPT run (here GPT-2's layout and a character tokenizer, no chat template): full
    fine-tuning with --template simple works; LoRA says why it cannot."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Who is {n}?"},
                                                     {"role": "assistant", "content": f"{n} is a Roman."}]}) + "\n"
                            for n in ("Brutus", "Caesar", "Cassius", "Antony", "Octavius", "Lepidus")))
    err = _err(["finetune", str(trained_run), "--data", str(data), "--out", str(tmp_path / "l"), "--max-steps", "1",
                "--template", "simple"], capsys)
    assert "--method full" in err
    r = lmforge.finetune(trained_run, data, tmp_path / "f", **ft_options(method="full", template="simple", max_steps=2,
                                                                        val_frac=0.2, test_frac=0.0))
    assert r.step == 2
    m = lmforge.load(tmp_path / "f")
    assert m.chat_template == TEMPLATES["simple"][0]
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                   "{% if add_generation_prompt %}<assistant>{% endif %}")
    lmforge.finetune(trained_run, data, tmp_path / "g", **ft_options(method="full", template=str(tpl), max_steps=1,
                                                                    val_frac=0.2, test_frac=0.0))
    assert (tmp_path / "g" / "chat_template.jinja").read_text() == tpl.read_text()
