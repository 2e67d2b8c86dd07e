"""The vocabulary a conversion is planned in, shared by transforms, calibration and export formats: transform
options (validated, unknown keys refused), the source a plan is made for, and the weight-free plan of the MoE
layers. It imports nothing of moefy above `arch`, so any package may depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from moefy.arch.base import ArchAdapter


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
    router_hidden: int = 0  # width of a residual MLP router (0: linear router only)
    dense_layers: tuple[int, ...] = ()  # layers left as dense MLPs


@dataclass(frozen=True)
class SourceInfo:
    adapter: ArchAdapter
    config: dict

    @property
    def mlp_width(self) -> int:
        return self.adapter.mlp_width(self.config)

    @property
    def hidden_size(self) -> int:
        return self.adapter.hidden_size(self.config)
