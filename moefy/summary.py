"""Parameter accounting of a checkpoint directory from config.json and safetensors headers only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from moefy.arch import ADAPTERS
from moefy.arch.base import ArchAdapter
from moefy.errors import BadInput
from moefy.export import FORMATS
from moefy.io.checkpoint import Checkpoint, open_source
from moefy.io.safetensors_file import read_header

FORMAT_OF_MODEL_TYPE = {fmt.model_type: name for name, fmt in FORMATS.items()}


def _mlp_params(hidden: int, width: int, gated: bool, bias: bool) -> int:
    """Weights and input biases of `width` neurons (an output bias is always active and not counted here)."""
    return (3 if gated else 2) * hidden * width + ((2 if gated else 1) * width if bias else 0)


def summarize(source: Path | Checkpoint) -> dict:
    """The `moefy inspect --json` report (DESIGN.md) for a dense or MoE checkpoint directory."""
    ckpt = open_source(source)
    config = ckpt.config
    model_type = config.get("model_type")
    params_total = 0
    for shard in ckpt.weight_files:
        if shard.suffix == ".safetensors":
            params_total += sum(math.prod(t["shape"]) for t in read_header(shard).values())
        else:
            params_total += sum(t.numel() for t in ckpt._load_bin(shard).values())
    if model_type in FORMAT_OF_MODEL_TYPE:
        fmt = FORMAT_OF_MODEL_TYPE[model_type]
        try:
            specs = FORMATS[fmt].block_specs(config)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a standard config missing its MoE fields
            raise BadInput(f"{ckpt.path}/config.json does not describe a {fmt} model ({type(exc).__name__}: {exc}). "
                           f"It was edited or is incomplete; convert it again.") from None
        architecture = config.get("base_model_type", model_type)
    elif model_type in ADAPTERS:
        fmt, specs, architecture = "dense", {}, model_type
    else:
        raise BadInput(f"{ckpt.path}: model_type {model_type!r} is neither a supported dense family "
                       f"({', '.join(sorted(ADAPTERS))}) nor a MoE format moefy writes.")
    adapter = ADAPTERS.get(architecture) or ArchAdapter(architecture)  # standard MoE configs use standard names
    hidden, layers = adapter.hidden_size(config), adapter.num_layers(config)
    dense_width = adapter.mlp_width(config) if architecture in ADAPTERS else config.get("intermediate_size", 0)
    dense_bias = adapter.mlp_bias(config)
    mlp_total = mlp_active = 0
    inactive = 0
    for layer in range(layers):
        spec = specs.get(layer)
        if spec is None:
            dense = _mlp_params(hidden, dense_width, adapter.gated, dense_bias)
            mlp_total, mlp_active = mlp_total + dense, mlp_active + dense
            continue
        bias = spec.get("expert_bias", False)
        expert = [_mlp_params(hidden, w, spec["gated"], bias) for w in spec["widths"]]
        shared = _mlp_params(hidden, spec["shared_width"], spec["gated"], bias)
        # routed experts have equal widths, so any top_k of them cost the same
        active = sum(sorted(expert, reverse=True)[: spec["top_k"]]) + shared
        mlp_total += sum(expert) + shared
        mlp_active += active
        inactive += sum(expert) + shared - active
    first = specs[min(specs)] if specs else None
    return {
        "format": fmt,
        "architecture": architecture,
        "num_layers": layers,
        "moe_layers": len(specs),
        "num_experts": len(first["widths"]) if first else 0,
        "top_k": first["top_k"] if first else 0,
        "shared_experts": int(bool(first and first["shared_width"])),
        "expert_width": (first["widths"][0] if len(set(first["widths"])) == 1 else list(first["widths"]))
        if first else 0,
        "scoring": first["scoring"] if first else None,
        "combine": first["combine"] if first else None,
        "params_total": params_total,
        "params_active_per_token": params_total - inactive,
        "mlp_params_total": mlp_total,
        "mlp_active_fraction": mlp_active / mlp_total if mlp_total else 1.0,
        "provenance": _provenance(ckpt.path),
    }


def _provenance(path: Path) -> dict | None:
    """The headline of moefy.json: which recipe, from what, and why this format."""
    record_path = path / "moefy.json"
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        return {"recipe": record["recipe"]["name"], "source": record["source"]["origin"],
                "format_reason": record["format"]["reason"], "exact_format": record["format"]["exact"],
                "moefy_version": record["moefy_version"]}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BadInput(f"{record_path} is not a moefy record ({type(exc).__name__}: {exc}): it was edited or "
                       f"damaged. Restore it, or convert again.") from None
