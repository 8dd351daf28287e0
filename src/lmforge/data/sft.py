"""Supervised fine-tuning data: examples, their formats, chat rendering with label masks, and batching.

Formats, detected per file (a one-line error names the file and line when none fits):

* JSONL ``{"text": ...}``                          every token is trained
* JSONL ``{"prompt": ..., "completion": ...}``     the completion is trained (prompt + completion, raw text)
* JSONL ``{"messages": [{"role", "content"}, ...]}`` multi-turn chat, rendered by the model's chat template
* Alpaca JSON ``[{"instruction", "input", "output"}, ...]`` (or JSONL of such records): one user turn
  (instruction, blank line, input) and one assistant turn
* parallel data (``de-en``, ``code-doc``, ``*.tsv``): one instruction per pair, e.g.
  "Translate German to English: <source>" -> "<target>"
* built-in dialogue sets read from installed packages: ``chatterbot`` (chatterbot-corpus YAML; English, or
  ``chatterbot:chinese`` and the corpus's other languages) and ``chitchat`` (chitchat-dataset, 7,168 English
  conversations). Conversations are deduplicated and split train/val/test by a seeded permutation.

Chat examples are rendered with the model's chat template (sandboxed Jinja, ``tokenizers/chat_template.py``).
Labels are -100 (ignored by the loss) on every token that is not an assistant turn, in every turn of a
multi-turn conversation; the assistant turn's closing tokens (``<|im_end|>``) are trained, so the model learns
to stop. The trained span of turn i is the text between ``render(messages[:i], add_generation_prompt=True)``
and ``render(messages[:i+1])``: this needs a template whose renderings of a conversation's prefixes are
prefixes of each other, as chat templates are (checked; a template that is not gets a one-line error).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LMForgeError
from ..tokenizers import Tokenizer
from ..tokenizers.chat_template import ChatTemplate, load_template
from .dataset import Sampler
from .prepare import seeded_split

IGNORE = -100
ROLES = ("system", "user", "assistant")
INSTRUCTIONS = {"de-en": "Translate German to English:", "code-doc": "Summarise this function:"}
DEFAULT_INSTRUCTION = "Rewrite the following text:"

@dataclass
class Example:
    """One training example before tokenisation: chat ``messages``, or raw ``prompt`` + ``completion``
    (``text`` data is a completion with an empty prompt). ``where`` names its origin for error messages."""

    where: str
    messages: list[dict[str, str]] | None = None
    prompt: str = ""
    completion: str = ""

    def key(self) -> str:
        return json.dumps([self.messages, self.prompt, self.completion], ensure_ascii=False)


@dataclass
class SFTDataset:
    name: str
    splits: dict[str, list[Example]]
    description: str = ""
    instruction: str | None = None  # parallel data: the instruction put before each source
    duplicates: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


# --- reading -------------------------------------------------------------------------------------
def _check_messages(msgs: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise LMForgeError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LMForgeError(f"{where}: message {j + 1} needs the fields \"role\" and \"content\"")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise LMForgeError(f"{where}: message {j + 1} has role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise LMForgeError(f"{where}: message {j + 1}'s content must be a string")
        if role == "assistant" and not content.strip():
            raise LMForgeError(f"{where}: message {j + 1} is an empty assistant turn; remove it or fill it in")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise LMForgeError(f"{where}: the conversation has no assistant turn to learn from")
    return out


def _string(rec: dict, key: str, where: str, allow_empty: bool = False) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise LMForgeError(f"{where}: missing field \"{key}\" (a string)" if v is None else
                           f"{where}: field \"{key}\" must be a string")
    if not allow_empty and not v.strip():
        raise LMForgeError(f"{where}: field \"{key}\" is empty")
    return v


def _format_of(rec: Any, where: str) -> str:
    if isinstance(rec, dict):
        if "messages" in rec:
            return "messages"
        if "prompt" in rec or "completion" in rec:
            return "prompt-completion"
        if "instruction" in rec or "output" in rec:
            return "alpaca"
        if "text" in rec:
            return "text"
    keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
    raise LMForgeError(f"{where}: no known format fits (found {keys}); expected {{\"text\"}}, "
                       "{\"prompt\", \"completion\"}, {\"messages\": [...]} or Alpaca {\"instruction\", \"input\", "
                       "\"output\"}")


def example_from_record(rec: Any, fmt: str, where: str) -> Example:
    if not isinstance(rec, dict):
        raise LMForgeError(f"{where}: expected a JSON object, found {type(rec).__name__}")
    if fmt == "messages":
        if "messages" not in rec:
            raise LMForgeError(f"{where}: missing field \"messages\" (the file's first record has it)")
        return Example(where, messages=_check_messages(rec["messages"], where))
    if fmt == "prompt-completion":
        return Example(where, prompt=_string(rec, "prompt", where, allow_empty=True),
                       completion=_string(rec, "completion", where))
    if fmt == "alpaca":
        instruction = _string(rec, "instruction", where)
        inp = rec.get("input") or ""
        if not isinstance(inp, str):
            raise LMForgeError(f"{where}: field \"input\" must be a string")
        user = instruction + ("\n\n" + inp if inp.strip() else "")
        return Example(where, messages=[{"role": "user", "content": user},
                                        {"role": "assistant", "content": _string(rec, "output", where)}])
    return Example(where, completion=_string(rec, "text", where))


def read_json_examples(path: Path) -> tuple[list[Example], str]:
    """A .jsonl file (one record a line) or a .json file (a list of records); returns (examples, format)."""
    from .corpora import read_text_file

    text = read_text_file(path)
    records: list[tuple[Any, str]] = []
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise LMForgeError(f"{path}: expected a JSON list of records (Alpaca: [{{\"instruction\", \"input\", "
                               "\"output\"}, ...]), or use JSON Lines (.jsonl)")
        records = [(r, f"{path} record {i + 1}") for i, r in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"{path} line {n}"))
            except json.JSONDecodeError as e:
                raise LMForgeError(f"{path} line {n}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not records:
        raise LMForgeError(f"{path} holds no examples")
    fmt = _format_of(records[0][0], records[0][1])
    return [example_from_record(r, fmt, w) for r, w in records], fmt


def _package_file(module: str, pip_name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LMForgeError(f"the {pip_name!r} package is not installed; run pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _alternating(turns: list[str], where: str) -> Example:
    """A conversation as alternating user/assistant turns (the first speaker is the user)."""
    roles = ("user", "assistant")
    return Example(where, messages=[{"role": roles[i % 2], "content": t.strip()} for i, t in enumerate(turns)])


def chatterbot_conversations(language: str = "english") -> list[Example]:
    import yaml

    root = _package_file("chatterbot_corpus", "chatterbot-corpus") / "data"
    d = root / language
    if not d.is_dir():
        langs = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise LMForgeError(f"chatterbot has no language {language!r}; choose one of {', '.join(langs)}")
    out = []
    for f in sorted(d.glob("*.yml")):
        conv = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("conversations") or []
        for i, turns in enumerate(conv):
            turns = [str(t) for t in turns if t is not None and str(t).strip()]
            if len(turns) >= 2:  # a conversation needs a reply to learn from
                out.append(_alternating(turns[: len(turns) // 2 * 2], f"chatterbot {language}/{f.name} #{i + 1}"))
    return out


def chitchat_conversations() -> list[Example]:
    path = _package_file("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for cid, conv in data.items():
        turns = [" ".join(u["text"].strip() for u in msg) for msg in conv["messages"]]
        turns = [t for t in turns if t.strip()]
        if len(turns) >= 2:
            out.append(_alternating(turns[: len(turns) // 2 * 2], f"chitchat {cid}"))
    return out


def parallel_examples(spec: str, instruction: str | None) -> tuple[dict[str, list[Example]] | list[Example], str]:
    """Parallel pairs as instructions; a corpus with a fixed split (de-en) keeps it (the seq2seq test split)."""
    from .parallel import load_parallel_corpus

    corpus = load_parallel_corpus(spec)
    ins = instruction or INSTRUCTIONS.get(spec, DEFAULT_INSTRUCTION)
    exs = [Example(f"{spec} pair {i + 1}", messages=[{"role": "user", "content": instruction_prompt(ins, s)},
                                                     {"role": "assistant", "content": t}])
           for i, (s, t) in enumerate(corpus.pairs)]
    if corpus.fixed_split is None:
        return exs, ins
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for e, sp in zip(exs, corpus.fixed_split):
        splits[sp].append(e)
    return splits, ins


def instruction_prompt(instruction: str, source: str) -> str:
    """The user turn of a parallel pair (the same at training and evaluation); code goes on its own lines."""
    return f"{instruction}{chr(10) if chr(10) in source else ' '}{source}"


def load_sft_data(spec: str, seed: int = 1337, val_frac: float = 0.05, test_frac: float = 0.05,
                  instruction: str | None = None) -> SFTDataset:
    """Read ``spec`` (a file or a built-in name), drop duplicate examples, split train/val/test."""
    from .parallel import is_parallel_spec

    if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise LMForgeError("--val-frac and --test-frac must be in [0, 1) and sum to less than 1")
    fixed: dict[str, list[Example]] | None = None
    ins = None
    name, _, arg = spec.partition(":")
    if name == "chatterbot":
        lang = arg or "english"
        exs, fmt, desc = chatterbot_conversations(lang), "messages", f"chatterbot-corpus ({lang})"
    elif spec == "chitchat":
        exs, fmt, desc = chitchat_conversations(), "messages", "chitchat-dataset (English)"
    elif is_parallel_spec(spec):
        got, ins = parallel_examples(spec, instruction)
        fmt, desc = "parallel", f"{spec} as instructions (\"{ins} ...\")"
        if isinstance(got, dict):
            fixed, exs = got, []
        else:
            exs = got
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise LMForgeError(f"fine-tuning data {spec} is not a file nor a built-in set; give a .jsonl/.json file, "
                               "a .tsv, de-en, code-doc, chatterbot[:LANGUAGE] or chitchat")
        exs, fmt = read_json_examples(path)
        desc = f"{path.name} ({fmt})"
    dups = 0
    if fixed is None:
        seen: dict[str, Example] = {}
        for e in exs:
            seen.setdefault(e.key(), e)
        dups = len(exs) - len(seen)
        uniq = list(seen.values())
        fixed = {k: [uniq[i] for i in idx] for k, idx in seeded_split(len(uniq), val_frac, test_frac, seed).items()}
    if not fixed["train"]:
        raise LMForgeError(f"{spec}: no training examples left after the validation/test split")
    return SFTDataset(spec, fixed, desc, instruction=ins, duplicates=dups, meta={"format": fmt})


# --- rendering and label masks -------------------------------------------------------------------
def resolve_template(template: str | None, model_template: str | None) -> ChatTemplate | None:
    """--template NAME|FILE (tokenizers/chat_template.py), else the model's own template, else None."""
    if template is not None:
        return load_template(template)[0]
    return ChatTemplate(model_template, "the model's chat template") if model_template else None


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]  # labels[t] = ids[t] where token t is trained, IGNORE elsewhere

    @property
    def trained(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)


