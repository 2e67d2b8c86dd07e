"""Big checkpoints on a small machine: convert a > 20 GB synthetic Llama-3-8B-shaped checkpoint.

    python scripts/bench_big_checkpoint.py make --out /tmp/llama8b-42 --layers 42
    python scripts/bench_big_checkpoint.py stream --source /tmp/llama8b-42 --json docs/bench_big_stream.json
    python scripts/bench_big_checkpoint.py make --out /tmp/llama8b-2 --layers 2
    python scripts/bench_big_checkpoint.py carve --source /tmp/llama8b-2 --json docs/bench_big_carve.json \\
        --calib ../shared/data/wikitext-2/valid.txt

`stream` runs `slice` (recipe mlpmoe) and `upcycle` (2 copies, top-1) and, for each, a plain
read + write of the same bytes (source read in 64 MiB blocks, as many bytes written as convert
wrote), each in a fresh process with the page cache dropped first (when allowed).  Peak RSS is
the process's ru_maxrss.  `carve` converts a 1- and a 2-layer checkpoint with a one-transform
carve recipe; the difference is the cost of one more layer.  Random weights: fine for I/O,
time and memory, meaningless for quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
             "head_dim": 128, "vocab_size": 128256}

MEASURE = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(code, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""

PLAIN_READ_WRITE = """
import sys
from pathlib import Path
src, dst, total = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
block, written = bytearray(1 << 26), 0
with open(dst, "wb") as out:
    for path in sorted(src.glob("*.safetensors")):
        with open(path, "rb") as f:
            while (n := f.readinto(block)):
                written += out.write(memoryview(block)[: min(n, max(0, total - written))])
    while written < total:
        written += out.write(memoryview(block)[: min(len(block), total - written)])
"""


def measure(cmd: list[str]) -> dict:
    """Seconds and peak RSS of one command in a fresh process, the page cache dropped first when allowed."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        cold = True
    except OSError:
        cold = False
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    code, seconds, rss_kib = out.stdout.split()[-3:]
    if code != "0":
        raise RuntimeError(f"{cmd} failed with exit code {code}")
    return {"seconds": round(float(seconds), 2), "peak_rss_gib": round(int(rss_kib) / 2**20, 3), "cold_cache": cold}


def make(out: Path, layers: int, shard_size: str) -> None:
    """Random bf16 weights with Llama-3-8B's shapes, and the demo's tokenizer (its ids fit Llama-3's vocabulary)."""
    from bench_convert import make_synthetic

    from moefy.io.checkpoint import open_source
    from moefy.io.writer import parse_size

    s = LLAMA3_8B
    make_synthetic(out, layers, s["hidden_size"], s["intermediate_size"], s["num_attention_heads"],
                   s["num_key_value_heads"], s["head_dim"], s["vocab_size"], parse_size(shard_size))
    for side in open_source("demo").side_files:
        shutil.copyfile(side, out / side.name)


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def stream(source: Path, work: Path) -> list[dict]:
    rows = []
    largest = max(p.stat().st_size for p in source.glob("*.safetensors"))
    recipes = {"slice (mlpmoe)": ["-r", "mlpmoe"],
               "upcycle (2 copies, top-1)": ["-r", "upcycle-8x2", "--set", "transforms.0.upcycle.experts=2",
                                             "--set", "transforms.0.upcycle.top_k=1"]}
    for label, args in recipes.items():
        out = work / "out"
        convert = measure([sys.executable, "-m", "moefy", "-q", "convert", str(source), *args, "-o", str(out)])
        written = weight_bytes(out)
        shutil.rmtree(out)
        plain = measure([sys.executable, "-c", PLAIN_READ_WRITE, str(source), str(work / "plain.bin"), str(written)])
        (work / "plain.bin").unlink()
        rows.append({"transform": label, "source_gb": round(weight_bytes(source) / 1e9, 2),
                     "largest_shard_gb": round(largest / 1e9, 2), "written_gb": round(written / 1e9, 2),
                     "convert": convert, "plain_read_write": plain,
                     "time_ratio": round(convert["seconds"] / plain["seconds"], 3),
                     "rss_minus_largest_shard_gib": round(convert["peak_rss_gib"] - largest / 2**30, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def carve(sources: list[Path], work: Path, calib: str, samples: int) -> list[dict]:
    recipe = work / "carve-one.yaml"
    recipe.write_text("name: carve-50-bench\ntransforms:\n  - carve: {experts: 64, shared: 16, top_k: 16, "
                      "router: fitted, features: contribution, compensation: {refit_down: true}}\n"
                      f"calibration: {{samples: {samples}, seq_len: 512}}\n")
    rows = []
    for source in sources:
        layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
        out = work / "out"
        run = measure([sys.executable, "-m", "moefy", "-q", "convert", str(source), "-r", str(recipe), "-o", str(out),
                       "--calib", calib])
        shutil.rmtree(out)
        rows.append({"layers": layers, "calibration_tokens": samples * 512, **run})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["make", "stream", "carve"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--layers", type=int, default=42)
    parser.add_argument("--shard-size", default="5GB")
    parser.add_argument("--source", type=Path, nargs="+")
    parser.add_argument("--calib")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "make":
        make(args.out, args.layers, args.shard_size)
        return
    work = Path(tempfile.mkdtemp(prefix="moefy-big-", dir=args.source[0].parent))
    try:
        rows = stream(args.source[0], work) if args.command == "stream" else \
            carve(args.source, work, args.calib, args.samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
