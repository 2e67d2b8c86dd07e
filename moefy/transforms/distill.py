"""`distill`: recover a carved / sliced / upcycled MoE by distilling it into its dense source.

Two stages, either or both: layer-local (below), then optionally end-to-end — KL to the dense
model's logits on the calibration samples with the whole written model in memory (moefy.transforms.end_to_end).

Runs after `carve`, `slice` or `upcycle` inside the sequential layer-by-layer pass (moefy.calib), so
each block trains on the inputs it will really see (earlier layers already carved and distilled).
Per MoE layer: the dense MLP of the source (the teacher) gives the target outputs of the cached
calibration inputs; router, experts (gate/up/down and their biases), expert scales, shared expert
and output bias are trained with Adam on the relative MSE (+ optionally 1 − cosine) — only this
layer's parameters exist as trainable tensors, so memory stays bounded by one layer.

Top-k selection is not differentiable; with `relaxation: straight_through` the forward pass uses the
block's exact routing (hard top-k, its combine rule) while the backward pass sees every expert's
weight as k·softmax(logits) — the router learns which experts to pick, not only how to weigh the
picked ones. An optional Switch-style load-balancing term keeps experts used evenly.

The budget (`tokens`, `minutes`) is shared out over the MoE layers still to come, so a fast early
layer leaves time to later ones. Training is seeded per layer; a `tokens` budget is deterministic,
a `minutes` budget that stops a layer early depends on the machine (the steps run are recorded). A
layer whose held-out loss does not improve keeps its weights (no drift on an already-exact block).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moefy.transforms.end_to_end import distill_end_to_end, improved, train_adam
from moefy import distributed
from moefy.errors import BadInput
from moefy.moe.layer import DenseMLP, MoeLayer
from moefy.progress import log
from moefy.plan import LayerPlan, Options, SourceInfo
from moefy.transforms.base import LayerData, Transform

PARTS = ("router", "experts", "scales", "shared")  # + "bias": a new output bias (standard formats have none)


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: int | None = Field(None, gt=0, description="training tokens over all layers (token-passes)")
    minutes: float | None = Field(None, gt=0, description="wall-clock minutes over all layers")

    @model_validator(mode="after")
    def _some_limit(self):
        if self.tokens is None and self.minutes is None:
            raise ValueError("give budget.tokens, budget.minutes or both")
        return self


class EndToEnd(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget: Budget = Field(description="training budget of this stage: {tokens: N, minutes: M}")
    train: Literal["router", "moe", "all"] = Field(
        "moe", description="routers + expert scales, every MoE block's parameters, or the whole model")
    lr: float = Field(2e-3, gt=0, description="Adam step relative to each tensor's RMS")
    checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, one more forward per step")
    holdout_samples: int = Field(8, ge=1, description="calibration samples kept out to measure the KL before/after")
    batch: int = Field(1, ge=1, description="sequences per step; under torchrun, split over the processes")


class DistillOptions(Options):
    budget: Budget | None = Field(None, description="layer-local stage: {tokens: N, minutes: M} over all MoE layers")
    end_to_end: EndToEnd | None = Field(
        None, description="then KL to the dense model's logits on the calibration samples (model in memory)")
    train: list[Literal["router", "experts", "scales", "shared", "bias"]] = Field(
        list(PARTS), description="what is trained (absent parts of a block are skipped; bias adds an output bias)")
    lr: float = Field(1e-3, gt=0, description="Adam step relative to each tensor's RMS (cosine decay per layer)")
    router_lr: float = Field(1e-2, gt=0, description="the router's relative Adam step")
    batch_tokens: int = Field(512, ge=1, description="tokens per step")
    max_tokens: int = Field(32768, ge=64, description="calibration tokens a layer trains on (cycled)")
    holdout_tokens: int = Field(1024, ge=16, description="calibration tokens kept out to measure before/after")
    cosine: float = Field(0.0, ge=0, description="weight of the (1 − cosine similarity) term next to the MSE")
    balance: float = Field(0.0, ge=0, description="weight of the Switch load-balancing term (routed blocks)")
    relaxation: Literal["straight_through", "none"] = Field(
        "straight_through", description="router gradient for the top-k choice: k·softmax in backward, or none")

    @model_validator(mode="after")
    def _some_stage(self):
        if self.budget is None and self.end_to_end is None:
            raise ValueError("give budget (layer-local stage), end_to_end, or both")
        return self


class Distill(Transform):
    name = "distill"
    Options = DistillOptions
    summary = "recover an MoE against its dense source: layer-local training, then optional end-to-end KL"

    @property
    def needs_calibration(self) -> bool:
        return True

    def min_calibration_tokens(self, source: SourceInfo) -> int:
        return self.options.holdout_tokens + self.options.batch_tokens

    def min_calibration_samples(self) -> int:
        e = self.options.end_to_end
        return 0 if e is None else e.holdout_samples + e.batch  # held-out samples + one batch to train on

    def finalize(self, out_dir, source, calibration, dtype: str, shard_size: str) -> dict | None:
        e = self.options.end_to_end
        if e is None:
            return None
        return distill_end_to_end(out_dir, source, calibration.tokens, e, self.seed, dtype, shard_size,
                                  calibration.device)

    def plan(self, previous: LayerPlan | None, source: SourceInfo) -> LayerPlan:
        if previous is None:
            raise BadInput("distill trains an MoE against its dense source: put it after carve, slice or upcycle "
                           "in the recipe.")
        trainable = set(self.options.train) & {"experts", "scales", "bias"}
        if previous.scoring != "none":
            trainable |= set(self.options.train) & {"router"}
        if previous.shared:
            trainable |= set(self.options.train) & {"shared"}
        if not trainable:
            raise BadInput(f"distill.train={self.options.train} leaves nothing to train in this MoE "
                           f"({'static, no router' if previous.scoring == 'none' else 'routed'}"
                           f"{', no shared expert' if not previous.shared else ''}). Add experts or scales.")
        e, ranks = self.options.end_to_end, distributed.world_size()
        if e is not None and e.batch % ranks:  # checked before any work: the split happens at the end
            raise BadInput(f"distill.end_to_end.batch is {e.batch}, which {ranks} processes (torchrun) cannot "
                           f"share: set it to a multiple of {ranks}, e.g. --set "
                           f"transforms.N.distill.end_to_end.batch={ranks} (N: distill's place in the recipe).")
        if "bias" in self.options.train and not previous.bias:  # a trained output bias is a new tensor
            return dataclasses.replace(previous, bias=True)
        return previous

    def setup(self, source: SourceInfo, previous: LayerPlan | None) -> None:
        self._layers_left = source.adapter.num_layers(source.config) - len(previous.dense_layers)
        self._spent_tokens, self._spent_seconds = 0, 0.0

    def apply(self, layer: int, current: DenseMLP | MoeLayer, data: LayerData | None = None):
        if data is None:
            raise BadInput("distill needs calibration data: pass --calib FILE or set calibration.dataset.")
        if isinstance(current, DenseMLP) or self.options.budget is None:
            return current  # a layer the previous transform left dense, or no layer-local stage
        o = self.options
        gen = self.layer_generator(layer)
        order = torch.randperm(data.inputs.shape[0], generator=gen)
        # clones: the runner's inputs are inference-mode tensors, which autograd cannot save
        holdout = data.inputs[order[: o.holdout_tokens]].float().clone()
        train_x = data.inputs[order[o.holdout_tokens: o.holdout_tokens + o.max_tokens]].float().clone()
        with torch.no_grad():
            train_y, holdout_y = data.teacher.forward(train_x), data.teacher.forward(holdout)
        tokens, seconds = self._layer_budget()
        steps = max(1, tokens // o.batch_tokens) if tokens is not None else None
        block = _Trainable(current, o.train, o.relaxation)
        with torch.no_grad():
            before = _loss(block.forward(holdout)[0], holdout_y, o.cosine).item()

        def step_loss(step: int) -> torch.Tensor:
            rows = torch.randint(0, train_x.shape[0], (o.batch_tokens,), generator=gen)
            y, balance = block.forward(train_x[rows])
            return _loss(y, train_y[rows], o.cosine) + o.balance * balance

        # Adam steps relative to each tensor's scale: a router scaled to a small temperature has tiny weights
        done, losses, elapsed = train_adam([(block.router_params, o.router_lr), (block.other_params, o.lr)],
                                           step_loss, steps, seconds)
        with torch.no_grad():
            after = _loss(block.forward(holdout)[0], holdout_y, o.cosine).item()
        kept = improved(before, after)
        result = block.export() if kept else current
        self._spent_tokens += done * o.batch_tokens
        self._spent_seconds += elapsed
        self._layers_left -= 1
        result.stats = {**current.stats, "distill": {
            "holdout_loss_before": round(before, 6), "holdout_loss_after": round(after, 6), "kept": kept,
            "steps": done, "tokens": done * o.batch_tokens, "seconds": round(elapsed, 2),
            "train_loss_first_last": [round(losses[0], 6), round(losses[-1], 6)] if losses else None}}
        log(f"distill layer {layer}: held-out loss {before:.4f} → {after:.4f}{'' if kept else ' (kept the original)'} "
            f"in {done} steps, {elapsed:.1f}s")
        return result

    def _layer_budget(self) -> tuple[int | None, float | None]:
        """This layer's share of what is left of the budget."""
        b, left = self.options.budget, max(1, self._layers_left)
        tokens = None if b.tokens is None else max(self.options.batch_tokens, (b.tokens - self._spent_tokens) // left)
        seconds = None if b.minutes is None else max(0.0, (60 * b.minutes - self._spent_seconds) / left)
        return tokens, seconds


def _loss(y: torch.Tensor, target: torch.Tensor, cosine: float) -> torch.Tensor:
    """‖y − t‖² / ‖t‖² (+ cosine · mean(1 − cos(y, t)))."""
    loss = (y - target).pow(2).sum() / target.pow(2).sum().clamp(min=1e-12)
    if cosine:
        loss = loss + cosine * (1 - F.cosine_similarity(y, target, dim=-1)).mean()
    return loss


class _Trainable:
    """One MoeLayer whose tensors are fp32 leaves: those of the parts named in `train` require grad."""

    def __init__(self, moe: MoeLayer, train: list[str], relaxation: str):
        self.relaxation = relaxation
        if "bias" in train and moe.bias is None:  # a new output bias, starting at zero
            moe = dataclasses.replace(moe, bias=torch.zeros(moe.mlp.down.shape[0]))
        self.params: dict[str, list[torch.Tensor]] = {part: [] for part in (*PARTS, "bias")}

        def leaf(t: torch.Tensor, part: str) -> torch.Tensor:
            t = t.detach().float().clone().requires_grad_(part in train)
            if part in train:
                self.params[part].append(t)
            return t

        self.layer = _map_tensors(moe, leaf)

    @property
    def router_params(self) -> list[torch.Tensor]:
        return self.params["router"]

    @property
    def other_params(self) -> list[torch.Tensor]:
        return [t for part, ts in self.params.items() if part != "router" for t in ts]

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert weights [T, E] as the block routes (hard top-k, its combine rule, scales), with the
        straight-through gradient; and the Switch balance term."""
        layer = self.layer
        if layer.scoring == "none":
            return layer.route(x), x.new_zeros(())
        logits = layer.logits(x)
        weights, experts = layer.combine_weights(logits)
        probs = logits.softmax(-1) if layer.scoring == "softmax" else logits.sigmoid()
        if self.relaxation == "straight_through":
            soft = layer.top_k * (probs / probs.sum(-1, keepdim=True))
            weights = weights + (soft - soft.detach()) * layer.scales
        chosen = torch.zeros_like(probs).scatter(1, experts, 1.0)
        balance = layer.num_experts * (chosen.mean(0) / layer.top_k * probs.mean(0)).sum()
        return weights, balance

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block output [T, H], balance term)."""
        weights, balance = self._weights(x)
        return self.layer.forward(x, weights), balance

    def export(self) -> MoeLayer:
        """The trained block as an MoeLayer (detached fp32 tensors)."""
        return _map_tensors(self.layer, lambda t, part: t.detach().clone())


def _map_tensors(moe: MoeLayer, fn) -> MoeLayer:
    """A copy of `moe` with fn(tensor, part) applied to each tensor; part is one of router, experts,
    scales, shared, bias."""
    def mlp(m: DenseMLP | None, part: str) -> DenseMLP | None:
        if m is None:
            return None
        names = ("gate", "up", "down", "gate_bias", "up_bias")
        return dataclasses.replace(m, **{k: fn(getattr(m, k), part) for k in names if getattr(m, k) is not None})

    return dataclasses.replace(
        moe, mlp=mlp(moe.mlp, "experts"), shared=mlp(moe.shared, "shared"), scales=fn(moe.scales, "scales"),
        router=None if moe.router is None else fn(moe.router, "router"),
        router_mlp=None if moe.router_mlp is None else tuple(fn(t, "router") for t in moe.router_mlp),
        bias=None if moe.bias is None else fn(moe.bias, "bias"), stats=dict(moe.stats))
