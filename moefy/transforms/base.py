"""Transform plugins: validated options, a weight-free plan, and a per-layer apply.

Lifecycle (llm-compressor style): `check(source)` validates options against the architecture
before anything is written; `plan(prev)` says what the layers will look like so the export
format can be chosen up front; `apply(layer, mlp)` rewrites one layer at a time, so weight-only
transforms stream and memory stays bounded by one layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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

    def __init__(self, options: Options, seed: int = 0):
        self.options = options
        self.seed = seed

    def check(self, source: SourceInfo) -> None:
        """Raise BadInput when the options cannot apply to this architecture."""

    def plan(self, previous: LayerPlan | None, source: SourceInfo) -> LayerPlan:
        raise NotImplementedError

    def apply(self, layer: int, current: DenseMLP | MoeLayer) -> MoeLayer:
        raise NotImplementedError
