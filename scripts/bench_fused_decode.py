"""What a standard format's own decode (`ExportFormat.fast_decode`) is worth: decode tokens/s of MODEL with
its blocks' fused forward and with transformers' block around the experts hook, toggled round by round in
one process (same model, same weights), so only that path differs.

    python scripts/bench_fused_decode.py MODEL [--rounds 6] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moefy
from moefy.loading import moe_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = moefy.load(args.model, backend="torch")
    fused = {block: vars(block)["forward"] for _, block in moe_blocks(model) if "forward" in vars(block)}
    if not fused:
        raise SystemExit(f"{args.model}: no block has a fused decode installed (a native model, no C++ "
                         f"compiler, or experts over the kernel's size)")
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))

    def tokens_per_s(on: bool) -> float:
        for block, forward in fused.items():
            if on:
                block.forward = forward
            else:
                vars(block).pop("forward", None)  # the class's forward: transformers' block
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        return args.new_tokens / (time.perf_counter() - start)

    with torch.inference_mode():
        tokens_per_s(True)
        runs = {True: [], False: []}
        for i in range(args.rounds):
            for on in ((True, False) if i % 2 == 0 else (False, True)):  # ABBA
                runs[on].append(tokens_per_s(on))
    ratio = statistics.median(a / b for a, b in zip(runs[True], runs[False]))
    print(f"{args.model}: fused decode {statistics.median(runs[True]):.2f} tokens/s, transformers' block "
          f"{statistics.median(runs[False]):.2f} tokens/s, paired ratio {ratio:.3f} ({args.rounds} rounds, "
          f"{args.threads} threads)")


if __name__ == "__main__":
    main()
