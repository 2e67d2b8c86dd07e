"""`slice`: MLPMoE — cut each MLP's intermediate dimension into B static experts (branches).

Identity: B contiguous branches, each with scale α_b = 1, all active and summed, reproduce the
dense MLP exactly (the intermediate sum is just regrouped).  Two optional, data-free sparsifiers
(moefy's reading of arXiv 2511.21089; see docs/SLICE.md):

* Fractal Fade — branches ranked by importance get self-similar keep ratios (top half keeps ρ⁰,
  next quarter ρ¹, next eighth ρ², ...), removing each branch's least important neurons; ρ is
  solved per layer so that `target_removed` of the MLP's neurons go.
* Compensated Pruning — remove the least important whole branches and rescale the B′ survivors
  by √(B/B′) (variance-preserving for independent branch outputs), or B/B′, or not at all.

Neuron importance defaults to max|down_:,i| ("down_max"): the norm product ‖gate_i‖·‖up_i‖·‖down_:,i‖
ranks the outlier neurons that small LMs depend on near the bottom (measured, docs/SLICE.md). A
branch's importance is the sum over its neurons.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from moefy.errors import BadInput
from moefy.moe.layer import DenseMLP, MoeLayer, concat_mlps
from moefy.plan import LayerPlan, Options, SourceInfo
from moefy.transforms.base import Transform

Score = Literal["down_max", "magnitude", "down_norm", "gate_up_norm"]


class FadeOptions(Options):
    target_removed: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of MLP neurons removed per layer")
    schedule: Literal["dyadic", "geometric", "uniform"] = Field(
        "dyadic", description="keep ratio by branch rank: dyadic ρ^level, geometric ρ^rank, uniform ρ")
    score: Score = Field("down_max", description="neuron importance (docs/SLICE.md)")
    min_neurons: int = Field(1, ge=1, description="neurons every branch keeps at least")


class PruneOptions(Options):
    fraction: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of branches removed")
    branches: int | None = Field(None, ge=0, description="number of branches removed (instead of fraction)")
    compensation: Literal["sqrt", "linear", "none"] = Field(
        "sqrt", description="survivor scale: sqrt(B/B'), B/B', or 1")
    score: Score = Field("down_max", description="branch importance = sum of neuron scores")

    @model_validator(mode="after")
    def _one_amount(self):
        if (self.fraction is None) == (self.branches is None):
            raise ValueError("give exactly one of `fraction` or `branches`")
        return self


class SliceOptions(Options):
    experts: int = Field(16, ge=1, description="number of branches B")
    remainder: Literal["spread", "error"] = Field(
        "spread", description="when B does not divide the width: one extra neuron to the first branches, or fail")
    fade: FadeOptions | None = None
    prune: PruneOptions | None = None


def neuron_scores(mlp: DenseMLP, score: str) -> torch.Tensor:
    if score == "down_max":
        return mlp.down.float().abs().amax(dim=0)
    down = mlp.down.float().norm(dim=0)
    up = mlp.up.float().norm(dim=1)
    gate = mlp.gate.float().norm(dim=1) if mlp.gate is not None else torch.ones_like(up)
    if score == "down_norm":
        return down
    if score == "gate_up_norm":
        return gate * up
    return gate * up * down


def rank_branches(scores: torch.Tensor, branches: list[torch.Tensor]) -> list[int]:
    """Branch indices, most important (largest summed neuron score) first."""
    return sorted(range(len(branches)), key=lambda b: -float(scores[branches[b]].sum()))


def branch_widths(width: int, branches: int) -> list[int]:
    base, extra = divmod(width, branches)
    return [base + (1 if b < extra else 0) for b in range(branches)]


def fade_keep_counts(widths: list[int], order: list[int], target_removed: float, schedule: str,
                     min_neurons: int) -> list[int]:
    """Neurons each branch keeps; `order` ranks branches most → least important."""
    total, nb = sum(widths), len(widths)
    exponent = [0.0] * nb
    for rank, b in enumerate(order):
        if schedule == "dyadic":
            exponent[b] = float(math.floor(-math.log2(1 - rank / nb)))
        elif schedule == "geometric":
            exponent[b] = float(rank)
        else:
            exponent[b] = 1.0

    def real_counts(rho: float) -> list[float]:
        return [min(w, max(min_neurons, w * rho ** exponent[b])) for b, w in enumerate(widths)]

    goal = max(sum(min(min_neurons, w) for w in widths), round((1 - target_removed) * total))
    lo, hi = 0.0, 1.0  # kept(ρ) grows with ρ: bisect for the ρ that keeps `goal` neurons
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(real_counts(mid)) < goal else (lo, mid)
    real = real_counts(hi)
    keep = [math.floor(r) for r in real]
    # largest remainders first (more important branches win ties) until exactly `goal` are kept
    by_remainder = sorted(range(nb), key=lambda b: (-(real[b] - keep[b]), order.index(b)))
    for b in by_remainder[: max(0, goal - sum(keep))]:
        keep[b] += 1
    return keep


class Slice(Transform):
    name = "slice"
    Options = SliceOptions
    summary = "MLPMoE: cut each MLP into B static experts (exact), + Fractal Fade / Compensated Pruning"

    def check(self, source: SourceInfo) -> None:
        b, width = self.options.experts, source.mlp_width
        if b > width:
            raise BadInput(f"slice.experts={b} is larger than the MLP width ({width}); each expert needs at least "
                           f"one neuron. Use at most {width} experts.")
        if self.options.remainder == "error" and width % b:
            raise BadInput(f"slice.experts={b} does not divide the MLP width {width} and slice.remainder is "
                           f"'error'. Use a divisor of {width} or remainder: spread.")
        prune = self.options.prune
        if prune is not None and self._branches_removed(b) >= b:
            raise BadInput(f"slice.prune removes all {b} branches. Lower prune.fraction / prune.branches.")

    def _branches_removed(self, b: int) -> int:
        prune = self.options.prune
        return prune.branches if prune.branches is not None else round(prune.fraction * b)

    @property
    def only_rearranges(self) -> bool:
        return self.options.prune is None  # fade only chooses neurons; prune's compensation scales weights

    @property
    def exact(self) -> bool:
        fade = self.options.fade
        return self.options.prune is None and (fade is None or fade.target_removed == 0)

    def plan(self, previous: LayerPlan | None, source: SourceInfo) -> LayerPlan:
        if previous is not None:
            raise BadInput("slice must be the first transform of a recipe: it starts from the dense MLP.")
        b = self.options.experts
        uniform = source.mlp_width % b == 0 and (self.options.fade is None or self.options.fade.target_removed == 0)
        if self.options.prune is not None:
            b -= self._branches_removed(b)
        return LayerPlan(num_experts=b, uniform=uniform, expert_width=source.mlp_width // self.options.experts
                         if uniform else None, scoring="none", top_k=b, combine="unit")

    def apply(self, layer: int, current: DenseMLP | MoeLayer, inputs=None) -> MoeLayer:
        mlp: DenseMLP = current
        widths = branch_widths(mlp.width, self.options.experts)
        starts = [sum(widths[:b]) for b in range(len(widths))]
        branches = [torch.arange(s, s + w) for s, w in zip(starts, widths)]
        stats: dict = {"branches": len(branches)}
        fade = self.options.fade
        if fade is not None and fade.target_removed > 0:
            scores = neuron_scores(mlp, fade.score)
            order = rank_branches(scores, branches)
            keep = fade_keep_counts(widths, order, fade.target_removed, fade.schedule, fade.min_neurons)
            branches = [idx[torch.sort(torch.topk(scores[idx], k).indices).values] for idx, k in zip(branches, keep)]
            stats["fade_keep"] = keep
        scales = torch.ones(len(branches))
        prune = self.options.prune
        if prune is not None:
            b = len(branches)
            order = rank_branches(neuron_scores(mlp, prune.score), branches)
            survivors = sorted(order[: b - self._branches_removed(b)])
            stats["pruned_branches"] = sorted(set(range(b)) - set(survivors))
            ratio = b / len(survivors)
            factor = {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[prune.compensation]
            branches = [branches[i] for i in survivors]
            scales = torch.full((len(branches),), factor)
        kept = torch.cat(branches)
        identity = len(kept) == mlp.width and bool((kept == torch.arange(mlp.width)).all())
        experts = mlp.span(0, mlp.width) if identity else concat_mlps([mlp.neurons(idx) for idx in branches])
        stats["neurons_kept"] = experts.width
        stats["neurons_removed_fraction"] = 1 - experts.width / mlp.width
        return MoeLayer(mlp=experts, widths=[len(idx) for idx in branches], scales=scales, bias=mlp.down_bias,
                        stats=stats)
