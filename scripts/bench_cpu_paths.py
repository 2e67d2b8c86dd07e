"""The torch backend's two prefill paths on CPU against the dense MLP they came from: grouped matmuls and
every expert as dense matmuls, per expert width, at one MLP shape. What `GROUPED_COST` in
moefy_kernels/torch_ops.py is read from: a grouped path's cost ÷ its ideal k/E of the dense MLP.

    python scripts/bench_cpu_paths.py [--shape 576x1536] [--tokens 512] [--threads 2] [--json F]

Expert e is the e-th slice of a random SwiGLU MLP (w2 stored as `moefy.load` stores it); random router
logits (a balanced load); the three are timed interleaved, medians of --reps calls after two warm-ups.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moefy_kernels import decode_layout, route
from moefy_kernels.torch_ops import experts_torch

# (experts, top_k) at the demo's width 1536: widths 96, 32, 24, 8, 2 — the shipped carves' routed parts
CASES = [(16, 4), (16, 6), (48, 16), (64, 16), (64, 32), (192, 32), (192, 64), (768, 128)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="576x1536", help="HIDDENxINTERMEDIATE")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden, inter = map(int, args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, hidden, generator=g)
    w13 = torch.randn(2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(hidden, inter, generator=g) / inter ** 0.5

    def dense():
        gate, up = F.linear(x, w13).chunk(2, -1)
        return F.linear(F.silu(gate) * up, w2)

    rows = []
    print(f"{'E':>4} {'k':>4} {'width':>5} {'grouped ÷ dense':>16} {'every ÷ dense':>14} {'grouped ÷ ideal':>16}")
    for experts, top_k in CASES:
        width = inter // experts
        e13 = torch.cat([w13[:inter].view(experts, width, hidden), w13[inter:].view(experts, width, hidden)], 1)
        e2 = decode_layout(w2.view(hidden, experts, width).permute(1, 0, 2), top_k)
        logits = torch.randn(args.tokens, experts, generator=g)

        weights, chosen = route(logits, top_k)
        fns = {"dense": dense, **{path: functools.partial(experts_torch, x, weights, chosen, e13, e2, "silu", True,
                                                          path=path) for path in ("grouped", "every_expert")}}
        samples = {name: [] for name in fns}
        with torch.inference_mode():
            for rep in range(args.reps + 2):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    if rep >= 2:
                        samples[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(values) for name, values in samples.items()}
        row = {"hidden": hidden, "intermediate": inter, "experts": experts, "top_k": top_k, "width": width,
               "tokens": args.tokens, "threads": args.threads, **{f"{name}_ms": round(v, 3) for name, v in ms.items()},
               "grouped_ratio": ms["grouped"] / ms["dense"], "every_expert_ratio": ms["every_expert"] / ms["dense"],
               "grouped_overhead": ms["grouped"] / ms["dense"] / (top_k / experts)}
        rows.append(row)
        print(f"{experts:>4} {top_k:>4} {width:>5} {row['grouped_ratio']:>16.2f} {row['every_expert_ratio']:>14.2f} "
              f"{row['grouped_overhead']:>16.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
