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


def markdown(report: dict) -> str:
    """The carve table and a mermaid line chart (Δppl by active fraction) of a --json report."""
    lines = [f"Dense ppl {report['dense_ppl']:.4f} ({report['windows']}×512 windows); calibration "
             f"{report['samples']}×512 tokens.", "",
             "| method | MLP active | ppl | Δppl % | router recall | rel. error → after compensation |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        extra = (f"{r['router_recall']:.3f} | {r['rel_error']:.3f} → {r['rel_error_final']:.3f}"
                 if "router_recall" in r else "– | –")
        lines.append(f"| {r['name']} | {r['active']:.3f} | {r['ppl']:.2f} | {r['delta_pct']:+.1f} | {extra} |")
    return "\n".join(lines)


SERIES = {"carve (moefy)": ("#1f77b4", lambda n: n.startswith("carve-") and " " not in n),
          "CMoE-faithful": ("#d62728", lambda n: n.startswith("cmoe")),
          "per-token neuron oracle": ("#2ca02c", lambda n: n.startswith("neuron-oracle"))}


def svg_chart(report: dict) -> str:
    """Δppl % (log scale) against MLP active fraction, one line per method family; plain SVG, no deps."""
    width, height, left, top, plot_w, plot_h = 560, 340, 60, 20, 470, 270
    lo, hi = 0.1, 10 ** math.ceil(math.log10(max(r["delta_pct"] for r in report["rows"])))
    x = lambda f: left + (f - 0.2) / 0.6 * plot_w  # noqa: E731 - fractions 0.2 … 0.8
    y = lambda d: top + plot_h * (1 - (math.log10(max(d, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))  # noqa: E731,E501
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for exp in range(-1, int(math.log10(hi)) + 1):
        yy = y(10 ** exp)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{10 ** exp:g}%</text>')
    for f in (0.25, 0.375, 0.5, 0.75):
        out.append(f'<text x="{x(f):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{f:g}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">MLP active fraction</text>'
               f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" '
               f'text-anchor="middle">Δppl % (log)</text>')
    for i, (label, (color, match)) in enumerate(SERIES.items()):
        points = sorted((r["active"], r["delta_pct"]) for r in report["rows"] if match(r["name"]))
        path = " ".join(f"{x(f):.1f},{y(d):.1f}" for f, d in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        out += [f'<circle cx="{x(f):.1f}" cy="{y(d):.1f}" r="3" fill="{color}"/>' for f, d in points]
        out.append(f'<text x="{left + plot_w - 150}" y="{top + 14 + 14 * i}" fill="{color}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"



def layer_mean(layers: list[dict], key: str) -> float:
    return sum(layer.get(key, math.nan) for layer in layers) / max(1, len(layers))


def row_recipe(spec, samples: int) -> Recipe:
    if isinstance(spec, str):
        recipe = load_recipe(spec)
    else:
        recipe = Recipe(name="bench", transforms=spec)
    recipe.calibration.samples = samples
    return recipe


def quality_parser(description: str, samples: int) -> argparse.ArgumentParser:
    """The arguments every convert-then-eval quality sweep takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--source", default="demo")
    parser.add_argument("--calib", default=str(SHARED / "wikitext-2" / "valid.txt"))
    parser.add_argument("--dataset", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--samples", type=int, default=samples, help="calibration samples × 512 tokens")
    parser.add_argument("--only", nargs="*", help="row names to run")
    parser.add_argument("--json", type=Path)
    return parser


def main() -> None:
    parser = quality_parser(__doc__.splitlines()[0], samples=64)
    parser.add_argument("--row", action="append", default=[], help="extra row: NAME=YAML transform list")
    parser.add_argument("--markdown", type=Path,
                        help="print the docs/BENCHMARKS.md table of a --json file and write its chart beside it (.svg)")
    args = parser.parse_args()
    if args.markdown:
        report = json.loads(args.markdown.read_text())
        args.markdown.with_suffix(".svg").write_text(svg_chart(report))
        print(markdown(report))
        return
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
