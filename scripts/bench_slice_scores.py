"""Which data-free neuron score survives pruning? Δppl on `demo` for several scores at one removed fraction.

Candidate scores beyond the built-in ones are defined here and swapped in for the run.

    python scripts/bench_slice_scores.py [--windows 6] [--removed 0.2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import moefy.transforms.slice as slice_module
from moefy.convert import convert
from moefy.evaluate import perplexity, token_windows
from moefy.io.data import load_text
from moefy.loading import load_model, load_tokenizer
from moefy.progress import set_quiet
from moefy.recipe import Recipe

DATA = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
builtin_scores = slice_module.neuron_scores


def candidate(name: str):
    def score(mlp, _ignored):
        down_max = mlp.down.float().abs().amax(0)
        if name == "gate_up_norm × down_max":
            return builtin_scores(mlp, "gate_up_norm") * down_max
        if name == "magnitude, top-16 down_max protected":
            s = builtin_scores(mlp, "magnitude")
            s[torch.topk(down_max, 16).indices] = float("inf")
            return s
        if name == "8-norm of the down column":
            return mlp.down.float().abs().pow(8).sum(0).pow(1 / 8)
        return builtin_scores(mlp, name)

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--removed", type=float, default=0.2)
    args = parser.parse_args()
    set_quiet(True)
    windows = token_windows(load_tokenizer("demo"), load_text(str(DATA)), 512, args.windows)
    base = perplexity(load_model("demo"), windows, batch_size=args.windows)["ppl"]
    print(f"dense ppl {base:.2f} ({args.windows} windows × 512); {args.removed:.0%} of MLP neurons removed")
    print("| score | per-neuron (1 branch, uniform) | Fractal Fade (16 branches, dyadic) |\n|---|---:|---:|")
    for name in ("magnitude", "down_norm", "gate_up_norm × down_max", "magnitude, top-16 down_max protected",
                 "8-norm of the down column", "down_max"):
        slice_module.neuron_scores = candidate(name)
        cells = []
        for experts, schedule in ((1, "uniform"), (16, "dyadic")):
            recipe = Recipe(transforms=[{"slice": {"experts": experts, "fade": {
                "target_removed": args.removed, "schedule": schedule}}}])
            with tempfile.TemporaryDirectory() as tmp:
                convert("demo", recipe, Path(tmp) / "m", fmt="native")
                ppl = perplexity(load_model(Path(tmp) / "m"), windows, batch_size=args.windows)["ppl"]
            cells.append(f"{100 * (ppl / base - 1):+,.0f} %")
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
