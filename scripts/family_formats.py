"""Which format `--format auto` writes for every supported family × shipped recipe, from configs only.

    python scripts/family_formats.py > /tmp/table.md   # the family table in README.md

Each family gets a config with its own field names and defaults (2 layers, hidden 64, MLP width 1024 so
64 experts are 16 wide); the recipe is planned against it exactly as `moefy convert` / `moefy inspect
--recipe` plan it — no weights, no calibration.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from moefy.arch import ADAPTERS
from moefy.convert import plan_pipeline
from moefy.export import choose_format
from moefy.recipe import load_recipe
from moefy.plan import SourceInfo

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"slice": "mlpmoe", "slice + fade": "mlpmoe-fade", "slice + prune": "mlpmoe-compensated",
           "upcycle": "upcycle-8x2", "carve (shared)": "carve-50", "carve (no shared)": "cmoe-50",
           "fit_router": str(REPO / "examples" / "fit-router-64k.yaml")}
FIELDS = dict(hidden_size=64, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128)
OVERRIDES = {"gpt2": dict(n_inner=1024)}


def family_config(model_type: str) -> dict:
    config = AutoConfig.for_model(model_type, **FIELDS, **OVERRIDES.get(model_type, {})).to_dict()
    config["model_type"] = model_type
    return config


def table() -> str:
    rows = ["| family | " + " | ".join(RECIPES) + " |", "|---" * (len(RECIPES) + 1) + "|"]
    for model_type, adapter in sorted(ADAPTERS.items()):
        info = SourceInfo(adapter, family_config(model_type))
        cells = []
        for recipe_name in RECIPES.values():
            recipe = load_recipe(recipe_name)
            plan = plan_pipeline(recipe.build_transforms(0), info)
            choice = choose_format(recipe.output.format, info, plan, allow_inexact=True)
            cells.append(f"`{choice.format.name}`" + ("" if choice.exact else " (inexact)"))
        rows.append(f"| {model_type} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    hf_logging.set_verbosity_error()  # token ids outside the small vocabulary: irrelevant to the plan
    print(table())
