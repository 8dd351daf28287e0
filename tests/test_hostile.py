"""Hostile and careless input (issue #11, the file-and-data half): every damaged file, every output path that
would overwrite the user's work, ends as one line and exit code 2, and leaves every file as it was.

The fixture is the issue's: the first 200 KB of Tiny Shakespeare prepared at char and word level, a 20-step
nano GPT and a word 3-gram (plus a tiny seq2seq run, its parallel data, a Hugging Face export and a GGUF).
Then property-based fuzzing (hypothesis) of every file reader: any input gives a model (or tokenizer,
config, table) or an LMForgeError, never another exception.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.cli import main
from lmforge.errors import LMForgeError

from .conftest import sample_text

gguf = pytest.importorskip("gguf")

FUZZ = settings(deadline=None, max_examples=25, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# --- the fixture -----------------------------------------------------------------------------------------
def run(*args: str) -> int:
    return main([str(a) for a in args])


def write_tiny_gguf(path: Path, drop: tuple[str, ...] = (), meta: dict | None = None,
                    template: str | None = None, seed: int = 0) -> Path:
    """A 1-layer llama GGUF (F32) with a byte-level BPE tokenizer, written with the gguf package.
    ``drop`` leaves metadata keys out; ``meta`` sets llama.* keys to any value (fuzzing)."""
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    d, h, ffn = 8, 2, 16
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "<|im_end|>"]
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    values = {"block_count": 1, "context_length": 32, "embedding_length": d, "feed_forward_length": ffn,
              "attention.head_count": h, "attention.head_count_kv": h,
              "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0}
    values.update(meta or {})
    for key, v in values.items():
        if key in drop:
            continue
        name = f"llama.{key}"
        if isinstance(v, bool):
            w.add_bool(name, v)
        elif isinstance(v, int):
            w.add_int64(name, v)
        elif isinstance(v, float):
            w.add_float64(name, v)
        elif isinstance(v, str):
            w.add_string(name, v)
        else:
            w.add_array(name, v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ t"])
    w.add_token_types([1] * (V - 1) + [3])
    w.add_eos_token_id(V - 1)
    if template is not None:
        w.add_chat_template(template)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", t(V, d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(d, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(d, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", t(d, d))
    w.add_tensor("blk.0.ffn_gate.weight", t(ffn, d))
    w.add_tensor("blk.0.ffn_up.weight", t(ffn, d))
    w.add_tensor("blk.0.ffn_down.weight", t(d, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    shk = root / "shk.txt"
    shk.write_text(sample_text(200_000), encoding="utf-8")
    f = {"root": root, "shk": shk, "char": root / "char", "word": root / "word", "gpt": root / "gpt",
         "ng3": root / "ng3", "par": root / "par", "s2s": root / "s2s", "hf": root / "hf",
         "gptword": root / "gptword", "lstm": root / "lstm", "gguf": root / "tiny.gguf"}
    q = "--no-progress"
    assert run("prepare", "--corpus", shk, "--out", f["char"], q) == 0
    assert run("prepare", "--corpus", shk, "--tokenizer", "word", "--out", f["word"], q) == 0
    assert run("train", "--data", f["char"], "--out", f["gpt"], "--preset", "nano", "--max-steps", "20",
               "--eval-interval", "10", "--eval-iters", "1", "--batch-size", "4", q) == 0
    assert run("train", "--model", "ngram", "--data", f["word"], "--out", f["ng3"], "--order", "3") == 0
    assert run("train", "--data", f["word"], "--out", f["gptword"], "--preset", "nano", "--max-steps", "1",
               "--eval-interval", "1", "--eval-iters", "1", "--batch-size", "2", "--n-embd", "16",
               "--n-layer", "1", "--n-head", "2", q) == 0
    assert run("train", "--model", "lstm", "--preset", "tiny", "--data", f["char"], "--out", f["lstm"],
               "--max-steps", "1", "--eval-interval", "1", "--eval-iters", "1", "--batch-size", "2", q) == 0
    words = "red blue green big small cat dog bird one two".split()
    r = random.Random(0)
    lines = []
    for _ in range(200):
        ws = r.choices(words, k=r.randint(2, 5))
        lines.append(" ".join(ws) + "\t" + " ".join(reversed(ws)))
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run("prepare", "--corpus", root / "pairs.tsv", "--tokenizer", "char", "--out", f["par"], q) == 0
    assert run("train", "--model", "seq2seq", "--preset", "tiny", "--data", f["par"], "--out", f["s2s"],
               "--max-steps", "2", "--batch-size", "8", "--eval-interval", "2", "--eval-iters", "1", "--n-embd",
               "32", "--max-target-length", "48", q) == 0
    assert run("export", f["gpt"], "--out", f["hf"]) == 0
    write_tiny_gguf(f["gguf"])
    return f


def tree_hash(*roots: Path) -> str:
    """Names, contents and link targets of every file under ``roots``: any write, deletion or leftover
    temporary file changes it."""
    h = hashlib.sha256()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames) + [d + "/" for d in dirnames]:
                p = Path(dirpath) / name.rstrip("/")
                h.update(str(p.relative_to(root)).encode() + b"\0")
                if p.is_symlink():
                    h.update(os.readlink(p).encode())
                elif p.is_file():
                    h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def edit_json(path: Path, change: Callable[[object], object]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")


def upd(**kw: object) -> Callable[[dict], dict]:
    return lambda o: {**o, **kw}


def without(key: str) -> Callable[[dict], dict]:
    return lambda o: {k: v for k, v in o.items() if k != key}


# --- damage: each builds the case's files under `case` (a fresh directory) from the fixture --------------
def copy(src: str, name: str = "x") -> Callable[[dict, Path], None]:
    return lambda fx, case: shutil.copytree(fx[src], case / name, symlinks=True)


def copy_and(src: str, fn: Callable[[Path, Path], None]) -> Callable[[dict, Path], None]:
    def damage(fx: dict, case: Path) -> None:
        shutil.copytree(fx[src], case / "x")
        fn(case / "x", case)
    return damage


def put(name: str, text: str) -> Callable[[dict, Path], None]:
    def damage(fx: dict, case: Path) -> None:
        if name.endswith("/"):
            (case / name).mkdir()
        else:
            (case / name).write_text(text, encoding="utf-8")
    return damage


def data_with_notes(d: Path, case: Path) -> None:
    (d / "notes.txt").write_text("my notes about this corpus\n")


def ngram_tables_cut(d: Path, case: Path) -> None:
    from safetensors.numpy import load_file, save_file

    t = load_file(str(d / "model.safetensors"))
    t["logp.2"] = t["logp.2"][:10]
    save_file(t, str(d / "model.safetensors"))


def shard_outside(name: str | None, link: bool = False) -> Callable[[Path, Path], None]:
    """Move the weights out of the model directory and name them from the index (or link them)."""
    def damage(d: Path, case: Path) -> None:
        shutil.move(d / "model.safetensors", case / "outside.safetensors")
        shard = name or "model-00001-of-00001.safetensors"
        if link:
            os.symlink(case / "outside.safetensors", d / shard)
        target = str(case / "outside.safetensors") if name == "ABS" else shard
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": target}}))
    return damage


class Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch PWNED",))


def evil_pickle(d: Path, case: Path) -> None:
    with open(d / "checkpoint" / ".metadata", "wb") as f:  # the pickled index of a DCP checkpoint
        pickle.dump(Evil(), f)


def gguf_case(**kw: object) -> Callable[[dict, Path], None]:
    return lambda fx, case: write_tiny_gguf(case / "x.gguf", **kw)  # type: ignore[arg-type]


ARPA_HEAD = "\\data\\\nngram 1=3\n"
CASES: list[tuple[str, Callable | None, list[str], str]] = [
    # --- item 6: the user's files are never deleted or overwritten silently
    ("prepare-keeps-user-files", copy_and("char", data_with_notes),
     ["prepare", "--corpus", "{shk}", "--out", "{case}/x", "--no-progress"], "lmforge did not write (notes.txt)"),
    ("compare-keeps-table", put("table.txt", "my earlier table\n"),
     ["compare", "--data", "{word}", "--models", "ngram:2", "--out", "{case}", "--budget", "1s"],
     "already holds a comparison report (table.txt)"),
    ("ngram-export-keeps-file", put("lm.arpa", "mine\n"), ["ngram", "export", "{ng3}", "{case}/lm.arpa"],
     "already exists; pass --force"),
    ("translate-keeps-output", put("out.txt", "mine\n"),
     ["translate", "{s2s}", "red cat", "--output", "{case}/out.txt"], "already exists; pass --force"),
    ("export-word-tokenizer", None, ["export", "{gptword}", "--out", "{case}/hf"], "no Hugging Face form"),
    # --- item 7: --out naming a file, --output naming a directory
    ("prepare-out-file", put("f", "keep"), ["prepare", "--corpus", "{shk}", "--out", "{case}/f", "--no-progress"],
     "is an existing file"),
    ("train-out-file", put("f", "keep"),
     ["train", "--data", "{char}", "--out", "{case}/f", "--max-steps", "1", "--no-progress"], "is an existing file"),
    ("ngram-train-out-file", put("f", "keep"), ["train", "--model", "ngram", "--data", "{word}", "--out", "{case}/f"],
     "is an existing file"),
    ("export-out-file", put("f", "keep"), ["export", "{gpt}", "--out", "{case}/f"], "is an existing file"),
    ("compare-out-file", put("f", "keep"),
     ["compare", "--data", "{word}", "--models", "ngram:2", "--out", "{case}/f"], "is an existing file"),
    ("ngram-import-out-file", put("f", "keep"), ["ngram", "import", "{case}/f", "--out", "{case}/f"],
     "is an existing file"),
    ("translate-output-dir", put("d/", ""), ["translate", "{s2s}", "red cat", "--output", "{case}/d"],
     "is a directory"),
    ("ngram-export-to-dir", put("d/", ""), ["ngram", "export", "{ng3}", "{case}/d"], "is a directory"),
    # --- item 7: damaged run directories
    ("state-json-empty", copy_and("gpt", lambda d, c: (d / "checkpoint" / "state.json").write_text("{}")),
     ["train", "--resume", "{case}/x", "--max-steps", "25", "--no-progress"], "state.json is damaged"),
    ("model-type-list", copy_and("gpt", lambda d, c: edit_json(d / "config.json", upd(model_type=["gpt"]))),
     ["generate", "{case}/x", "--max-new-tokens", "2"], "unknown model type ["),
    ("n-head-zero", copy_and("gpt", lambda d, c: edit_json(d / "config.json", upd(n_head=0))),
     ["generate", "{case}/x", "--max-new-tokens", "2"], "n_head (--n-head) must be >= 1"),
    ("n-layer-four", copy_and("gpt", lambda d, c: edit_json(d / "config.json", upd(n_layer="four"))),
     ["eval", "{case}/x"], "n_layer (--n-layer) must be an integer"),
    ("char-tokenizer-no-chars", copy_and("gpt", lambda d, c: edit_json(d / "tokenizer.json", without("chars"))),
     ["generate", "{case}/x", "--max-new-tokens", "2"], 'needs "chars"'),
    ("word-tokenizer-words-number", copy_and("ng3", lambda d, c: edit_json(d / "tokenizer.json", upd(words=5))),
     ["eval", "{case}/x"], "word tokenizer needs"),
    ("tensors-wrong-shape", copy_and("gpt", lambda d, c: edit_json(d / "config.json", upd(n_embd=64))),
     ["generate", "{case}/x", "--max-new-tokens", "2"], "has shape [128"),
    ("ngram-tables-inconsistent", copy_and("ng3", ngram_tables_cut), ["eval", "{case}/x"], "inconsistent"),
    ("ngram-vocab-inconsistent", copy_and("ng3", lambda d, c: edit_json(d / "config.json", upd(vocab=5))),
     ["eval", "{case}/x"], "inconsistent"),
    ("checkpoint-shard-empty", copy_and("gpt", lambda d, c: (d / "checkpoint" / "__0_0.distcp").write_bytes(b"")),
     ["train", "--resume", "{case}/x", "--max-steps", "25", "--no-progress"], "truncated or corrupted"),
    ("shard-ids-outside-vocabulary", copy_and("char", lambda d, c: (d / "val-00000.bin").write_bytes(b"\xff" * 64)),
     ["eval", "{gpt}", "--data", "{case}/x", "--json"], "outside the vocabulary"),
    ("malicious-pickle", copy_and("gpt", evil_pickle),
     ["train", "--resume", "{case}/x", "--max-steps", "25", "--no-progress"], "never unpickles"),
    # --- item 10: a tokenizer larger than the model's vocabulary
    ("tokenizer-too-large", copy_and("gpt", lambda d, c: edit_json(
        d / "tokenizer.json", lambda o: {**o, "chars": o["chars"] + "".join(chr(0x4E00 + i) for i in range(50))})),
     ["generate", "{case}/x", "--max-new-tokens", "2"], "tokens but the model's vocabulary has only"),
    # --- item 7: damaged Hugging Face directories
    ("hf-no-hidden-size", copy_and("hf", lambda d, c: (d / "config.json").write_text(json.dumps(
        {"model_type": "llama", "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 319,
         "intermediate_size": 8}))), ["generate", "{case}/x", "--max-new-tokens", "2"], "has no 'hidden_size'"),
    ("hf-zero-heads", copy_and("hf", lambda d, c: edit_json(d / "config.json", upd(n_head=0))),
     ["generate", "{case}/x", "--max-new-tokens", "2"], "n_head must be at least 1"),
    ("hf-garbage-tokenizer-config", copy_and("hf", lambda d, c: (d / "tokenizer_config.json").write_text("}{")),
     ["generate", "{case}/x", "--max-new-tokens", "2"], "tokenizer_config.json is corrupted"),
    ("hf-index-list", copy_and("hf", lambda d, c: (d / "model.safetensors.index.json").write_text("[]")),
     ["generate", "{case}/x", "--max-new-tokens", "2"], "index.json is damaged"),
    ("hf-vocab-smaller-than-weights", copy_and("hf", lambda d, c: edit_json(d / "config.json", upd(vocab_size=100))),
     ["generate", "{case}/x", "--max-new-tokens", "2"], "needs [100, 128]"),
    # --- item 11: an index pointing outside the model directory
    ("hf-index-dotdot", copy_and("hf", shard_outside("../outside.safetensors")),
     ["generate", "{case}/x", "--max-new-tokens", "2"], "points outside the model directory"),
    ("hf-index-absolute", copy_and("hf", shard_outside("ABS")),
     ["generate", "{case}/x", "--max-new-tokens", "2"], "points outside the model directory"),
    ("hf-index-symlink-out", copy_and("hf", shard_outside(None, link=True)),
     ["generate", "{case}/x", "--max-new-tokens", "2"], "outside the model directory"),
    # --- item 7: GGUF
    ("gguf-no-head-count", gguf_case(drop=("attention.head_count",)),
     ["generate", "{case}/x.gguf", "--max-new-tokens", "2"], "no llama.attention.head_count"),
    ("gguf-head-count-string", gguf_case(meta={"attention.head_count": "two"}),
     ["generate", "{case}/x.gguf", "--max-new-tokens", "2"], "must be a number"),
    ("gguf-template-syntax-error", gguf_case(template="{% for m in messages %}{{ m.content }"),
     ["chat", "{case}/x.gguf", "--chat", "hi", "--max-new-tokens", "2"], "syntax error"),
    # --- item 7: data of the wrong kind, tokenizers meeting what they cannot encode
    ("parallel-data-to-ngram", None, ["train", "--model", "ngram", "--data", "{par}", "--out", "{case}/r"],
     "parallel (source, target) pairs"),
    ("parallel-data-to-gpt-eval", None, ["eval", "{gpt}", "--data", "{par}"], "parallel (source, target) pairs"),
    ("no-byte-fallback-unseen-char", put("t.txt", "to be or not to be\n" * 300 + "café\n"),
     ["prepare", "--corpus", "{case}/t.txt", "--no-byte-fallback", "--out", "{case}/d", "--no-progress"],
     "no byte fallback"),
    ("bad-word-pattern", None, ["prepare", "--corpus", "{shk}", "--tokenizer", "word", "--word-pattern", "([a-z",
                                "--out", "{case}/d", "--no-progress"], "not a valid regular expression"),
    ("word-pattern-two-groups", None, ["prepare", "--corpus", "{shk}", "--tokenizer", "word", "--word-pattern",
                                       "(a)(b)", "--out", "{case}/d", "--no-progress"], "capturing groups"),
    # --- items 7 and 10: ARPA files
    ("arpa-bigram-unknown-word", put("a.arpa", "\\data\\\nngram 1=3\nngram 2=1\n\n\\1-grams:\n-99\t<s>\t0\n"
                                     "-1\t</s>\n-1\ta\t0\n\n\\2-grams:\n-1\ta zzz\n\n\\end\\\n"),
     ["ngram", "import", "{case}/a.arpa", "--out", "{case}/r"], "'zzz', which is not a unigram"),
    ("arpa-nan", put("a.arpa", ARPA_HEAD + "\n\\1-grams:\n-99\t<s>\nnan\t</s>\n-1\ta\n\n\\end\\\n"),
     ["ngram", "import", "{case}/a.arpa", "--out", "{case}/r"], "log10 probabilities must be <= 0"),
    ("arpa-positive-log10", put("a.arpa", ARPA_HEAD + "\n\\1-grams:\n-99\t<s>\n0.5\t</s>\n-1\ta\n\n\\end\\\n"),
     ["ngram", "import", "{case}/a.arpa", "--out", "{case}/r"], "log10 probabilities must be <= 0"),
    # --- YAML configs that are not text
    ("config-binary", put("c.yaml", "\udcff"), ["train", "--config", "{case}/c.yaml", "--out", "{case}/r"],
     "not UTF-8"),
    ("config-directory", put("c.yaml/", ""), ["train", "--config", "{case}/c.yaml", "--out", "{case}/r"],
     "is a directory"),
]


@pytest.mark.parametrize("name, damage, args, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_one_line_exit_2_files_untouched(
        fx: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        name: str, damage: Callable | None, args: list[str], message: str) -> None:
    case = tmp_path / "case"
    case.mkdir()
    if damage is not None:
        if name == "config-binary":
            (case / "c.yaml").write_bytes(b"model: gpt\n\xff\xfe\x00binary")
        else:
            damage(fx, case)
    monkeypatch.chdir(case)  # a malicious pickle would write PWNED here
    args = [a.format(case=case, **{k: v for k, v in fx.items()}) for a in args]
    before = tree_hash(case, fx["root"])
    capsys.readouterr()
    assert run(*args) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("lmforge: error: ") and message in last, err
    assert "Traceback" not in err and "internal error" not in err
    assert all(line.startswith("lmforge: warning:") for line in err.splitlines()[:-1]), err
    assert tree_hash(case, fx["root"]) == before, "a refused command changed files"
    assert not (case / "PWNED").exists()


# --- the --force side and the atomic export -----------------------------------------------------------------
def test_force_replaces_and_user_files_survive_without_it(fx: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    shutil.copytree(fx["char"], data)
    # an lmforge data directory without user files is re-prepared in place
    assert run("prepare", "--corpus", fx["shk"], "--out", data, "--tokenizer", "word", "--no-progress") == 0
    assert json.loads((data / "meta.json").read_text())["tokenizer"]["kind"] == "word"
    (data / "notes.txt").write_text("mine")
    assert run("prepare", "--corpus", fx["shk"], "--out", data, "--no-progress") == 2
    assert (data / "notes.txt").read_text() == "mine"
    assert run("prepare", "--corpus", fx["shk"], "--out", data, "--no-progress", "--force") == 0
    assert not (data / "notes.txt").exists()
    arpa = tmp_path / "lm.arpa"
    arpa.write_text("mine")
    assert run("ngram", "export", fx["ng3"], arpa, "--force") == 0
    assert arpa.read_text().startswith("\n\\data\\")
    out = tmp_path / "out.txt"
    out.write_text("mine")
    assert run("translate", fx["s2s"], "red cat", "--beam", "1", "--output", out, "--force") == 0
    assert out.read_text() != "mine"


def test_compare_force_replaces_the_report_and_reuses_runs(fx: dict, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert run("compare", "--data", fx["word"], "--models", "ngram:2", "--out", out, "--budget", "1s",
               "--no-progress") == 0
    table = (out / "table.txt").read_text()
    assert run("compare", "--data", fx["word"], "--models", "ngram:2", "--out", out, "--budget", "1s",
               "--no-progress") == 2
    assert run("compare", "--data", fx["word"], "--models", "ngram:2", "--out", out, "--budget", "1s",
               "--no-progress", "--force") == 0
    assert (out / "table.txt").read_text().splitlines()[0] == table.splitlines()[0]


def test_export_failure_leaves_no_half_written_out(fx: dict, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.hub import export as export_mod
    from lmforge.models import load_model

    model = load_model(fx["gpt"])
    real = export_mod.atomic_write_json

    def fail_late(path: Path, obj: object) -> None:  # after config.json and the weights are written
        if Path(path).name == "tokenizer_config.json":
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(export_mod, "atomic_write_json", fail_late)
    with pytest.raises(OSError, match="disk full"):
        export_mod.export_hf(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []  # neither --out nor a temporary sibling


def test_symlinked_shards_inside_the_directory_and_hf_cache_layout_load(fx: dict, tmp_path: Path) -> None:
    from lmforge import load

    # Hugging Face's cache: snapshots/REV/model.safetensors -> ../../blobs/HASH
    repo = tmp_path / "models--me--tiny"
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(fx["hf"], snap)
    (repo / "blobs").mkdir()
    shutil.move(snap / "model.safetensors", repo / "blobs" / "f00d")
    os.symlink("../../blobs/f00d", snap / "model.safetensors")
    assert load(snap).num_parameters() > 0
    # a shard in a subfolder of the model directory is fine
    inner = tmp_path / "inner"
    shutil.copytree(fx["hf"], inner)
    (inner / "shards").mkdir()
    shutil.move(inner / "model.safetensors", inner / "shards" / "a.safetensors")
    (inner / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shards/a.safetensors"}}))
    assert load(inner).num_parameters() > 0


# --- property-based fuzzing of every file reader -----------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 400) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


def mutated(base: dict, keys: list[str]) -> st.SearchStrategy[dict]:
    """``base`` with a few of its keys (or new ones) set to arbitrary JSON values or deleted."""
    edits = st.lists(st.tuples(st.sampled_from(keys + ["zz"]), st.one_of(st.just("<del>"), JSON_VALUES)),
                     min_size=1, max_size=3)

    def apply(changes: list) -> dict:
        out = dict(base)
        for k, v in changes:
            if v == "<del>":
                out.pop(k, None)
            else:
                out[k] = v
        return out
    return edits.map(apply)


def accepts_or_refuses(fn: Callable[[], object]) -> object:
    """The property: a result, or an LMForgeError with a one-line message. Anything else fails the test."""
    try:
        return fn()
    except LMForgeError as e:
        assert "\n" not in str(e) and str(e)
        return e


@pytest.fixture(scope="module")
def scratch(fx: dict) -> Path:
    return Path(tempfile.mkdtemp(dir=fx["root"]))


@pytest.mark.parametrize("family", ["gpt", "ng3", "lstm", "s2s", "hf"])
def test_fuzz_config_json_each_family(fx: dict, scratch: Path, family: str) -> None:
    from lmforge import load

    d = scratch / f"cfg-{family}"
    shutil.copytree(fx[family], d, ignore=shutil.ignore_patterns("checkpoint"))
    base = json.loads((d / "config.json").read_text())
    keys = sorted(base)

    @FUZZ
    @given(mutated(base, keys))
    def check(cfg: dict) -> None:
        (d / "config.json").write_text(json.dumps(cfg))
        accepts_or_refuses(lambda: load(d))

    check()


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_fuzz_tokenizer_json(fx: dict, scratch: Path, kind: str) -> None:
    from lmforge.tokenizers import BPETokenizer, load_tokenizer

    path = scratch / f"tok-{kind}.json"
    if kind == "bpe":
        tok = BPETokenizer.train([sample_text(20_000)], 300)
        tok.save(scratch, path.name)
    else:
        shutil.copy(fx["char" if kind == "char" else "word"] / "tokenizer.json", path)
    base = json.loads(path.read_text())

    @FUZZ
    @given(mutated(base, sorted(base)) | st.binary(max_size=40).map(lambda b: {"<raw>": b.hex()}))
    def check(obj: dict) -> None:
        path.write_text(json.dumps(obj))
        tok = accepts_or_refuses(lambda: load_tokenizer(path))
        if not isinstance(tok, LMForgeError):
            assert tok.vocab_size > 0
            accepts_or_refuses(lambda: tok.decode(tok.encode("To be, or not to be")))

    check()


def small_arpa(scratch: Path) -> list[str]:
    from lmforge.hub.arpa import export_arpa
    from lmforge.models.ngram import NGramModel
    from lmforge.tokenizers.word import WordTokenizer

    tok = WordTokenizer.train(["a b c a b\nb c a\nc a b c\n"])
    stream = np.array(tok.encode("a b c a b\nb c a\nc a b c\n"))
    m = NGramModel.train(stream, 3, tok.vocab_size, eos=tok.eot_id, bos=tok.bos_id, unk=tok.unk_id,
                         smoothing="witten-bell")
    m.tokenizer = tok
    export_arpa(m, scratch / "small.arpa", force=True)
    return (scratch / "small.arpa").read_text().splitlines()


def test_fuzz_arpa(scratch: Path) -> None:
    from lmforge.hub.arpa import import_arpa

    lines = small_arpa(scratch)
    path = scratch / "fuzz.arpa"
    token = st.sampled_from(["a", "b", "c", "zz", "<s>", "</s>", "<unk>", "-1.5", "0", "3", "nan", "inf", "-inf",
                             "-99", "\t", " ", "\\data\\", "ngram 2=9", "\\end\\", "\\2-grams:", ""])
    line = st.lists(token, max_size=5).map(" ".join) | st.lists(token, max_size=4).map("\t".join)
    edit = st.tuples(st.integers(0, len(lines) - 1), st.sampled_from(["replace", "delete", "insert"]), line)

    @FUZZ
    @given(st.lists(edit, min_size=1, max_size=4) | st.text(max_size=60).map(lambda t: [(-1, "all", t)]))
    def check(edits: list) -> None:
        cur = list(lines)
        for i, op, text in edits:
            if op == "all":
                cur = text.splitlines()
            elif op == "replace":
                cur[min(i, len(cur) - 1)] = text
            elif op == "delete" and cur:
                del cur[min(i, len(cur) - 1)]
            else:
                cur.insert(i, text)
        path.write_text("\n".join(cur) + "\n", encoding="utf-8")
        m = accepts_or_refuses(lambda: import_arpa(path))
        if not isinstance(m, LMForgeError):
            import torch

            logp, _ = m.score(torch.tensor([[0, 3]]), torch.tensor([[3, 1]]))
            assert not torch.isnan(logp).any()

    check()


def test_fuzz_gguf_metadata(scratch: Path) -> None:
    from lmforge.hub.gguf_io import load_gguf

    keys = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base", "vocab_size"]
    value = (st.integers(-3, 40) | st.floats(allow_nan=True, allow_infinity=True, width=64) | st.text(max_size=6)
             | st.booleans() | st.lists(st.integers(0, 9), min_size=1, max_size=3))
    path = scratch / "fuzz.gguf"

    @FUZZ
    @given(st.dictionaries(st.sampled_from(keys), value, max_size=3), st.lists(st.sampled_from(keys), max_size=2))
    def check(meta: dict, drop: list) -> None:
        path.unlink(missing_ok=True)
        write_tiny_gguf(path, drop=tuple(drop), meta=meta)
        accepts_or_refuses(lambda: load_gguf(path))

    check()


def test_fuzz_gguf_bytes(fx: dict, scratch: Path) -> None:
    from lmforge.hub.gguf_io import load_gguf

    good = fx["gguf"].read_bytes()
    path = scratch / "bytes.gguf"

    @FUZZ
    @given(st.integers(4, len(good) - 1), st.binary(max_size=16), st.booleans())
    def check(at: int, junk: bytes, truncate: bool) -> None:
        data = good[:at] if truncate else good[:at] + junk + good[at + len(junk):]
        path.write_bytes(data)
        accepts_or_refuses(lambda: load_gguf(path))

    check()


def test_fuzz_yaml_training_config(scratch: Path) -> None:
    import yaml

    from lmforge.train import TrainConfig

    fields = list(TrainConfig().to_dict())
    path = scratch / "fuzz.yaml"
    text = (st.dictionaries(st.sampled_from(fields) | st.text(max_size=4) | st.integers(), JSON_VALUES, max_size=4)
            .map(lambda d: yaml.safe_dump(d)) | st.text(max_size=60))

    @FUZZ
    @given(text | st.binary(max_size=30))
    def check(content: str | bytes) -> None:
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        accepts_or_refuses(lambda: TrainConfig.from_yaml(path))

    check()


def test_fuzz_safetensors_index(fx: dict, scratch: Path) -> None:
    from lmforge.hub.hf import read_safetensors

    d = scratch / "index"
    shutil.copytree(fx["hf"], d)
    (scratch / "outside.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    name = st.sampled_from(["model.safetensors", "../outside.safetensors", str(scratch / "outside.safetensors"),
                            "nope.safetensors", "", ".", "..", "config.json", "/etc/passwd", "a/../../x",
                            "model.safetensors/..", "\\..\\x"]) | st.text(max_size=10)
    index = (st.dictionaries(st.text(max_size=4), name | JSON_VALUES, max_size=3).map(lambda m: {"weight_map": m})
             | JSON_VALUES)

    @FUZZ
    @given(index)
    def check(obj: object) -> None:
        (d / "model.safetensors.index.json").write_text(json.dumps(obj))
        out = accepts_or_refuses(lambda: read_safetensors(d))
        if not isinstance(out, LMForgeError):
            assert out  # it read the one real shard, which lies inside the directory

    check()


def test_nothing_is_loaded_with_pickle() -> None:
    """The promise of docs/reliability.md, checked on the source: every torch.load is weights_only, YAML is
    read with safe_load, and nothing calls pickle, marshal, numpy's allow_pickle or yaml's unsafe loaders."""
    import re

    src = Path(__file__).resolve().parents[1] / "src" / "lmforge"
    bad = []
    for p in sorted(src.rglob("*.py")):
        text = p.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{p.name}: {m.group(0)}")
        for pattern in (r"\bpickle\.loads?\(", r"\bmarshal\.loads?\(", r"allow_pickle\s*=\s*True",
                        r"yaml\.(?:load|unsafe_load|full_load)\(", r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):
            bad += [f"{p.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not bad, bad
