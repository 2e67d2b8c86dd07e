"""Removed MLP fraction → Δppl on `demo` for Fractal Fade, Compensated Pruning and magnitude pruning.

Every point is a real conversion (native format) evaluated with the DESIGN.md protocol against the
dense source; the baseline is evaluated once.  Writes JSON rows and a Markdown table.

    python scripts/bench_slice_curve.py [--windows 40] [--fractions 0.1 0.2 0.3 0.4] [--json F]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from moefy.convert import convert
from moefy.evaluate import perplexity, token_windows
from moefy.io.data import load_text
from moefy.loading import load_model, load_tokenizer
from moefy.progress import set_quiet
from moefy.recipe import Recipe

DATA = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
B = 16


def methods(fraction: float) -> dict[str, dict]:
    """Each method as a slice-transform option set removing about `fraction` of the MLP neurons."""
    return {
        "fade (dyadic)": {"experts": B, "fade": {"target_removed": fraction, "schedule": "dyadic"}},
        "fade (geometric)": {"experts": B, "fade": {"target_removed": fraction, "schedule": "geometric"}},
        "compensated √(B/B′)": {"experts": B, "prune": {"branches": round(fraction * B), "compensation": "sqrt"}},
        "compensated B/B′": {"experts": B, "prune": {"branches": round(fraction * B), "compensation": "linear"}},
        "branch pruning, no rescale": {"experts": B, "prune": {"branches": round(fraction * B),
                                                               "compensation": "none"}},
        "magnitude per neuron (baseline)": {"experts": 1, "fade": {"target_removed": fraction,
                                                                   "schedule": "uniform", "score": "magnitude"}},
        "max|down| per neuron": {"experts": 1, "fade": {"target_removed": fraction, "schedule": "uniform"}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--dataset", default=str(DATA))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(torch.get_num_threads())
    text = load_text(args.dataset)
    windows = token_windows(load_tokenizer("demo"), text, 512, args.windows)
    base = perplexity(load_model("demo"), windows, batch_size=4)
    print(f"dense demo: ppl {base['ppl']:.4f} ({args.windows} windows × 512)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in args.fractions:
            for name, options in methods(fraction).items():
                out = Path(tmp) / "model"
                recipe = Recipe(name=name, transforms=[{"slice": options}])
                t0 = time.perf_counter()
                record = convert("demo", recipe, out, fmt="native", force=True)
                seconds = time.perf_counter() - t0
                removed = sum(layer["neurons_removed_fraction"] for layer in record["layers"].values()) / \
                    len(record["layers"])
                result = perplexity(load_model(out), windows, batch_size=4)
                row = {"method": name, "target": fraction, "mlp_removed": removed, "ppl": result["ppl"],
                       "baseline_ppl": base["ppl"], "delta_pct": 100 * (result["ppl"] / base["ppl"] - 1),
                       "convert_s": seconds, "windows": args.windows}
                rows.append(row)
                print(f"{name:34s} target {fraction:.2f} removed {removed:.4f} ppl {row['ppl']:9.3f} "
                      f"Δ {row['delta_pct']:+9.2f}%", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| method | MLP removed | ppl | Δppl % |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['mlp_removed']:.1%} | {row['ppl']:.3f} | {row['delta_pct']:+.2f} |")


if __name__ == "__main__":
    main()
