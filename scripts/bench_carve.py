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


COMP = {"compensation": {"refit_down": True, "bias": True}}
ROWS = {  # name → (active fraction, built-in recipe | transform list | "neuron-oracle")
    "cmoe-50": (0.5, "cmoe-50"),
    "carve-50 router=representative": (0.5, [carve(64, 16, 16, router="representative")]),
    "carve-50 router=centroid": (0.5, [carve(64, 16, 16, router="centroid")]),
    "carve-50 no compensation": (0.5, [carve(64, 16, 16)]),
    "carve-50 + refit_down": (0.5, [carve(64, 16, 16, compensation={"refit_down": True})]),
    "carve-50 + bias": (0.5, [carve(64, 16, 16, compensation={"bias": True})]),
    "carve-50": (0.5, "carve-50"),
    "neuron-oracle-50": (0.5, "neuron-oracle"),
    "cmoe-25": (0.25, "cmoe-25"),
    "carve-25": (0.25, "carve-25"),
    "neuron-oracle-25": (0.25, "neuron-oracle"),
    "carve-75": (0.75, [carve(64, 24, 24, **COMP)]),
    "neuron-oracle-75": (0.75, "neuron-oracle"),
    "carve-37.5": (0.375, [carve(64, 12, 12, **COMP)]),
    "neuron-oracle-37.5": (0.375, "neuron-oracle"),
}


def neuron_oracle_ppl(source: str, windows: torch.Tensor, fraction: float) -> float:
    """Reference line: every token keeps its own top `fraction` of MLP neurons by |act(gate x)·(up x)|·‖down_i‖."""
    model = load_model(source)
    for layer in model.model.layers:
        mlp = layer.mlp
        norms = mlp.down_proj.weight.float().norm(dim=0)

        def forward(x, mlp=mlp, norms=norms):
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            score = h.abs() * norms
            keep = score >= score.topk(max(1, round(fraction * h.shape[-1])), dim=-1).values[..., -1:]
            return mlp.down_proj(h * keep)

        mlp.forward = forward
    return perplexity(model, windows, 4, label="neuron-oracle")["ppl"]


def layer_mean(layers: list[dict], key: str) -> float:
    return sum(layer.get(key, math.nan) for layer in layers) / max(1, len(layers))


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
        if spec == "neuron-oracle":
            ppl = neuron_oracle_ppl(args.source, windows, fraction)
            results.append({"name": name, "active": fraction, "ppl": ppl, "delta_pct": 100 * (ppl / dense - 1)})
            print(f"{name:28s} active {fraction:.3f}  ppl {ppl:9.3f}  Δ {results[-1]['delta_pct']:+9.1f}%", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            t0 = time.perf_counter()
            recipe = row_recipe(spec, args.samples)
            record = convert(args.source, recipe, out, fmt="native", calib=args.calib)
            seconds = time.perf_counter() - t0
            ppl = perplexity(load_model(out), windows, 4, label=name)["ppl"]
        layers = list(record["layers"].values())
        row = {"name": name, "active": record["summary"]["mlp_active_fraction"], "ppl": ppl,
               "delta_pct": 100 * (ppl / dense - 1), "convert_s": round(seconds, 1),
               "recipe": record["recipe"]["transforms"],
               **{key: round(layer_mean(layers, key), 4) for key in ("router_recall", "rel_error", "rel_error_final")}}
        results.append(row)
        print(f"{name:28s} active {row['active']:.3f}  ppl {ppl:9.3f}  Δ {row['delta_pct']:+9.1f}%  "
              f"recall {row['router_recall']:.3f}  err {row['rel_error']:.3f}→{row['rel_error_final']:.3f}  "
              f"{seconds:.0f}s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"dense_ppl": dense, "windows": int(windows.shape[0]), "samples": args.samples,
                                         "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
