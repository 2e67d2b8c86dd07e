"""One MoE layer vs the dense SwiGLU MLP it was cut from: milliseconds and speedup ÷ ideal.

The MoE layer holds the same parameters as the dense MLP (E experts of width I / E, top-k routed, so the
ideal speedup is E / k); its time includes the router. Dense is the fused [gate; up] GEMM + SwiGLU +
down GEMM, in the same dtype. Random router logits give a balanced load, as a trained router roughly does.

    python scripts/bench_moe.py [--backend auto] [--device cpu|cuda] [--dtype fp32|bf16] [--json F]
    python scripts/bench_moe.py --shape 4096x14336 --experts 16:4 256:64 --tokens 1   # Llama-3-8B decode
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moefy_kernels import decode_layout, moe_forward, resolve_backend

SHAPES = [(576, 1536), (2048, 8192)]  # SmolLM2-135M; a 1–2B model
EXPERTS = [(16, 4), (8, 2)]
TOKENS = [1, 16, 512, 2048]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fns: dict, device: str, min_seconds: float = 2.0, max_reps: int = 40) -> dict:
    """Median milliseconds of each callable, measured interleaved (A B C A B C …) after one warm-up round,
    so that drift in machine load hits every variant alike and the ratios stay honest."""
    def once(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    round_seconds = sum(once(fn) for fn in fns.values())
    reps = max(5, min(max_reps, int(min_seconds / max(round_seconds, 1e-6))))
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(once(fn))
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


def bench(hidden: int, inter: int, tokens: int, dtype, device: str, backend: str,
          experts: list[tuple[int, int]]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    w13 = (torch.randn(2 * inter, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
    w2 = (torch.randn(hidden, inter, generator=g) / inter ** 0.5).to(device, dtype)

    def dense():
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    def moe(experts: int, top_k: int):
        width = inter // experts
        # expert e = the e-th slice of the dense MLP's intermediate dimension, in the kernel layout
        e13 = torch.cat([w13[:inter].view(experts, width, hidden), w13[inter:].view(experts, width, hidden)], 1)
        e2 = w2.view(hidden, experts, width).permute(1, 0, 2)
        e2 = decode_layout(e2, top_k) if device == "cpu" else e2.contiguous()  # as moefy.load stores it
        router = (torch.randn(experts, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
        return lambda: moe_forward(x, F.linear(x, router), e13, e2, top_k, backend=backend)

    with torch.inference_mode():
        ms = timed({"dense": dense, **{(e, k): moe(e, k) for e, k in experts}}, device)
    return [{"backend": backend, "device": device, "dtype": str(dtype).removeprefix("torch."), "hidden": hidden,
             "intermediate": inter, "experts": e, "top_k": k, "tokens": tokens, "dense_ms": round(ms["dense"], 4),
             "moe_ms": round(ms[e, k], 4), "speedup": round(ms["dense"] / ms[e, k], 3), "ideal_speedup": e / k}
            for e, k in experts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--shape", nargs="*", default=[f"{h}x{i}" for h, i in SHAPES], help="HIDDENxINTERMEDIATE")
    parser.add_argument("--experts", nargs="*", default=[f"{e}:{k}" for e, k in EXPERTS], help="E:K")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    backend = resolve_backend(args.backend, args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    print(f"{'backend':>8} {'H':>5} {'I':>5} {'E':>3} {'k':>2} {'T':>5} {'dense ms':>10} {'moe ms':>10} "
          f"{'speedup':>8} {'÷ ideal':>8}")
    experts = [tuple(map(int, pair.split(":"))) for pair in args.experts]
    for hidden, inter in (tuple(map(int, shape.split("x"))) for shape in args.shape):
        for tokens in args.tokens:
            for row in bench(hidden, inter, tokens, dtype, args.device, backend, experts):
                rows.append(row)
                print(f"{backend:>8} {hidden:>5} {inter:>5} {row['experts']:>4} {row['top_k']:>2} {tokens:>5} "
                      f"{row['dense_ms']:>10.3f} {row['moe_ms']:>10.3f} {row['speedup']:>8.2f} "
                      f"{row['speedup'] / row['ideal_speedup']:>8.2f}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