class SFTEncoder:
    """Turns examples into (ids, labels), rendering chats with ``template``."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None, mask_prompt: bool = True) -> None:
        self.tok, self.template, self.mask_prompt = tokenizer, template, mask_prompt
        self.eos = tokenizer.id_to_token(tokenizer.eot_id)

    def segments(self, ex: Example) -> list[tuple[str, bool]]:
        """The example's text as (piece, trained) segments."""
        if ex.messages is None:
            return [(ex.prompt, False), (ex.completion, True)]
        if self.template is None:
            raise LMForgeError(f"{ex.where}: chat messages need a chat template and this model has none; give "
                               f"--template chatml, --template simple or --template FILE.jinja")
        msgs = ex.messages
        segs: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head = self._render(msgs[:i], True, ex)
            full = self._render(msgs[: i + 1], False, ex)
            if not head.startswith(done) or not full.startswith(head):
                raise LMForgeError(f"{self.template.source} renders the turns of {ex.where} inconsistently (a "
                                   "conversation's prefix is not a prefix of its rendering); use --template")
            segs += [(head[len(done):], False), (full[len(head):], True)]
            done = full
        tail = self._render(msgs, False, ex)[len(done):]
        return segs + [(tail, False)]

    def _render(self, msgs: list[dict[str, str]], gen: bool, ex: Example) -> str:
        assert self.template is not None
        return self.template.render(msgs, add_generation_prompt=gen, eos_token=self.eos)

    def encode(self, ex: Example) -> Encoded:
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in self.segments(ex):
            if not text:
                continue
            t = self.tok.encode(text)
            ids += t
            labels += t if (trained or not self.mask_prompt) else [IGNORE] * len(t)
        if ex.messages is None:  # raw text ends with the end-of-text token (chat turns end with the template's)
            ids.append(self.tok.eot_id)
            labels.append(self.tok.eot_id)
        return Encoded(ids, labels)


