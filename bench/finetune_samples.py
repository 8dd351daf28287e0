"""Before/after answers of a fine-tuning run to held-out prompts, and the held-out masked loss of both.

    python bench/finetune_samples.py runs/ft-chatterbot [--n 6] [--split test] [--max-new-tokens 40]

The prompts are the first user turns of the run's own held-out split (the same seeded split fine-tuning used,
read from the run's finetune.json); answers are greedy, through the chat template the run was trained with.
The loss is the mean cross-entropy over every assistant token of the split (what training minimised).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lmforge
from lmforge.apps.chat import ChatSession
from lmforge.data.sft import IGNORE, SFTEncoder, batches_in_order, encode_split, load_sft_data
from lmforge.tokenizers.chat_template import ChatTemplate


@torch.no_grad()
def masked_loss(model, examples, template: str, block: int) -> float:  # noqa: ANN001
    enc = SFTEncoder(model.tokenizer, ChatTemplate(template))
    split = encode_split(enc, examples, block)
    total, count = 0.0, 0
    model.eval()
    for x, y in batches_in_order(split.examples, 8, model.tokenizer.eot_id):
        n = int((y != IGNORE).sum())
        total += float(model(x, y)[1]) * n
        count += n
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rec = json.loads((Path(a.run) / "finetune.json").read_text())
    template = (Path(a.run) / "chat_template.jinja").read_text(encoding="utf-8")
    ds = load_sft_data(rec["data"], **rec["split_options"])
    examples = ds.splits[a.split]
    base, tuned = lmforge.load(rec["base"]), lmforge.load(a.run)
    block = 256
    print(f"{a.run}: {rec['data']} {a.split} split, {len(examples)} conversations")
    print(f"masked loss on the {a.split} split: base {masked_loss(base, examples, template, block):.4f}, "
          f"fine-tuned {masked_loss(tuned, examples, template, block):.4f}")
    print("| prompt | reference | base | fine-tuned |\n|---|---|---|---|")
    for ex in examples[: a.n]:
        prompt, ref = ex.messages[0]["content"], ex.messages[1]["content"]
        answers = [ChatSession(m, template=template, temperature=0.0, max_new_tokens=a.max_new_tokens).ask(prompt)
                   for m in (base, tuned)]
        cells = [prompt, ref, *answers]
        print("| " + " | ".join(c.replace("\n", " ").replace("|", "\\|") for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
