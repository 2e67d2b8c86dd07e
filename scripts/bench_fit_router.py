"""fit_router on carved demo models: Δppl and recall per router kind × active fraction, one process.

    python scripts/bench_fit_router.py --json docs/bench_fit_router.json   # the table in docs/BENCHMARKS.md
    python scripts/bench_fit_router.py --markdown docs/bench_fit_router.json

Every row carves with the same clustering (CMoE's training-free representative-neuron router), then
either keeps that router or replaces it with fit_router; compensation (down refit) runs after the
final router in both.  `native` rows use unit weights; the qwen2_moe rows are the stock-transformers
export with fit_router's temperature trick, to compare against native.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from bench_carve import carve, layer_mean, quality_parser

from moefy.convert import convert
from moefy.evaluate import perplexity, token_windows
from moefy.io.data import load_text
from moefy.loading import load_model, load_tokenizer
from moefy.progress import set_quiet
from moefy.recipe import Recipe

REFIT = {"refit_down": True}
SIZES = {0.5: (64, 16, 16), 0.25: (64, 8, 8)}


def rows() -> dict[str, tuple[float, str, list]]:
    """name → (active fraction, format, transforms)."""
    table = {}
    for active, (experts, shared, k) in SIZES.items():
        tag = f"{round(active * 100)}%"
        base = dict(router="representative")
        table[f"{tag} training-free (representative)"] = (
            active, "native", [carve(experts, shared, k, combine="unit", compensation=REFIT, **base)])
        for method in ("least-squares", "logistic", "mlp"):
            table[f"{tag} fit_router {method}"] = (active, "native", [
                carve(experts, shared, k, combine="unit", **base),
                {"fit_router": {"method": method, "temperature": None, "compensation": REFIT}}])
        table[f"{tag} fit_router least-squares → qwen2_moe"] = (active, "qwen2_moe", [
            carve(experts, shared, k, **base), {"fit_router": {"method": "least-squares", "compensation": REFIT}}])
    return table


def markdown(report: dict) -> str:
    lines = [f"Dense ppl {report['dense_ppl']:.4f} ({report['windows']}×512 windows); calibration "
             f"{report['samples']}×512 tokens.", "",
             "| active | router | format | ppl | Δppl % | recall | mass coverage | load max/mean | rel. error | "
             "convert s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['active']:.2f} | {r['name'].split(' ', 1)[1]} | {r['format']} | {r['ppl']:.2f} | "
                     f"{r['delta_pct']:+.1f} | {r['router_recall']:.3f} | {r['mass_coverage']:.3f} | "
                     f"{r['expert_load_max_over_mean']:.2f} | {r['rel_error_final']:.3f} | {r['convert_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = quality_parser(__doc__.splitlines()[0], samples=16)
    parser.add_argument("--markdown", type=Path, help="print the docs/BENCHMARKS.md table of a --json file")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    set_quiet(True)
    torch.manual_seed(0)
    table = rows()
    windows = token_windows(load_tokenizer(args.source), load_text(args.dataset), 512, args.windows)
    dense = perplexity(load_model(args.source), windows, 4, label="dense")["ppl"]
    print(f"dense ppl {dense:.4f} on {windows.shape[0]}×512", flush=True)
    results = []
    for name in args.only or list(table):
        active, fmt, transforms = table[name]
        recipe = Recipe(name="bench", transforms=transforms)
        recipe.calibration.samples = args.samples
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            record = convert(args.source, recipe, Path(tmp) / "out", fmt=fmt, calib=args.calib)
            seconds = time.perf_counter() - t0
            ppl = perplexity(load_model(Path(tmp) / "out"), windows, 4, label=name)["ppl"]
        layers = list(record["layers"].values())
        row = {"name": name, "active": active, "format": fmt, "ppl": ppl, "delta_pct": 100 * (ppl / dense - 1),
               "convert_s": round(seconds, 1), "recipe": record["recipe"]["transforms"],
               **{key: round(layer_mean(layers, key), 4) for key in
                  ("router_recall", "mass_coverage", "expert_load_max_over_mean", "rel_error_final")}}
        results.append(row)
        if args.json:  # after every row: a long run that stops early keeps what it measured
            args.json.write_text(json.dumps({"dense_ppl": dense, "windows": int(windows.shape[0]),
                                             "samples": args.samples, "rows": results}, indent=2) + "\n")
        print(f"{name:44s} ppl {ppl:9.3f}  Δ {row['delta_pct']:+8.1f}%  recall {row['router_recall']:.3f}  "
              f"{seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
