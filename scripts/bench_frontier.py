"""The quality–speed frontier: Δppl against measured decode and prefill speed vs the dense model, one row
per recipe, each row's speed measured against dense in its own interleaved `moefy bench` run.

    python scripts/bench_frontier.py                       # every training-free row (~45 min on 2 cores)
    python scripts/bench_frontier.py --rows carve-50 mlpmoe --reuse
    python scripts/bench_frontier.py --rows carve-50-distill carve-25-distill   # ~20 min each
    python scripts/bench_frontier.py --speed-only          # the runtime changed: speed columns again

Each row converts SOURCE (`moefy convert`, calibration on --calib, never the eval text; `--reuse` keeps an
OUT converted before), evaluates it on --windows × 512 tokens of --dataset (the usual protocol), and runs
`moefy bench` against SOURCE. Writes the rows as JSON, a markdown table on stdout, and a PNG of both axes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from moefy.bench import bench, machine
from moefy.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def carve_set(experts: int, shared: int, top_k: int) -> list[str]:
    return [f"transforms.0.carve.{key}={value}" for key, value in
            (("experts", experts), ("shared", shared), ("top_k", top_k))]


# name → (recipe, --set overrides, --format); widths are of the demo's 1536-wide MLP
ROWS = {
    "mlpmoe": ("mlpmoe", [], None),
    "mlpmoe native": ("mlpmoe", [], "native"),
    "carve-50 (w24)": ("carve-50", [], None),
    "carve-25 (w24)": ("carve-25", [], None),
    "carve-50 w96": (str(REPO / "examples" / "carve-25-wide.yaml"), carve_set(16, 2, 6), None),
    "carve-25-wide (w96)": (str(REPO / "examples" / "carve-25-wide.yaml"), [], None),
    "carve-50 w8": ("carve-50", carve_set(192, 64, 32), None),
    "carve-25 w8": ("carve-25", carve_set(192, 16, 32), None),
    "carve-50 w2": ("carve-50", carve_set(768, 256, 128), None),
    "carve-25 w2": ("carve-25", carve_set(768, 64, 128), None),
    "cmoe-50": ("cmoe-50", [], None),
    "cmoe-25": ("cmoe-25", [], None),
    "carve-50-distill": ("carve-50-distill", [], None),
    "carve-25-distill": ("carve-25-distill", [], None),
}
DISTILLED = {"carve-50-distill", "carve-25-distill"}


def convert(name: str, out: Path, source: str, calib: str, reuse: bool) -> float | None:
    recipe, sets, fmt = ROWS[name]
    if reuse and (out / "moefy.json").is_file():
        return json.loads((out / "moefy.json").read_text())["timing"].get("convert_seconds")
    cmd = [sys.executable, "-m", "moefy", "-q", "convert", source, "-r", recipe, "-o", str(out), "--force",
           "--calib", calib, *[a for s in sets for a in ("--set", s)], *(["--format", fmt] if fmt else [])]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, kind in zip(axes, ("decode", "prefill")):
        for row in rows:
            marker = "s" if row["name"] in DISTILLED else "o"
            ax.scatter(row[f"{kind}_ratio"], max(row["delta_pct"], 1e-3), marker=marker)
            ax.annotate(row["name"], (row[f"{kind}_ratio"], max(row["delta_pct"], 1e-3)), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(f"{kind} tokens/s ÷ dense (measured, interleaved)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Δ perplexity % vs dense (log; squares: distilled)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=[n for n in ROWS if n not in DISTILLED], choices=list(ROWS))
    parser.add_argument("--source", default="demo")
    parser.add_argument("--calib", default=str(SHARED / "wikitext-2" / "valid.txt"))
    parser.add_argument("--dataset", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "frontier")
    parser.add_argument("--reuse", action="store_true", help="keep OUTs converted by an earlier run")
    parser.add_argument("--speed-only", action="store_true",
                        help="keep the quality columns of an earlier run (and its OUTs, converting any "
                             "missing one); measure speed again")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "bench_frontier.json")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "frontier.png")
    args = parser.parse_args()

    previous = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": []}
    rows = {row["name"]: row for row in previous["rows"]}  # rows not run this time are kept
    dense_ppl = None
    for name in args.rows:
        out = args.work / name.replace(" ", "_").replace("(", "").replace(")", "")
        if args.speed_only:  # conversions are byte-reproducible: a missing OUT is converted again, not evaluated
            convert(name, out, args.source, args.calib, reuse=True)
            row = rows[name]
        else:
            seconds = convert(name, out, args.source, args.calib, args.reuse)
            quality = evaluate(str(out), baseline=None if dense_ppl else args.source, dataset=args.dataset,
                               max_windows=args.windows, backend="torch")
            dense_ppl = dense_ppl or quality["baseline_ppl"]
            recipe, sets, _ = ROWS[name]
            row = {"name": name, "recipe": Path(recipe).name, "set": sets, "format": quality["format"],
                   "mlp_active_fraction": round(quality["mlp_active_fraction"], 4), "ppl": quality["ppl"],
                   "dense_ppl": dense_ppl, "delta_pct": 100 * (quality["ppl"] / dense_ppl - 1),
                   "convert_seconds": seconds}
        speed = bench(str(out), baseline=args.source, new_tokens=args.new_tokens, rounds=args.rounds,
                      threads=args.threads, backend="torch")
        rows[name] = {**row, "decode_ratio": speed["decode_ratio"], "prefill_ratio": speed["prefill_ratio"],
                      "bytes_ideal_ratio": speed["bytes_ideal_ratio"], "decode_of_ideal": speed["decode_of_ideal"],
                      "dense_decode_tokens_per_s": speed["runs"]["baseline"]["decode_tokens_per_s"],
                      "machine": speed["machine"], "threads": speed["threads"]}
        print(json.dumps(rows[name]), flush=True)
    report = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "machine": machine(), "threads": args.threads or torch.get_num_threads(), "windows": args.windows,
              "rows": sorted(rows.values(), key=lambda r: (r["mlp_active_fraction"], r["name"]))}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print("| recipe | format | MLP active | Δppl % | decode × | prefill × | bytes-ideal × | decode ÷ ideal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        print(f"| {r['name']} | {r['format']} | {r['mlp_active_fraction']:.3f} | {r['delta_pct']:+.1f} | "
              f"{r['decode_ratio']:.2f} | {r['prefill_ratio']:.2f} | {r['bytes_ideal_ratio']:.2f} | "
              f"{r['decode_of_ideal']:.2f} |")
    plot(report["rows"], args.png, f"demo (SmolLM2-135M), {report['machine']}, {report['threads']} threads, "
                                   f"Δppl on {args.windows}×512 WikiText-2 test tokens")


if __name__ == "__main__":
    main()
