"""Carving quality sweep on a real model: Δppl per (active fraction × method), one process.

    python scripts/bench_carve.py --json docs/bench_carve.json               # the table in docs/BENCHMARKS.md
    python scripts/bench_carve.py --only carve-50 --windows 10 --samples 16  # a quick look

Each row converts SOURCE with a carve recipe (calibration on --calib, never the eval text), then
measures perplexity on --dataset with the DESIGN.md protocol against the dense source.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from moefy.convert import convert
from moefy.evaluate import perplexity, token_windows
from moefy.io.data import load_text
from moefy.loading import load_model, load_tokenizer
from moefy.progress import set_quiet
from moefy.recipe import Recipe, load_recipe

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def carve(experts, shared, top_k, **extra):
    return {"carve": {"experts": experts, "shared": shared, "top_k": top_k, **extra}}


CMOE = {"router": "representative", "features": "markers", "combine": "unit"}
ROWS = {  # name → (active fraction, transform list or built-in recipe name)
    "cmoe-50": (0.5, [carve(16, 2, 6, **CMOE)]),
    "cmoe-25": (0.25, [carve(16, 1, 3, **CMOE)]),
}


def row_recipe(spec, samples: int) -> Recipe:
    if isinstance(spec, str):
        recipe = load_recipe(spec)
    else:
        recipe = Recipe(name="bench", transforms=spec)
    recipe.calibration.samples = samples
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="demo")
    parser.add_argument("--calib", default=str(SHARED / "wikitext-2" / "valid.txt"))
    parser.add_argument("--dataset", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--samples", type=int, default=64, help="calibration samples × 512 tokens")
    parser.add_argument("--only", nargs="*", help="row names to run")
    parser.add_argument("--row", action="append", default=[], help="extra row: NAME=YAML transform list")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    set_quiet(True)
    torch.manual_seed(0)
    import yaml

    rows = dict(ROWS)
    for extra in args.row:
        name, text = extra.split("=", 1)
        rows[name] = (None, yaml.safe_load(text))
    names = args.only or list(rows)
    windows = token_windows(load_tokenizer(args.source), load_text(args.dataset), 512, args.windows)
    dense = perplexity(load_model(args.source), windows, 4, label="dense")["ppl"]
    print(f"dense ppl {dense:.4f} on {windows.shape[0]}×512", flush=True)
    results = []
    for name in names:
        fraction, spec = rows[name]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            t0 = time.perf_counter()
            record = convert(args.source, row_recipe(spec, args.samples), out, fmt="native", calib=args.calib)
            seconds = time.perf_counter() - t0
            ppl = perplexity(load_model(out), windows, 4, label=name)["ppl"]
        layers = record["layers"].values()
        mean = lambda key: sum(l.get(key, math.nan) for l in layers) / max(1, len(layers))  # noqa: E731
        row = {"name": name, "active": record["summary"]["mlp_active_fraction"], "ppl": ppl,
               "delta_pct": 100 * (ppl / dense - 1), "convert_s": round(seconds, 1),
               "recall": round(mean("router_recall"), 4), "rel_error": round(mean("rel_error"), 4),
               "rel_error_final": round(mean("rel_error_final"), 4), "recipe": record["recipe"]["transforms"]}
        results.append(row)
        print(f"{name:28s} active {row['active']:.3f}  ppl {ppl:9.3f}  Δ {row['delta_pct']:+9.1f}%  "
              f"recall {row['recall']:.3f}  err {row['rel_error']:.3f}→{row['rel_error_final']:.3f}  "
              f"{seconds:.0f}s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"dense_ppl": dense, "windows": int(windows.shape[0]), "samples": args.samples,
                                         "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
