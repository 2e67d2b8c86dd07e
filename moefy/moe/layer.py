"""In-pipeline MoE layer: what a transform produces and an export format writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moefy_kernels.routing import activation_fn, route


@dataclass
class DenseMLP:
    """A (gated) MLP: down · act(gate x + b_gate) ⊙ (up x + b_up) + b_down; gate is None for non-gated MLPs.

    The input biases belong to intermediate neurons and travel with them into experts; the output bias
    belongs to the whole layer, so every sub-MLP (`span`, `neurons`, `concat_mlps`) drops it and a
    MoeLayer holds it once as its `bias`.
    """

    gate: torch.Tensor | None  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    activation: str
    gate_bias: torch.Tensor | None = None  # [I]
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]

    @property
    def width(self) -> int:
        return self.up.shape[0]

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def has_input_bias(self) -> bool:
        return self.up_bias is not None

    def span(self, start: int, stop: int) -> DenseMLP:
        """Neurons start..stop-1 as views (no copy), without the output bias."""
        return self._select(slice(start, stop))

    def neurons(self, index: torch.Tensor) -> DenseMLP:
        """The sub-MLP made of the given intermediate neurons, in that order, without the output bias."""
        return self._select(index)

    def _select(self, index) -> DenseMLP:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return DenseMLP(pick(self.gate), self.up[index], self.down[:, index], self.activation,
                        pick(self.gate_bias), pick(self.up_bias))

    def num_params(self) -> int:
        return sum(t.numel() for t in (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)
                   if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP on [T, H] in fp32."""
        y = activations(self, x.float()) @ self.down.float().T
        return y if self.down_bias is None else y + self.down_bias.float()


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight.float().T
    return y if bias is None else y + bias.float()


def activations(mlp: DenseMLP, x: torch.Tensor) -> torch.Tensor:
    """Intermediate activations act(gate x + b) ⊙ (up x + b) (act(up x + b) when not gated), [T, I] fp32."""
    act = activation_fn(mlp.activation)
    up = _affine(x, mlp.up, mlp.up_bias)
    return act(_affine(x, mlp.gate, mlp.gate_bias)) * up if mlp.gated else act(up)


def concat_mlps(parts: list[DenseMLP]) -> DenseMLP:
    """The parts' neurons side by side (output biases dropped, as for any sub-MLP)."""
    def cat(name):
        return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])

    return DenseMLP(cat("gate"), cat("up"), torch.cat([p.down for p in parts], dim=1), parts[0].activation,
                    cat("gate_bias"), cat("up_bias"))


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
        if self.mlp.down_bias is not None or (self.shared is not None and self.shared.down_bias is not None):
            raise ValueError("an MLP's output bias belongs to the layer once: pass it as MoeLayer.bias")
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
        return self.combine_weights(self.logits(x))[0]

    def combine_weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight of every expert [T, E], scales included, zero where not selected; selected ids [T, k]) of
        router logits."""
        weights, experts = route(logits, self.top_k, scoring=self.scoring, combine=self.combine)
        return torch.zeros_like(logits).scatter(1, experts, weights) * self.scales.float(), experts

    def neuron_weights(self, x: torch.Tensor, expert_weights: torch.Tensor | None = None) -> torch.Tensor:
        """`route` (or the given per-expert weights [T, E]) expanded to every intermediate neuron, [T, I]."""
        weights = self.route(x) if expert_weights is None else expert_weights
        return torch.repeat_interleave(weights, torch.tensor(self.widths), dim=1)

    def forward(self, x: torch.Tensor, expert_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The block's function on [T, H] in fp32, computed densely and masked (calibration, tests);
        `expert_weights` [T, E] replaces the routing (distillation's straight-through weights)."""
        x = x.float()
        y = activations(self.mlp, x) * self.neuron_weights(x, expert_weights) @ self.mlp.down.float().T
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
                "expert_bias": self.mlp.has_input_bias,
                "router_hidden": self.router_mlp[0].shape[0] if self.router_mlp is not None else 0}
