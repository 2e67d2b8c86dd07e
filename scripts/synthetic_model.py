"""A checkpoint of a real model's shape with random weights and its tokenizer, where the weights cannot travel
(the GPU machine has no network and takes 64 MiB of files): right for speed and memory, meaningless for quality.

    python scripts/synthetic_model.py CONFIG_DIR OUT [--seed 0]

CONFIG_DIR holds the model's config.json and its tokenizer / generation files (copied as they are).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config_dir), dtype=torch.float32)
    model.save_pretrained(args.out)
    for name in SIDE_FILES:
        if (args.config_dir / name).is_file():
            shutil.copy2(args.config_dir / name, args.out / name)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M random parameters")


if __name__ == "__main__":
    main()
