"""In-pipeline MoE layer: what a transform produces and an export format writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DenseMLP:
    """A (gated) MLP: down · act(gate x) ⊙ (up x); gate is None for non-gated MLPs."""

    gate: torch.Tensor | None  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    activation: str

    @property
    def width(self) -> int:
        return self.up.shape[0]

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def span(self, start: int, stop: int) -> DenseMLP:
        """Neurons start..stop-1 as views (no copy)."""
        return DenseMLP(None if self.gate is None else self.gate[start:stop], self.up[start:stop],
                        self.down[:, start:stop], self.activation)

    def neurons(self, index: torch.Tensor) -> DenseMLP:
        """The sub-MLP made of the given intermediate neurons, in that order."""
        return DenseMLP(None if self.gate is None else self.gate[index], self.up[index], self.down[:, index],
                        self.activation)

    def num_params(self) -> int:
        return sum(t.numel() for t in (self.gate, self.up, self.down) if t is not None)


def concat_mlps(parts: list[DenseMLP]) -> DenseMLP:
    gate = None if parts[0].gate is None else torch.cat([p.gate for p in parts])
    return DenseMLP(gate, torch.cat([p.up for p in parts]), torch.cat([p.down for p in parts], dim=1),
                    parts[0].activation)


@dataclass
class MoeLayer:
    """Experts stored back to back in one partitioned MLP, plus how tokens are routed to them.

    scoring "none" means a static MoE: every expert on every token with weight = its scale.
    """

    mlp: DenseMLP
    widths: list[int]
    scoring: str = "none"  # "none" | "softmax" | "sigmoid"
    top_k: int = 0  # 0 with scoring "none": all experts
    combine: str = "unit"  # "unit" | "prob" | "renormalize"
    scales: torch.Tensor | None = None  # [E]; None means all ones
    router: torch.Tensor | None = None  # [E, H]
    shared: DenseMLP | None = None
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if sum(self.widths) != self.mlp.width:
            raise ValueError(f"expert widths sum to {sum(self.widths)} but the MLP has {self.mlp.width} neurons")
        if self.scales is None:
            self.scales = torch.ones(len(self.widths))
        if self.scoring == "none":
            self.top_k = len(self.widths)

    @property
    def num_experts(self) -> int:
        return len(self.widths)

    @property
    def uniform(self) -> bool:
        return len(set(self.widths)) == 1

    def expert(self, e: int) -> DenseMLP:
        start = sum(self.widths[:e])
        return self.mlp.span(start, start + self.widths[e])

    def block_spec(self) -> dict:
        """The native MoeBlock's config entry (see modeling_moefy.MoefyConfig)."""
        return {"widths": list(self.widths), "top_k": self.top_k, "scoring": self.scoring, "combine": self.combine,
                "activation": self.mlp.activation, "gated": self.mlp.gated,
                "shared_width": self.shared.width if self.shared is not None else 0}
