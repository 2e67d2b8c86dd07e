"""`fit_router`: fit each MoE layer's router to oracle expert labels on calibration activations.

Runs after `carve`, `slice` or `upcycle`, inside the sequential layer-by-layer pass (moefy.calib):
for each layer, the MLP inputs x of the calibration tokens, the oracle score of every expert per
token (‖expert_e(x)‖, the norm of what it actually adds, or Σ|h| over its neurons), and a fit:

* `least-squares` — closed-form ridge regression of the scores (or log-scores) on x: a linear router;
* `logistic` — one-vs-rest logistic regression (scikit-learn) of "e is in the token's oracle top-k";
* `mlp` — the linear router plus a small residual MLP (silu, `hidden` wide) trained with Adam on the
  cached activations only (no LM backprop), warm-started from the existing router; native format only.

The fit is then put in the target format's gate semantics: a block with renormalised softmax weights
gets its logits scaled (by a power of two) to a small `temperature`, so the top-k weights sit near
1/k and the k folded into the expert scales makes them ≈ 1 — the ranking is what was fitted, and
Mixtral / Qwen2-MoE hold it exactly.  A static `slice` block becomes a routed one (`top_k` required).
Optional compensation (down-projection refit, output bias) against the source's dense MLP follows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import torch
from pydantic import Field

from moefy.transforms.compensation import CompensationOptions, compensate, compensation_tokens
from moefy.transforms.routers import (expert_activation_mass, expert_output_norms, ridge_router, routing_diagnostics,
                                 scale_to_temperature, top_k_mask)
from moefy.errors import BadInput
from moefy.moe.layer import DenseMLP, MoeLayer, activations
from moefy.progress import log
from moefy.plan import LayerPlan, Options, SourceInfo
from moefy.transforms.base import LayerData, Transform


class FitRouterOptions(Options):
    method: Literal["least-squares", "logistic", "mlp"] = Field("least-squares", description="how the router is fitted")
    labels: Literal["output_norm", "activation_sum"] = Field(
        "output_norm", description="oracle expert scores: ‖expert_e(x)‖, or Σ|h| over the expert's neurons")
    target: Literal["scores", "log_scores"] = Field("scores", description="least-squares regression target")
    top_k: int | None = Field(None, ge=1, description="experts per token; required after a static slice")
    temperature: float | None = Field(
        0.01, gt=0, description="renormalised blocks: std of the logits after fitting (null: keep the fitted scale)")
    max_tokens: int = Field(16384, ge=16, description="calibration tokens used per layer")
    ridge: float = Field(1e-2, gt=0, description="least-squares ridge, relative to the mean diagonal of xᵀx")
    C: float = Field(1.0, gt=0, description="logistic: inverse L2 strength")
    max_iter: int = Field(100, ge=1, description="logistic: lbfgs iterations per expert")
    hidden: int = Field(64, ge=1, description="mlp: width of the residual MLP router")
    steps: int = Field(300, ge=1, description="mlp: Adam steps")
    lr: float = Field(3e-3, gt=0, description="mlp: Adam learning rate")
    compensation: CompensationOptions = CompensationOptions()


class FitRouter(Transform):
    name = "fit_router"
    Options = FitRouterOptions
    summary = "fit routers on calibration activations against oracle expert labels (least squares, logistic, MLP)"

    @property
    def needs_calibration(self) -> bool:
        return True

    def min_calibration_tokens(self, source: SourceInfo) -> int:
        return 4 * source.hidden_size

    def plan(self, previous: LayerPlan | None, source: SourceInfo) -> LayerPlan:
        o = self.options
        if previous is None:
            raise BadInput("fit_router needs an MoE to route: put it after carve, slice or upcycle in the recipe.")
        if previous.scoring == "none":
            if o.top_k is None:
                raise BadInput("fit_router after a static slice needs fit_router.top_k (experts active per token).")
            if o.top_k > previous.num_experts:
                raise BadInput(f"fit_router.top_k={o.top_k} exceeds the {previous.num_experts} experts.")
            combine = "unit" if o.temperature is None else "renormalize"
            previous = dataclasses.replace(previous, scoring="softmax", top_k=o.top_k, combine=combine)
        elif o.top_k not in (None, previous.top_k):
            raise BadInput(f"fit_router.top_k={o.top_k} differs from the {previous.top_k} experts per token the "
                           f"previous transform routes; leave it out (it is for static slices).")
        return dataclasses.replace(previous, router_hidden=o.hidden if o.method == "mlp" else 0,
                                   bias=previous.bias or o.compensation.bias)

    def apply(self, layer: int, current: DenseMLP | MoeLayer, data: LayerData | None = None):
        if data is None:
            raise BadInput("fit_router needs calibration data: pass --calib FILE or set calibration.dataset.")
        if isinstance(current, DenseMLP):
            return current  # a layer the previous transform left dense
        o = self.options
        started = time.perf_counter()
        moe = dataclasses.replace(current, stats=dict(current.stats))
        x = self.sample_tokens(layer, data.inputs, o.max_tokens).float()
        if moe.scoring == "none":
            self._route_static(moe, x)
        h = activations(moe.mlp, x)
        neuron_scales = torch.repeat_interleave(moe.scales.float(), torch.tensor(moe.widths))
        oracle = expert_output_norms(h, moe.mlp.down.float() * neuron_scales, moe.widths)
        mass = expert_activation_mass(h, moe.widths)
        labels = oracle if o.labels == "output_norm" else mass
        before = routing_diagnostics(moe, x, oracle, mass)
        moe.router, moe.router_mlp, fit_stats = self._fit(x, labels, moe)
        if o.temperature is not None and moe.combine != "unit":
            scale_to_temperature(moe, x, o.temperature)
        stats = routing_diagnostics(moe, x, oracle, mass)
        n = compensation_tokens(o.compensation, x.shape[0])
        shared = activations(moe.shared, x[:n]) if moe.shared is not None else None
        stats.update(compensate(moe, x[:n], h[:n], shared, data.teacher.forward(x[:n]), o.compensation))
        stats.update({"router_recall_before": before["router_recall"], "fit_method": o.method,
                      "fit_tokens": int(x.shape[0]), "fit_seconds": round(time.perf_counter() - started, 3)})
        moe.stats.update({**stats, **fit_stats})
        log(f"fit_router layer {layer}: recall {before['router_recall']:.3f} → {stats['router_recall']:.3f}, "
            f"mass coverage {stats['mass_coverage']:.3f}, load max/mean {stats['expert_load_max_over_mean']:.2f}, "
            f"rel. error {stats['rel_error_final']:.4f}")
        return moe

    def _route_static(self, moe: MoeLayer, x: torch.Tensor) -> None:
        """A static slice becomes routed: softmax top-k, renormalised with k folded into the scales (≈ unit)."""
        o = self.options
        moe.scoring, moe.top_k = "softmax", o.top_k
        moe.combine = "unit" if o.temperature is None else "renormalize"
        if o.temperature is not None:
            moe.scales = moe.scales * o.top_k
        moe.router = torch.zeros(moe.num_experts, x.shape[1])

    def _fit(self, x: torch.Tensor, labels: torch.Tensor, moe: MoeLayer):
        """(linear router [E, H], residual MLP router or None, stats of the fit)."""
        o = self.options
        k = moe.top_k
        if k >= moe.num_experts:
            return torch.zeros(moe.num_experts, x.shape[1]), None, {}
        if o.method == "least-squares":
            target = labels.clamp(min=1e-6).log() if o.target == "log_scores" else labels
            return ridge_router(x, target, o.ridge), None, {}
        member = top_k_mask(labels, k).float()
        if o.method == "logistic":
            router, unconverged = _logistic_router(x, member, o.C, o.max_iter, self.seed)
            return router, None, {"logistic_unconverged": unconverged}  # experts whose fit stopped at max_iter
        start = moe.router if moe.router is not None and moe.router.abs().sum() > 0 else ridge_router(x, labels)
        return (*_train_mlp_router(x, member, start, o.hidden, o.steps, o.lr, self.seed), {})


def _logistic_router(x: torch.Tensor, member: torch.Tensor, c: float, max_iter: int, seed: int):
    """One-vs-rest logistic regression of top-k membership, one expert at a time, no intercept (the
    gate has none); an expert that is always or never in the top-k gets a zero row. Features are
    scaled by their RMS for the solver (no centring: that would need an intercept), undone on the
    weights. Returns (router [E, H], number of fits that hit max_iter)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    scale = x.pow(2).mean(0).sqrt().clamp(min=1e-12)
    data = (x / scale).numpy()
    rows, unconverged = torch.zeros(member.shape[1], x.shape[1]), 0
    for e in range(member.shape[1]):
        y = member[:, e].numpy()
        if 0 < y.sum() < len(y):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                fit = LogisticRegression(C=c, fit_intercept=False, max_iter=max_iter, random_state=seed).fit(data, y)
            unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
            rows[e] = torch.from_numpy(fit.coef_[0]).float() / scale
    return rows, unconverged


def _train_mlp_router(x, member, start, hidden: int, steps: int, lr: float, seed: int):
    """Linear router (warm-started, logits rescaled to unit std) + residual silu MLP (zero-initialised output),
    trained with Adam on binary cross-entropy of top-k membership."""
    gen = torch.Generator().manual_seed(seed)
    x, member = x.clone(), member.clone()  # calibration tensors come from inference mode
    scale = float((x @ start.float().T).std()) or 1.0
    linear = (start.float() / scale).clone().requires_grad_(True)
    w1 = (torch.randn(hidden, x.shape[1], generator=gen) / x.shape[1] ** 0.5 / float(x.pow(2).mean().sqrt()))
    w1.requires_grad_(True)
    w2 = torch.zeros(start.shape[0], hidden, requires_grad=True)
    optimizer = torch.optim.Adam([linear, w1, w2], lr=lr)
    batch = min(4096, x.shape[0])
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
            xb = x[idx]
            logits = xb @ linear.T + torch.nn.functional.silu(xb @ w1.T) @ w2.T
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, member[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return linear.detach(), (w1.detach(), w2.detach())
