"""Same-run recipe comparison: variants of the demo recipe on Tiny Shakespeare (nanoGPT's split), equal budgets.

    python bench/recipes.py --seconds 120 --threads 1 \
        base  muon:optimizer=muon  qknorm:model.qk_norm=true  relu2:model.mlp=relu2

Each variant is ``NAME`` (the demo recipe as it is) or ``NAME:key=value,key=value`` (``model.X`` sets a model
option). The variants train one after another for the same wall-clock budget on the same prepared data, each is
scored on the whole validation split, and the table (plus ``bench/out/recipes.json``) lists val loss and tokens/s
side by side with the CPU named. Rounds (``--rounds``) repeat the list in order, so drift shows as a spread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from lmforge import load
from lmforge.apps.compare import NEURAL_RECIPES
from lmforge.apps.demo import DEMO_RECIPE
from lmforge.data import PrepareConfig, TokenData, prepare
from lmforge.evaluate import evaluate
from lmforge.train import TrainConfig, train
from lmforge.utils import machine_summary

sys.path.insert(0, str(Path(__file__).parent))
from paths import shared_data  # noqa: E402

TINY = shared_data("tinyshakespeare.txt")


def parse_variant(spec: str) -> tuple[str, dict, dict]:
    name, _, rest = spec.partition(":")
    recipe, model_args = {}, {}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=", 1)
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        (model_args if k.startswith("model.") else recipe)[k.removeprefix("model.")] = val
    return name, recipe, model_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--base", default="demo", help="the recipe variants start from: demo (lmforge demo's GPT) or "
                    "FAMILY:PRESET, compare's recipe for that family (e.g. lstm:small)")
    ap.add_argument("--out", default="bench/out/recipes.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_summary())
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "tinyshakespeare-char"
    prepare(PrepareConfig(corpus=str(TINY), out=str(data), split="contiguous", val_frac=0.1, test_frac=0.0),
            progress=False)
    rows = []
    for r in range(args.rounds):
        for spec in args.variants:
            name, recipe_over, model_over = parse_variant(spec)
            if args.base == "demo":
                base = dict(DEMO_RECIPE)
            else:
                family, _, preset = args.base.partition(":")
                base = dict(NEURAL_RECIPES[family], model=family, preset=preset or None)
            recipe = dict(base, **recipe_over)
            model_args = dict(recipe.pop("model_args", {}), **model_over)
            run = tmp / f"{name}-{r}"
            cfg = TrainConfig(data=str(data), out=str(run), max_time=args.seconds, model_args=model_args,
                              progress=False, threads=args.threads, **recipe)
            res_t = train(cfg)
            res = evaluate(load(run), TokenData(data), split="val", batch_size=32)
            row = {"variant": name, "round": r, "spec": spec, "val_loss": round(res["loss"], 4),
                   "steps": res_t.step, "tokens": res_t.tokens_seen, "tokens_per_s": round(res_t.tokens_per_second)}
            rows.append(row)
            print(f"  {name:<16} round {r}: val {row['val_loss']:.4f} nats/char  {row['steps']} steps  "
                  f"{row['tokens']:,} tokens  {row['tokens_per_s']:,} tok/s", flush=True)
    print(f"\n{machine_summary()}\nbudget {args.seconds:.0f}s per variant, threads {torch.get_num_threads()}")
    print(f"{'variant':<16} {'val loss':>9} {'tok/s':>8}  spec")
    for row in rows:
        print(f"{row['variant']:<16} {row['val_loss']:>9.4f} {row['tokens_per_s']:>8,}  {row['spec']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine_summary(), "seconds": args.seconds,
                                          "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
