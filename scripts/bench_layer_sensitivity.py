"""Which layers' MoE blocks cost the most perplexity: each layer's block alone in the dense model, and
the converted model with only that layer's dense MLP restored.

    python scripts/bench_layer_sensitivity.py out/demo-carve-50 --windows 6 --json sens.json

Both models run in fp32 on the same --windows × 512 tokens of --dataset; a forward hook swaps one MLP
for the other model's block (the input it receives is that model's own). What `dense_layers` in a
carve recipe should keep: the layers whose block alone costs most (docs/DISTILL.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_carve import SHARED

from moefy.evaluate import perplexity, token_windows
from moefy.io.data import load_text
from moefy.loading import load_model, load_tokenizer
from moefy.progress import set_quiet


def swapped_ppl(model, layer: int, donor, windows) -> float:
    """ppl of `model` with layer `layer`'s MLP output replaced by `donor`'s block on the same input."""
    mlp, other = model.model.layers[layer].mlp, donor.model.layers[layer].mlp
    hook = mlp.register_forward_hook(lambda module, inputs, output: other(inputs[0]))
    try:
        return perplexity(model, windows, 4)["ppl"]
    finally:
        hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a converted checkpoint (standard export or native)")
    parser.add_argument("--source", default="demo")
    parser.add_argument("--dataset", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    set_quiet(True)
    windows = token_windows(load_tokenizer(args.source), load_text(args.dataset), 512, args.windows)
    dense, moe = load_model(args.source), load_model(args.model)
    base, converted = perplexity(dense, windows, 4)["ppl"], perplexity(moe, windows, 4)["ppl"]
    pct = lambda ppl: round(100 * (ppl / base - 1), 2)  # noqa: E731
    print(f"dense ppl {base:.4f}, converted {converted:.4f} ({pct(converted):+.2f} %) on {windows.shape[0]}×512")
    rows = []
    for layer in range(len(dense.model.layers)):
        row = {"layer": layer, "alone_delta_pct": pct(swapped_ppl(dense, layer, moe, windows)),
               "restored_delta_pct": pct(swapped_ppl(moe, layer, dense, windows))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "dense_ppl": base, "converted_ppl": converted,
                                         "windows": int(windows.shape[0]), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
