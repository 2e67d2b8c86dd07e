"""Do moefy's exports run right, and fast, in llama.cpp? Perplexity in llama.cpp against moefy's own under
llama.cpp's protocol, and llama-bench tokens/s against the dense model, interleaved.

    python scripts/check_llamacpp.py DENSE MODEL [MODEL ...] [--cache ~/.cache/moefy/llamacpp] [--chunks 40]
                                     [--threads 2] [--rounds 3] [--no-bench] [--converter] [--json F]

llama.cpp is built once from the `llama-cpp-python` sdist's vendored sources (pip downloads it from the
package index; nothing else is fetched), CPU only, into --cache. Each moefy output whose format has a
llama.cpp architecture is written to an f32 GGUF by `moefy export-gguf` (its tokenizer from the source GGUF);
the dense model, and every model with --converter, by llama.cpp's own `convert_hf_to_gguf.py` (with the
sdist's gguf-py; `pip install sentencepiece` first).
Perplexity: `llama-perplexity -c 512 --chunks N` on WikiText-2 raw test, which scores the second half of
each 512-token chunk; moefy's figure is the same protocol computed here with `moefy.load` (fp32) on the
same tokens (llama.cpp's own, from `llama-tokenize`: the file's bytes as they are, CRLF included), so the
two figures differ only by what each engine computes. Speed: `llama-bench -p 512 -n 64`, one repetition per
model per round, models interleaved round by round; medians and ratios to DENSE. moefy's native format has
no llama.cpp architecture: such a model is reported as not convertible. Not part of CI (it compiles for
minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
SDIST = "llama-cpp-python==0.3.36"
CTX = 512


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, text=True, capture_output=True, **kwargs)


def build(cache: Path, threads: int) -> Path:
    """llama.cpp's source folder, with `build/bin/llama-perplexity` and `llama-bench` built in it."""
    cache.mkdir(parents=True, exist_ok=True)
    source = next(cache.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if source is None:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", cache])
        with tarfile.open(next(cache.glob("llama_cpp_python-*.tar.gz"))) as archive:
            archive.extractall(cache, filter="data")
        source = next(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not (source / "build" / "CMakeCache.txt").exists():
        _run(["cmake", "-S", source, "-B", source / "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
              "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
    if not (source / "build" / "bin" / "llama-tokenize").exists():
        _run(["cmake", "--build", source / "build", "--target", "llama-perplexity", "llama-bench", "llama-tokenize",
              "-j", threads])
    return source


def convert(source: Path, model: Path, out: Path, converter: bool) -> tuple[str, str | None]:
    """The model as an f32 GGUF at `out`, written afresh: (the writer, None or why it could not be written)."""
    from moefy.export import FORMATS
    from moefy.io.output import is_moefy_output

    fmt = json.loads((model / "moefy.json").read_text())["format"]["name"] if is_moefy_output(model) else None
    if fmt is not None and FORMATS[fmt].gguf_arch is None:
        return "none", f"moefy's {fmt} format has no llama.cpp architecture"
    out.unlink(missing_ok=True)
    if fmt is not None and not converter:
        try:
            _run([sys.executable, "-m", "moefy", "export-gguf", model, "-o", out])
        except subprocess.CalledProcessError as exc:
            return "moefy export-gguf", f"moefy export-gguf failed: {exc.stderr.strip().splitlines()[-1]}"
        return "moefy export-gguf", None
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    try:
        _run([sys.executable, source / "convert_hf_to_gguf.py", model, "--outtype", "f32", "--outfile", out], env=env)
    except subprocess.CalledProcessError as exc:
        return "convert_hf_to_gguf.py", f"convert_hf_to_gguf.py failed: {exc.stderr.strip().splitlines()[-1]}"
    return "convert_hf_to_gguf.py", None


def _bos(gguf: Path) -> int | None:
    """The BOS id llama.cpp puts first in each chunk, or None where the GGUF does not add one."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    adds = fields.get("tokenizer.ggml.add_bos_token")
    if adds is None or not adds.contents():
        return None
    return int(fields["tokenizer.ggml.bos_token_id"].contents())


def llamacpp_ppl(source: Path, gguf: Path, chunks: int, threads: int) -> float | str:
    """llama-perplexity's final estimate, or its error line when it does not load or run the model."""
    try:
        done = _run([source / "build" / "bin" / "llama-perplexity", "-m", gguf, "-f", WIKITEXT, "-c", CTX,
                     "--chunks", chunks, "-t", threads, "-b", CTX])
    except subprocess.CalledProcessError as exc:
        return next((line for line in exc.stderr.splitlines() if " E " in line), exc.stderr[-200:]).strip()
    found = re.search(r"Final estimate: PPL = ([0-9.na]+)", done.stdout + done.stderr)
    return float(found.group(1)) if found else "no final estimate"


def llamacpp_tokens(source: Path, gguf: Path) -> list[int]:
    """The text as llama-perplexity tokenizes it: its bytes as they are (WikiText-2 raw ships CRLF, which
    `moefy eval` reads as universal newlines), no special-token parsing, no BOS."""
    done = _run([source / "build" / "bin" / "llama-tokenize", "-m", gguf, "-f", WIKITEXT, "--ids", "--no-bos",
                 "--no-parse-special", "--no-escape", "--log-disable"])
    return json.loads(done.stdout.strip().splitlines()[-1])


def moefy_ppl(model: Path, chunks: int, ids: list[int], bos: int | None) -> float:
    """llama-perplexity's protocol with moefy.load, on llama.cpp's own tokens (`llamacpp_tokens`): chunk i =
    tokens [i·512, (i+1)·512) (its first token replaced by BOS where the vocabulary adds one), and only the
    second half of each chunk scored (255 predictions)."""
    import moefy

    lm = moefy.load(model, backend="torch")
    nll, count, first = 0.0, 0, CTX // 2
    with torch.inference_mode():
        for i in range(chunks):
            chunk = torch.tensor(ids[i * CTX:(i + 1) * CTX])[None]
            if bos is not None:
                chunk[0, 0] = bos
            logits = lm(input_ids=chunk).logits[0].float()
            logp = logits[first:CTX - 1].log_softmax(-1)
            nll -= float(logp.gather(1, chunk[0, first + 1:, None]).sum())
            count += CTX - 1 - first
    return math.exp(nll / count)


def bench(source: Path, ggufs: list[Path], threads: int, rounds: int) -> list[dict]:
    """llama-bench prompt (512) and generation (64) tokens/s, one repetition per model per round, interleaved."""
    samples = [{"pp": [], "tg": []} for _ in ggufs]
    for _ in range(rounds):
        for gguf, sample in zip(ggufs, samples):
            done = _run([source / "build" / "bin" / "llama-bench", "-m", gguf, "-p", CTX, "-n", 64, "-t", threads,
                         "-r", 1, "-o", "json"])
            for row in json.loads(done.stdout):
                sample["pp" if row["n_prompt"] else "tg"].append(row["avg_ts"])
    return [{k: statistics.median(v) for k, v in s.items()} for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense", type=Path)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "moefy" / "llamacpp")
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-bench", action="store_true", help="perplexities only (they need no quiet machine)")
    parser.add_argument("--converter", action="store_true",
                        help="write every GGUF with llama.cpp's convert_hf_to_gguf.py, not moefy export-gguf")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = build(args.cache, args.threads)
    rows, ggufs = [], []
    for model in [args.dense, *args.models]:
        gguf = args.cache / "gguf" / f"{model.resolve().name}.gguf"
        gguf.parent.mkdir(exist_ok=True)
        writer, why = convert(source, model, gguf, args.converter)
        row = {"model": str(model), "writer": writer, "gguf": None if why else str(gguf), "not_convertible": why}
        if why is None:
            row.update(llamacpp_ppl=llamacpp_ppl(source, gguf, args.chunks, args.threads),
                       moefy_ppl=moefy_ppl(model, args.chunks, llamacpp_tokens(source, gguf), _bos(gguf)))
            if isinstance(row["llamacpp_ppl"], float):
                row["relative_gap"] = row["llamacpp_ppl"] / row["moefy_ppl"] - 1
                ggufs.append(gguf)
        rows.append(row)
        print(json.dumps(row), flush=True)
    speeds = {} if args.no_bench else dict(zip(ggufs, bench(source, ggufs, args.threads, args.rounds)))
    dense = speeds.get(Path(rows[0]["gguf"] or ""))
    for row in rows:
        speed = speeds.get(Path(row["gguf"] or ""))
        if speed:
            row.update(pp_tok_s=speed["pp"], tg_tok_s=speed["tg"])
            if dense:
                row.update(prompt_x=speed["pp"] / dense["pp"], generation_x=speed["tg"] / dense["tg"])
    base = rows[0] if "relative_gap" in rows[0] else None
    for row in rows:  # Δppl against dense inside each engine: free of any tokenizer difference between them
        if base and "relative_gap" in row:
            row.update(llamacpp_delta=row["llamacpp_ppl"] / base["llamacpp_ppl"] - 1,
                       moefy_delta=row["moefy_ppl"] / base["moefy_ppl"] - 1)
    print("| model | llama.cpp ppl | moefy ppl (same protocol) | gap | Δ vs dense: llama.cpp / moefy | prompt × "
          "| generation × |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if row["not_convertible"] or "relative_gap" not in row:
            why = row["not_convertible"] or row["llamacpp_ppl"]
            print(f"| {row['model']} | {why} | {row.get('moefy_ppl', float('nan')):.4f} | — | — | — | — |")
        else:
            print(f"| {row['model']} | {row['llamacpp_ppl']:.4f} | {row['moefy_ppl']:.4f} | "
                  f"{100 * row['relative_gap']:+.2f} % | {100 * row.get('llamacpp_delta', float('nan')):+.2f} / "
                  f"{100 * row.get('moefy_delta', float('nan')):+.2f} % | {row.get('prompt_x', float('nan')):.2f} | "
                  f"{row.get('generation_x', float('nan')):.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "chunks": args.chunks, "rounds": args.rounds,
                                         "sdist": SDIST, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
