"""In-pipeline MoE layer: what a transform produces and an export format writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moefy_kernels.routing import activation_fn, route


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP on [T, H] in fp32."""
        return activations(self, x.float()) @ self.down.float().T


def activations(mlp: DenseMLP, x: torch.Tensor) -> torch.Tensor:
    """Intermediate activations act(gate x) ⊙ (up x) (act(up x) when not gated), [T, I] fp32."""
    act = activation_fn(mlp.activation)
    up = x @ mlp.up.float().T
    return act(x @ mlp.gate.float().T) * up if mlp.gated else act(up)


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
    router_mlp: tuple[torch.Tensor, torch.Tensor] | None = None  # ([R, H], [E, R]): logits += silu(x W1ᵀ) W2ᵀ
    shared: DenseMLP | None = None
    bias: torch.Tensor | None = None  # [H] added to every token's output (expected-output compensation)
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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] fp32: linear, plus the residual MLP router when there is one."""
        logits = x.float() @ self.router.float().T
        if self.router_mlp is not None:
            w1, w2 = self.router_mlp
            logits = logits + torch.nn.functional.silu(x.float() @ w1.float().T) @ w2.float().T
        return logits

    def scale_router(self, factor: float) -> None:
        """Multiply the logits by `factor` (a power of two keeps their ranking bit for bit)."""
        self.router = self.router * factor
        if self.router_mlp is not None:
            self.router_mlp = (self.router_mlp[0], self.router_mlp[1] * factor)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token weight of every expert [T, E] fp32 (zero where not selected), scales included."""
        if self.scoring == "none":
            return self.scales.float().expand(x.shape[0], -1)
        weights, experts = route(self.logits(x), self.top_k, scoring=self.scoring, combine=self.combine)
        return torch.zeros(x.shape[0], self.num_experts).scatter(1, experts, weights) * self.scales.float()

    def neuron_weights(self, x: torch.Tensor) -> torch.Tensor:
        """`route` expanded to every intermediate neuron of the routed experts, [T, I]."""
        return torch.repeat_interleave(self.route(x), torch.tensor(self.widths), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's function on [T, H] in fp32, computed densely and masked (calibration, tests)."""
        x = x.float()
        y = activations(self.mlp, x) * self.neuron_weights(x) @ self.mlp.down.float().T
        if self.shared is not None:
            y = y + self.shared.forward(x)
        if self.bias is not None:
            y = y + self.bias.float()
        return y

    def block_spec(self) -> dict:
        """The native MoeBlock's config entry (see modeling_moefy.MoefyConfig)."""
        return {"widths": list(self.widths), "top_k": self.top_k, "scoring": self.scoring, "combine": self.combine,
                "activation": self.mlp.activation, "gated": self.mlp.gated,
                "shared_width": self.shared.width if self.shared is not None else 0, "bias": self.bias is not None,
                "router_hidden": self.router_mlp[0].shape[0] if self.router_mlp is not None else 0}
