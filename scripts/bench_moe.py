"""One MoE layer vs the dense SwiGLU MLP it was cut from: milliseconds and speedup ÷ ideal.

The MoE layer holds the same parameters as the dense MLP (E experts of width I / E, top-k routed, so the
ideal speedup is E / k); its time includes the router. Dense is the fused [gate; up] GEMM + SwiGLU +
down GEMM, in the same dtype. Random router logits give a balanced load, as a trained router roughly does.
Each row also gives the weight bytes read per second (the experts the tokens select, once each, and the
router) and the arithmetic rate; on CUDA, against the machine's own ceilings measured first (a device copy's
bytes moved per second, a bf16 8192³ matmul's FLOP/s): % of bandwidth is what decode (T = 1) is bound by,
% of peak what big prefills (T ≥ 2048) are. On CUDA a sample is 20 back-to-back calls between two
synchronisations, so launch overhead counts as it does in a model, but no host round trip per call.

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


CUDA_CALLS_PER_SAMPLE = 20


def timed(fns: dict, device: str, min_seconds: float = 2.0, max_reps: int = 40) -> dict:
    """Median milliseconds of each callable, measured interleaved (A B C A B C …) after one warm-up round,
    so that drift in machine load hits every variant alike and the ratios stay honest."""
    def once(fn):
        if device != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(CUDA_CALLS_PER_SAMPLE):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / CUDA_CALLS_PER_SAMPLE

    round_seconds = sum(once(fn) for fn in fns.values())
    reps = max(5, min(max_reps, int(min_seconds / max(round_seconds, 1e-6))))
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(once(fn))
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


def ceilings(dtype) -> dict:
    """This GPU's measured copy bandwidth (bytes read + written per second, 1 GiB device to device) and
    matmul rate (an 8192³ product in `dtype`), each the median of 10 after 3 warm-ups."""
    def rate(fn, amount):
        for _ in range(3):
            fn()
        samples = []
        for _ in range(10):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return amount / statistics.median(samples)

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = rate(lambda: dst.copy_(src), 2 * src.numel())
    a = torch.randn(8192, 8192, device="cuda").to(dtype)
    b = torch.randn(8192, 8192, device="cuda").to(dtype)
    flops = rate(lambda: a @ b, 2 * 8192 ** 3)
    return {"copy_gbps": round(copy / 1e9, 1), "matmul_tflops": round(flops / 1e12, 1),
            "dtype": str(dtype).removeprefix("torch.")}


def traffic(hidden: int, inter: int, tokens: int, experts: int, top_k: int, element: int) -> tuple[float, float]:
    """(weight bytes read, FLOPs) of one MoE call, the dense MLP when experts = top_k = 1: each expert that
    any token selects is read once (expected count under uniform routing), the router once."""
    width = inter // experts
    touched = experts * (1 - (1 - top_k / experts) ** tokens)
    router = hidden * experts if experts > 1 else 0
    return (touched * 3 * hidden * width + router) * element, 2 * tokens * (top_k * 3 * hidden * width + router)


def bench(hidden: int, inter: int, tokens: int, dtype, device: str, backend: str,
          experts: list[tuple[int, int]], peaks: dict | None = None) -> list[dict]:
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
    element = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for e, k in experts:
        row = {"backend": backend, "device": device, "dtype": str(dtype).removeprefix("torch."), "hidden": hidden,
               "intermediate": inter, "experts": e, "top_k": k, "tokens": tokens, "dense_ms": round(ms["dense"], 4),
               "moe_ms": round(ms[e, k], 4), "speedup": round(ms["dense"] / ms[e, k], 3), "ideal_speedup": e / k}
        for name, (moved, flops), seconds in (("dense", traffic(hidden, inter, tokens, 1, 1, element), ms["dense"]),
                                              ("moe", traffic(hidden, inter, tokens, e, k, element), ms[e, k])):
            row[f"{name}_gbps"] = round(moved / seconds / 1e6, 1)
            row[f"{name}_gflops"] = round(flops / seconds / 1e6, 1)
            if peaks:
                row.update(ceiling_copy_gbps=peaks["copy_gbps"], ceiling_matmul_tflops=peaks["matmul_tflops"])
                row[f"{name}_pct_bandwidth"] = round(100 * row[f"{name}_gbps"] / peaks["copy_gbps"], 1)
                row[f"{name}_pct_peak"] = round(100 * row[f"{name}_gflops"] / 1e3 / peaks["matmul_tflops"], 1)
        rows.append(row)
    return rows


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
    peaks = ceilings(dtype) if args.device == "cuda" else None
    if peaks:
        print(f"ceilings: device copy {peaks['copy_gbps']} GB/s (read + written), {peaks['dtype']} matmul "
              f"{peaks['matmul_tflops']} TFLOP/s")
    rows = []
    print(f"{'backend':>8} {'H':>5} {'I':>5} {'E':>3} {'k':>2} {'T':>5} {'dense ms':>10} {'moe ms':>10} "
          f"{'speedup':>8} {'÷ ideal':>8} {'moe GB/s':>9} {'moe GF/s':>9}")
    experts = [tuple(map(int, pair.split(":"))) for pair in args.experts]
    for hidden, inter in (tuple(map(int, shape.split("x"))) for shape in args.shape):
        for tokens in args.tokens:
            for row in bench(hidden, inter, tokens, dtype, args.device, backend, experts, peaks):
                rows.append(row)
                print(f"{backend:>8} {hidden:>5} {inter:>5} {row['experts']:>4} {row['top_k']:>2} {tokens:>5} "
                      f"{row['dense_ms']:>10.3f} {row['moe_ms']:>10.3f} {row['speedup']:>8.2f} "
                      f"{row['speedup'] / row['ideal_speedup']:>8.2f} {row['moe_gbps']:>9.1f} "
                      f"{row['moe_gflops']:>9.1f}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
