"""moefy's own format: the source architecture + MoeBlock, modeling code written into OUT."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, model_validator

from moefy.errors import BadInput
from moefy.export.base import ExportFormat
from moefy.moe.layer import DenseMLP

# Referenced by path, not imported: the modeling code pulls in transformers' model stack (~3.5 s),
# which writing a checkpoint does not need.
MODELING_FILE = Path(__file__).resolve().parent.parent / "moe" / "modeling_moefy.py"
MODEL_TYPE = "moefy"  # == modeling_moefy.MoefyConfig.model_type (tested)


def packed_gate_up(gate: torch.Tensor | None, up: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Each expert's gate rows (or bias entries) then up rows as one contiguous block (see modeling_moefy)."""
    if gate is None:
        return up
    blocks, start = [], 0
    for w in widths:
        blocks += [gate[start:start + w], up[start:start + w]]
        start += w
    return torch.cat(blocks)


def _experts(prefix: str, mlp: DenseMLP, widths: list[int]) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}.gate_up_proj": packed_gate_up(mlp.gate, mlp.up, widths), f"{prefix}.down_proj": mlp.down}
    if mlp.has_input_bias:
        tensors[f"{prefix}.gate_up_bias"] = packed_gate_up(mlp.gate_bias, mlp.up_bias, widths)
    return tensors


class BlockSpec(BaseModel):
    """One native MoE block as config.json states it (what modeling_moefy.MoeBlock is built from)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    widths: list[PositiveInt] = Field(min_length=1)
    top_k: PositiveInt
    scoring: Literal["softmax", "sigmoid", "none"]
    combine: Literal["unit", "prob", "renormalize"]
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"]
    gated: bool
    shared_width: NonNegativeInt = 0
    bias: bool = False
    expert_bias: bool = False
    router_hidden: NonNegativeInt = 0

    @model_validator(mode="after")
    def _top_k_fits(self):
        if self.top_k > len(self.widths):
            raise ValueError(f"top_k {self.top_k} exceeds the {len(self.widths)} experts")
        return self


class NativeFormat(ExportFormat):
    name = "native"
    model_type = MODEL_TYPE
    summary = "moefy MoeBlock (any widths, unit/prob/renormalised, static, shared): moefy.load or trust_remote_code"
    engines = {"llama.cpp": "no architecture: not convertible", "vLLM": "no architecture: does not load"}

    def layer_tensors(self, layer, block, source):
        prefix = source.adapter.mlp_prefix(layer)
        if isinstance(block, DenseMLP):
            return source.adapter.mlp_tensors(layer, block, source.config)
        tensors = {**_experts(f"{prefix}.experts", block.mlp, block.widths), f"{prefix}.expert_scales": block.scales}
        if block.router is not None:
            tensors[f"{prefix}.router.weight"] = block.router
        if block.router_mlp is not None:
            tensors[f"{prefix}.router_in.weight"], tensors[f"{prefix}.router_out.weight"] = block.router_mlp
        if block.shared is not None:
            tensors.update(_experts(f"{prefix}.shared", block.shared, [block.shared.width]))
        if block.bias is not None:
            tensors[f"{prefix}.output_bias"] = block.bias
        return tensors

    def config(self, source, blocks, dtype):
        config = {k: v for k, v in source.config.items() if k not in ("architectures", "auto_map")}
        config.update({
            "model_type": MODEL_TYPE,
            "base_model_type": source.adapter.model_type,
            "architectures": ["MoefyForCausalLM"],
            "auto_map": {"AutoConfig": "modeling_moefy.MoefyConfig",
                         "AutoModelForCausalLM": "modeling_moefy.MoefyForCausalLM"},
            "layers_path": source.adapter.layers_prefix,
            "mlp_attr": source.adapter.mlp_attr,
            "moe_layers": {str(i): spec for i, spec in sorted(blocks.items())},
            "dtype": dtype,
        })
        return config

    def block_specs(self, config):
        """`moe_layers` of a native config, each entry validated (BadInput naming the key)."""
        layers = config.get("moe_layers")
        count = config.get("num_hidden_layers", config.get("n_layer"))
        if not isinstance(layers, dict):
            raise BadInput(f"config.json (native): `moe_layers` is {type(layers).__name__}, not a mapping of layer "
                           f"index → block spec. The output was edited; convert it again.")
        specs = {}
        for key, spec in layers.items():
            if not (key.isdigit() and (not isinstance(count, int) or int(key) < count)):
                raise BadInput(f"config.json (native): `moe_layers` key {key!r} is not a layer index below {count}. "
                               f"The output was edited; convert it again.")
            try:
                specs[int(key)] = BlockSpec.model_validate(spec).model_dump()
            except ValidationError as exc:
                fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
                raise BadInput(f"config.json (native): `moe_layers.{key}` is not a block spec ({fields}). The output "
                               f"was edited; convert it again.") from None
        return specs

    def write_files(self, out_dir):
        shutil.copyfile(MODELING_FILE, Path(out_dir) / MODELING_FILE.name)
