"""Slice conversion cost vs a plain safetensors load+save of the same checkpoint, with peak RSS.

Each command runs in its own process, so its peak RSS is its own.  Synthetic Llama checkpoints of
growing depth (same shapes per layer) show whether convert's memory grows with model size.

    python scripts/bench_convert.py [--layers 8 32] [--json F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PLAIN_COPY = """
import sys, json, shutil
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for shard in sorted(src.glob("*.safetensors")):
    save_file(load_file(shard), dst / shard.name, metadata={"format": "pt"})
shutil.copy(src / "config.json", dst / "config.json")
"""

MEASURE = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
code = subprocess.run(sys.argv[1:]).returncode
seconds = time.perf_counter() - t0
print(f"{code} {seconds} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one command run in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    code, seconds, rss_kib = out.stdout.split()[-3:]
    if code != "0":
        raise RuntimeError(f"{cmd} failed with {code}")
    return float(seconds), int(rss_kib) / 1024


def make_synthetic(path: Path, layers: int, hidden: int = 1024, inter: int = 4096, heads: int = 16, kv: int = 4,
                   head_dim: int = 64, vocab: int = 32000, shard_bytes: int = 500 * 10**6) -> Path:
    """A random bf16 Llama checkpoint in size-bounded shards, written tensor by tensor (never whole in memory)."""
    import torch

    from moefy.io.writer import ShardedWriter

    path.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "dtype": "bfloat16", "max_position_embeddings": 4096,
              "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    (path / "config.json").write_text(json.dumps(config))
    with ShardedWriter(path, shard_bytes) as writer:
        g = torch.Generator().manual_seed(0)

        def rand(*shape):
            return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

        writer.add("model.embed_tokens.weight", rand(vocab, hidden))
        for i in range(layers):
            p = f"model.layers.{i}."
            for name, shape in (("self_attn.q_proj", (heads * head_dim, hidden)), ("self_attn.k_proj", (kv * head_dim,
                                hidden)), ("self_attn.v_proj", (kv * head_dim, hidden)),
                                ("self_attn.o_proj", (hidden, heads * head_dim)), ("mlp.gate_proj", (inter, hidden)),
                                ("mlp.up_proj", (inter, hidden)), ("mlp.down_proj", (hidden, inter))):
                writer.add(p + name + ".weight", rand(*shape))
            writer.add(p + "input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
            writer.add(p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
            print(f"layer {i + 1}/{layers}", flush=True)
        writer.add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        writer.add("lm_head.weight", rand(vocab, hidden))
        writer.close()
    return path


def bench(name: str, src: Path, work: Path) -> dict:
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    plain_s, plain_rss = measure([sys.executable, "-c", PLAIN_COPY, str(src), str(work / f"{name}-plain")])
    moefy_bin = str(Path(sys.executable).with_name("moefy"))
    conv_s, conv_rss = measure([moefy_bin, "-q", "convert", str(src), "-r", "mlpmoe", "-o",
                                str(work / f"{name}-moe"), "--set", "output.shard_size=500MB"])
    row = {"checkpoint": name, "size_mb": size / 1e6, "plain_s": plain_s, "plain_peak_rss_mb": plain_rss,
           "convert_s": conv_s, "convert_peak_rss_mb": conv_rss, "time_ratio": conv_s / plain_s}
    print(f"{name:14s} {row['size_mb']:8.0f} MB  plain {plain_s:6.2f}s {plain_rss:7.0f} MiB   "
          f"convert {conv_s:6.2f}s {conv_rss:7.0f} MiB   ratio {row['time_ratio']:.2f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(tmp)
        if not args.skip_demo:
            from moefy.io.checkpoint import open_source

            rows.append(bench("demo (fp32)", open_source("demo").path, work))
        for layers in args.layers:
            src = make_synthetic(work / f"synthetic-{layers}", layers)
            rows.append(bench(f"llama-{layers}L bf16", src, work))
            subprocess.run(["rm", "-rf", str(src), str(work / f"llama-{layers}L bf16-plain"),
                            str(work / f"llama-{layers}L bf16-moe")])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
