"""Where a decoded token's time goes: attention, MLP/MoE (its router separately), LM head, and the rest
(embeddings, norms, the KV cache, `generate`'s own Python), per model, by wall-clock module hooks.

    python scripts/profile_decode.py MODEL [MODEL ...] [--threads 2] [--new-tokens 64] [--json F]

Each model decodes `--new-tokens` greedy tokens after a 32-token prompt, once to warm up and once timed;
the table gives milliseconds per decoded token by part (the prompt's prefill is excluded).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

import moefy
from moefy.loading import moe_blocks

PARTS = ("attention", "mlp", "router", "lm_head")


def _part_modules(model) -> dict[str, list[torch.nn.Module]]:
    moe = dict(moe_blocks(model))
    parts = defaultdict(list)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("self_attn", "attn", "attention") and not any(name.startswith(m) for m in moe):
            parts["attention"].append(module)
        elif name in moe or leaf == "mlp":
            parts["mlp"].append(module)
        elif leaf in ("gate", "router") and any(name.startswith(m + ".") for m in moe):
            parts["router"].append(module)
    parts["lm_head"].append(model.get_output_embeddings())
    return parts


def profile(path: str, new_tokens: int) -> dict:
    model = moefy.load(path, backend="torch")
    spent = defaultdict(float)
    start: dict[int, float] = {}
    for part, modules in _part_modules(model).items():
        for module in modules:
            module.register_forward_pre_hook(lambda m, a: start.__setitem__(id(m), time.perf_counter()))
            module.register_forward_hook(
                lambda m, a, o, part=part: spent.__setitem__(part, spent[part] + time.perf_counter() - start[id(m)]))
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        model(prompt)  # the prefill alone, to subtract it
        spent.clear()
        t0 = time.perf_counter()
        model(prompt)
        prefill = {**spent, "total": time.perf_counter() - t0}
        spent.clear()
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = time.perf_counter() - t0 - prefill["total"]
    per_token = {part: 1e3 * (spent[part] - prefill.get(part, 0.0)) / new_tokens for part in PARTS}
    per_token["mlp"] -= per_token["router"]  # the router runs inside the MoE block
    per_token["other"] = 1e3 * total / new_tokens - sum(per_token.values())
    per_token["total"] = 1e3 * total / new_tokens
    return {"model": path, **{k: round(v, 3) for k, v in per_token.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [profile(path, args.new_tokens) for path in args.models]
    print(f"ms per decoded token, {args.threads} threads, batch 1")
    print("| model | " + " | ".join(PARTS + ("other", "total")) + " |")
    print("|---|" + "---:|" * (len(PARTS) + 2))
    for row in rows:
        print(f"| {row['model']} | " + " | ".join(f"{row[k]:.2f}" for k in PARTS + ("other", "total")) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