@dataclass
class EncodedSplit:
    examples: list[Encoded]
    cut: int = 0        # examples longer than the context, cut to fit
    skipped: int = 0    # examples dropped (too long with --on-long skip, or nothing left to train after a cut)

    @property
    def target_tokens(self) -> int:
        return sum(e.trained for e in self.examples)


def encode_split(encoder: SFTEncoder, examples: list[Example], max_length: int, on_long: str = "cut") -> EncodedSplit:
    """Encode and fit to ``max_length`` input tokens (an example of n tokens gives n - 1 (input, target) pairs)."""
    if on_long not in ("cut", "skip"):
        raise LMForgeError(f"unknown --on-long {on_long!r}; choose cut or skip")
    out = EncodedSplit([])
    for ex in examples:
        e = encoder.encode(ex)
        if len(e.ids) - 1 > max_length:
            if on_long == "skip":
                out.skipped += 1
                continue
            e = Encoded(e.ids[: max_length + 1], e.labels[: max_length + 1])
            out.cut += 1
        if e.trained == 0:
            out.skipped += 1
            continue
        out.examples.append(e)
    return out


# --- batching ------------------------------------------------------------------------------------
def pad_rows(rows: list[Encoded], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (B, L): x = ids[:-1], y = labels[1:], padded with ``pad_id`` / IGNORE."""
    L = length or max(len(r.ids) - 1 for r in rows)
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    y = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids) - 1
        x[i, :n] = torch.tensor(r.ids[:-1])
        y[i, :n] = torch.tensor(r.labels[1:])
    return x, y


def pack_rows(rows: list[list[Encoded]], block: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed (x, y, doc_ids) of shape (B, block): each row holds whole examples one after another; the tail is
    padding (labels IGNORE) with its own document id, so it attends only to itself."""
    x = torch.full((len(rows), block), pad_id, dtype=torch.long)
    y = torch.full((len(rows), block), IGNORE, dtype=torch.long)
    doc = torch.zeros((len(rows), block), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for d, r in enumerate(row):
            n = len(r.ids) - 1
            x[i, at:at + n] = torch.tensor(r.ids[:-1])
            y[i, at:at + n] = torch.tensor(r.labels[1:])
            doc[i, at:at + n] = d
            at += n
        doc[i, at:] = len(row)
    return x, y, doc


class SFTSampler(Sampler):
    """Epochs over the examples in a seeded random order (a new permutation each epoch). Without packing a
    batch is ``batch_size`` examples padded to the longest; with packing, ``batch_size`` rows of ``block``
    tokens filled greedily with whole examples. ``next()`` gives ``(inputs, labels)`` (the trainer's batch):
    ``inputs`` is the ids (B, T), or ``{"input_ids", "doc_ids"}`` when packing. The state (epoch, position)
    makes resume exact."""

    def __init__(self, examples: list[Encoded], batch_size: int, block: int, seed: int, pad_id: int,
                 packing: bool = False, shuffle: bool = True) -> None:
        if not examples:
            raise LMForgeError("no examples to train on (all were empty or too long)")
        self.examples, self.batch_size, self.block, self.seed = examples, batch_size, block, seed
        self.pad_id, self.packing, self.shuffle = pad_id, packing, shuffle
        self.epoch, self.pos = 0, 0
        self._plan: list[list[list[int]]] | None = None
        self.last_tokens = 0

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's batches, each a list of rows, each a list of example indices."""
        order = list(range(len(self.examples)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        if not self.packing:
            rows = [[i] for i in order]
        else:
            rows, cur, used = [], [], 0
            for i in order:
                n = len(self.examples[i].ids) - 1
                if cur and used + n > self.block:
                    rows.append(cur)
                    cur, used = [], 0
                cur.append(i)
                used += n
            if cur:
                rows.append(cur)
        return [rows[a:a + self.batch_size] for a in range(0, len(rows), self.batch_size)]

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return len(self.plan(epoch))

    def draw(self, read: bool = True) -> tuple[Any, torch.Tensor] | None:
        if self._plan is None:
            self._plan = self.plan(self.epoch)
        if self.pos >= len(self._plan):
            self.epoch, self.pos = self.epoch + 1, 0
            self._plan = self.plan(self.epoch)
        rows = [[self.examples[i] for i in row] for row in self._plan[self.pos]]
        self.pos += 1
        if not read:
            return None
        if self.packing:
            x, y, doc = pack_rows(rows, self.block, self.pad_id)
            self.last_tokens = sum(len(r.ids) - 1 for row in rows for r in row)
            return {"input_ids": x, "doc_ids": doc}, y
        x, y = pad_rows([row[0] for row in rows], self.pad_id)
        self.last_tokens = sum(len(row[0].ids) - 1 for row in rows)
        return x, y

    def state_dict(self) -> dict:
        return {"epoch": torch.tensor(self.epoch), "pos": torch.tensor(self.pos)}  # tensors: DCP restores in place

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._plan = int(state["epoch"]), int(state["pos"]), None


def batches_in_order(examples: list[Encoded], batch_size: int, pad_id: int):  # noqa: ANN201
    """Every example once, in order, in padded batches (evaluation)."""
    for a in range(0, len(examples), batch_size):
        yield pad_rows(examples[a:a + batch_size], pad_id)
