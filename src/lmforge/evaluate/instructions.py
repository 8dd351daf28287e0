"""Fine-tuned decoder-only models on parallel data: generate each target from its instruction prompt (the
prompt the model was fine-tuned on, rendered by its chat template) and score BLEU/chrF, greedy or beam.

Prompts of equal token length are decoded together (no padding, so a batch row computes exactly what it
would alone): the prompt prefills the KV cache, then ``generation.search``'s greedy or beam search runs
from its last token until the end-of-turn token.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data.parallel import ParallelData, is_parallel_spec, load_data
from ..data.sft import instruction_prompt, load_sft_data
from ..errors import LMForgeError
from ..generation.search import beam_search, greedy_search
from ..tokenizers.chat_template import ChatTemplate
from ..utils import read_json
from .seq2seq import bleu_chrf


def run_record(run: str | Path) -> dict[str, Any] | None:
    p = Path(run) / "finetune.json"
    return read_json(p, "fine-tuning record") if p.is_file() else None


def instruction_for_eval(run: str | Path, data: str | None) -> tuple[str, str] | None:
    """(instruction, data) when ``run`` was fine-tuned on parallel data as instructions and ``data`` (default:
    the run's own) is parallel; None otherwise (plain language-model evaluation)."""
    rec = run_record(run)
    if not rec or not rec.get("instruction"):
        return None
    data = data or rec.get("data")
    if data is None:
        return None
    parallel = is_parallel_spec(data) or (Path(data).is_dir() and isinstance(load_data(data), ParallelData))
    return (rec["instruction"], data) if parallel else None


def eval_pairs(data: str, instruction: str, split: str, record: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(user prompt, reference) pairs of a split: from a prepared parallel directory (its split) or a parallel
    corpus (the split fine-tuning used: de-en's fixed one, else the same seeded split)."""
    if Path(data).is_dir():
        d = load_data(data)
        if not isinstance(d, ParallelData):
            raise LMForgeError(f"{data} is not parallel data")
        return [(instruction_prompt(instruction, s), t) for s, t in d.split(split).texts]
    rec = record or {}
    opts = rec.get("split_options", {})
    ds = load_sft_data(data, instruction=instruction, **opts)
    return [(ex.messages[0]["content"], ex.messages[-1]["content"]) for ex in ds.splits[split] if ex.messages]


@torch.no_grad()
def decode_prompts(model: Any, prompts: list[list[int]], beam: int = 1, length_penalty: float = 1.0,
                   batch_size: int = 32, max_new_tokens: int = 128, progress: bool = False) -> list[list[int]]:
    """Greedy (beam 1) or beam search continuations of token-id prompts, in input order."""
    model.eval()
    eos = model.tokenizer.eot_id
    ctx = model.context_length
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc="decode", unit="sent", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    for L, idx in sorted(by_len.items()):
        steps = max(1, min(max_new_tokens, ctx - L - 1))
        for a in range(0, len(idx), batch_size):
            rows = idx[a:a + batch_size]
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long)
            state = model.init_state(len(rows), L + steps + 1)
            _, state = model.forward_logits(ids[:, :-1], state)  # prefill all but the last prompt token
            if beam <= 1:
                hyps = [[h] for h in greedy_search(model, state, ids[:, -1], eos, steps)]
            else:
                hyps = beam_search(model, state, ids[:, -1], eos, steps, num_beams=beam, length_penalty=length_penalty)
            for i, hs in zip(rows, hyps):
                out[i] = hs[0].tokens
            bar.update(len(rows))
    bar.close()
    return out


def evaluate_instructed(model: Any, data: str, instruction: str, split: str = "test", beam: int = 1,
                        batch_size: int = 32, length_penalty: float = 1.0, max_pairs: int | None = None,
                        progress: bool = True, samples: int = 5,
                        record: dict[str, Any] | None = None) -> dict[str, Any]:
    """BLEU and chrF (sacrebleu) of the targets a fine-tuned model generates from its instruction prompts."""
    if model.tokenizer is None:
        raise LMForgeError("the model has no tokenizer")
    if model.chat_template is None:
        raise LMForgeError("the model has no chat template to render its instruction prompts with")
    template = ChatTemplate(model.chat_template, "the run's chat template")
    pairs = eval_pairs(data, instruction, split, record)
    if max_pairs:
        pairs = pairs[:max_pairs]
    if not pairs:
        raise LMForgeError(f"{data} has no {split} pairs")
    prompts = [model.tokenizer.encode(template.render([{"role": "user", "content": u}], add_generation_prompt=True))
               for u, _ in pairs]
    t0 = time.perf_counter()
    outs = decode_prompts(model, prompts, beam, length_penalty, batch_size, progress=progress)
    dt = time.perf_counter() - t0
    hyps = [model.tokenizer.decode(o).strip() for o in outs]
    res: dict[str, Any] = {"split": split, "beam": beam, "pairs": len(pairs), "instruction": instruction}
    res.update(bleu_chrf(hyps, [t for _, t in pairs]))
    res["decode_seconds"] = round(dt, 2)
    res["sentences_per_second"] = round(len(pairs) / max(dt, 1e-9), 2)
    res["samples"] = [{"source": u[len(instruction):].strip(), "reference": t, "hypothesis": h}
                      for (u, t), h in list(zip(pairs, hyps))[:samples]]
    return res
