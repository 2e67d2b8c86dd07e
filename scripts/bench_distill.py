"""Distillation on a real model: Δppl before/after `distill` per recipe and budget, one process.

    python scripts/bench_distill.py --json docs/bench_distill.json          # the table in docs/BENCHMARKS.md
    python scripts/bench_distill.py --only carve-50-distill --set transforms.1.distill.budget.minutes=3

Each row converts SOURCE with a recipe (calibration and training text: --calib only, never the eval
text), then measures perplexity on --dataset with the DESIGN.md protocol against the dense source.
The distill budget actually used (minutes, tokens) is read back from moefy.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from bench_carve import quality_parser

from moefy.convert import convert
from moefy.evaluate import perplexity, token_windows
from moefy.io.data import load_text
from moefy.loading import load_model, load_tokenizer
from moefy.progress import set_quiet
from moefy.recipe import load_recipe

ROWS = {  # name → (recipe, --set overrides of that row, whether to drop the recipe's distill step)
    "carve-50": ("carve-50", [], False),
    "carve-50-distill": ("carve-50-distill", [], False),
    "carve-25": ("carve-25", [], False),
    "carve-25-distill": ("carve-25-distill", [], False),
    "carve-100-distill": ("carve-50-distill", ["transforms.0.carve.top_k=512"], False),  # all active: no drift
    # the carve steps of carve-50-distill / carve-25-distill alone (layer 0 dense), training-free
    "carve-50-dense0": ("carve-50-distill", [], True),
    "carve-25-dense0": ("carve-25-distill", [], True),
}


def distill_totals(record: dict) -> dict:
    """What each distill stage ran (from moefy.json): layer-local time, tokens and layers kept; end-to-end
    steps, tokens, time and held-out KL."""
    layers = [s["distill"] for s in record["layers"].values() if "distill" in s]
    e2e = (record.get("finalize") or {}).get("distill") or {}
    timing = record["timing"]
    local_seconds = sum(v for k, v in timing.items() if k.startswith("layers.") and k.endswith(".distill.seconds"))
    e2e_seconds = timing.get("finalize.distill.seconds", 0)
    return {"local_minutes": round(local_seconds / 60, 2),
            "local_tokens": sum(d["tokens"] for d in layers),
            "local_layers_kept": f"{sum(d['kept'] for d in layers)}/{len(layers)}",
            "e2e_minutes": round(e2e_seconds / 60, 2), "e2e_steps": e2e.get("steps", 0),
            "e2e_tokens": e2e.get("tokens", 0), "e2e_kl": [e2e.get("holdout_kl_before"), e2e.get("holdout_kl_after")]}


def main() -> None:
    parser = quality_parser(__doc__.splitlines()[0], samples=64)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override for every row")
    args = parser.parse_args()
    set_quiet(True)
    torch.manual_seed(0)
    windows = token_windows(load_tokenizer(args.source), load_text(args.dataset), 512, args.windows)
    dense = perplexity(load_model(args.source), windows, 4, label="dense")["ppl"]
    print(f"dense ppl {dense:.4f} on {windows.shape[0]}×512", flush=True)
    rows = []
    for name in args.only or list(ROWS):
        recipe_name, sets, without_distill = ROWS[name]
        applicable = [s for s in args.sets if "distill" not in s or "distill" in recipe_name]
        recipe = load_recipe(recipe_name, [*sets, *applicable, f"calibration.samples={args.samples}"])
        if without_distill:
            recipe.transforms = [step for step in recipe.transforms if "distill" not in step]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            t0 = time.perf_counter()
            record = convert(args.source, recipe, out, calib=args.calib)
            seconds = time.perf_counter() - t0
            ppl = perplexity(load_model(out), windows, 4, label=name)["ppl"]
        row = {"name": name, "active": record["summary"]["mlp_active_fraction"], "format": record["format"]["name"],
               "ppl": ppl, "delta_pct": 100 * (ppl / dense - 1), "convert_s": round(seconds, 1),
               "overrides": [*sets, *applicable], **distill_totals(record)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"dense_ppl": dense, "windows": int(windows.shape[0]),
                                         "samples": args.samples, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
