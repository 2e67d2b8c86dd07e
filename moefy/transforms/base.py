"""Transform plugins: validated options, a weight-free plan, and a per-layer apply.

Lifecycle (llm-compressor style): `check(source)` validates options against the architecture
before anything is written; `plan(prev)` says what the layers will look like so the export
format can be chosen up front; `apply(layer, mlp, inputs)` rewrites one layer at a time, in layer
order, so memory stays bounded by one layer (+ the calibration activations when a transform needs
them: see moefy.calib).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from moefy.arch.base import ArchAdapter
from moefy.moe.layer import DenseMLP, MoeLayer


class Options(BaseModel):
    """Base for transform options: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class LayerPlan:
    """Weight-free description of the MoE layers a pipeline will produce."""

    num_experts: int = 1
    uniform: bool = True
    expert_width: int | None = None  # when uniform
    scoring: str = "none"
    top_k: int = 1
    combine: str = "unit"
    shared: bool = False
    bias: bool = False  # an output bias per MoE layer
    same_top_k: bool = True  # every MoE layer activates top_k experts (else per-layer budgets)
    dense_layers: tuple[int, ...] = ()  # layers left as dense MLPs


@dataclass(frozen=True)
class SourceInfo:
    adapter: ArchAdapter
    config: dict

    @property
    def mlp_width(self) -> int:
        return self.adapter.mlp_width(self.config)


class Transform:
    name: ClassVar[str]
    Options: ClassVar[type[Options]]
    summary: ClassVar[str]
    needs_calibration: ClassVar[bool] = False  # apply() then receives each layer's MLP inputs

    def __init__(self, options: Options, seed: int = 0):
        self.options = options
        self.seed = seed

    def check(self, source: SourceInfo) -> None:
        """Raise BadInput when the options cannot apply to this architecture."""

    def plan(self, previous: LayerPlan | None, source: SourceInfo) -> LayerPlan:
        raise NotImplementedError

    def preview_samples(self) -> int:
        """Calibration samples for a dense preview pass over every layer before any is rewritten (0: none)."""
        return 0

    def preview(self, layer: int, mlp: DenseMLP, inputs: torch.Tensor) -> None:
        """One layer of the preview pass: the dense MLP and its inputs (model-wide decisions, e.g. budgets)."""

    def apply(self, layer: int, current: DenseMLP | MoeLayer, inputs: torch.Tensor | None = None) -> MoeLayer:
        """Rewrite one layer. `inputs` [T, H]: the layer's MLP inputs on the calibration tokens (after the
        earlier layers were already transformed), given when the pipeline calibrates, else None."""
        raise NotImplementedError
