"""`carve`: activation-clustering carving (CMoE / MoEfication style), training-free.

Per layer, on the MLP inputs of the calibration tokens (moefy.calib.layerwise):
1. intermediate activations h = act(gate x) ⊙ (up x) and a per-neuron feature profile over tokens:
   CMoE's binary top-k markers, |h|, or |h|·‖down column‖ ("contribution");
2. shared experts = the neurons with the highest activation rate / mean contribution;
3. routed experts = balanced k-means of the remaining profiles (scikit-learn k-means, then an exact
   balanced assignment of neurons to centroids with scipy's linear_sum_assignment);
4. a linear router: CMoE's representative neuron (gate row of the neuron nearest each centroid),
   class centroids of the inputs, or a ridge least-squares fit of the true expert output norms;
5. optional compensation: least-squares refit of the down projection under the routing mask, and an
   output bias for what the dropped experts contribute on average.

Combine weights: `unit` (native only) or `renormalize` with the router logits scaled down so the
renormalised top-k weights sit near 1/k and k is folded into the expert scales — the same ranking,
and exact in Mixtral / Qwen2-MoE.  See docs/CARVE.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moefy.transforms.compensation import CompensationOptions, compensate
from moefy.transforms.routers import (centroid_router, expert_activation_mass, expert_output_norms, ridge_router,
                                 routing_diagnostics, scale_to_temperature, top_k_mask)
from moefy.errors import BadInput
from moefy.moe.layer import DenseMLP, MoeLayer, activations
from moefy.plan import LayerPlan, Options, SourceInfo
from moefy.transforms.base import LayerData, Preview, Transform


class CarveOptions(Options):
    experts: int = Field(16, ge=2, description="experts per layer, shared ones included (equal widths)")
    shared: int = Field(0, ge=0, description="always-active shared experts (merged into one shared MLP)")
    top_k: int = Field(4, ge=1, description="routed experts active per token")
    router: Literal["representative", "centroid", "fitted"] = Field(
        "fitted", description="representative neuron (CMoE), input centroids, or ridge fit of expert output norms")
    features: Literal["markers", "abs", "contribution"] = Field(
        "contribution", description="neuron profile clustered: top-k markers (CMoE), |h|, or |h|·‖down_i‖")
    marker_fraction: float = Field(0.1, gt=0, le=1, description="share of neurons marked per token (markers)")
    combine: Literal["unit", "renormalize"] = Field(
        "renormalize", description="unit weights (native), or renormalised softmax at router_temperature")
    router_temperature: float = Field(
        0.01, gt=0, description="std of the logits after scaling (renormalize): small → weights ≈ 1/k")
    compensation: CompensationOptions = CompensationOptions()
    dense_layers: list[int] = Field(default_factory=list, description="layers left dense (e.g. [0] or [-1])")
    max_tokens: int = Field(8192, ge=16, description="calibration tokens used for router fits and compensation")
    cluster_tokens: int = Field(2048, ge=16, description="tokens in each neuron's profile for clustering")
    kmeans_init: int = Field(3, ge=1, description="k-means restarts")
    budget: Literal["uniform", "adaptive"] = Field(
        "uniform", description="top_k in every layer, or per layer at the same mean (native; see docs/CARVE.md)")
    budget_samples: int = Field(8, ge=1, description="calibration samples of the dense preview pass (adaptive)")


class Carve(Transform):
    name = "carve"
    Options = CarveOptions
    summary = "activation-clustering carving: shared + balanced-clustered routed experts, training-free router"

    @property
    def needs_calibration(self) -> bool:
        return True

    def check(self, source: SourceInfo) -> None:
        o, width = self.options, source.mlp_width
        if o.shared >= o.experts:
            raise BadInput(f"carve.shared={o.shared} must be smaller than carve.experts={o.experts}: at least one "
                           f"expert has to be routed.")
        if o.top_k > o.experts - o.shared:
            raise BadInput(f"carve.top_k={o.top_k} exceeds the {o.experts - o.shared} routed experts "
                           f"(experts {o.experts} − shared {o.shared}). Lower top_k or raise experts.")
        if width % o.experts:
            divisors = [d for d in range(2, min(width, 512) + 1) if width % d == 0]
            raise BadInput(f"carve.experts={o.experts} does not divide the MLP width {width}; experts have equal "
                           f"widths. Divisors of {width}: {', '.join(map(str, divisors[:24]))}.")
        layers = source.adapter.num_layers(source.config)
        bad = [i for i in o.dense_layers if not -layers <= i < layers]
        if bad:
            raise BadInput(f"carve.dense_layers has {bad[0]}, outside the model's {layers} layers.")

    def setup(self, source: SourceInfo, previous: LayerPlan | None) -> None:
        self._num_layers = source.adapter.num_layers(source.config)
        self._loss_curves: dict[int, list[float]] = {}  # adaptive budget: filled by preview()
        self._allocation: dict[int, int] | None = None

    def plan(self, previous: LayerPlan | None, source: SourceInfo) -> LayerPlan:
        if previous is not None:
            raise BadInput("carve must be the first transform of a recipe: it starts from the dense MLP.")
        o = self.options
        layers = source.adapter.num_layers(source.config)
        return LayerPlan(num_experts=o.experts - o.shared, expert_width=source.mlp_width // o.experts,
                         scoring="softmax", top_k=o.top_k, combine=o.combine, shared=o.shared > 0,
                         bias=o.compensation.bias, same_top_k=o.budget == "uniform", dense_layers=self._dense(layers))

    def preview_request(self) -> Preview | None:
        return Preview(samples=self.options.budget_samples) if self.options.budget == "adaptive" else None

    def preview(self, layer: int, mlp: DenseMLP, inputs: list[torch.Tensor]) -> None:
        """Adaptive budget, step 1: how much of each token's MLP output mass a layer loses when it keeps
        its best (S + k)·I/E neurons, for every k (sum-of-squares proxy of the contributions)."""
        o = self.options
        if layer in self._dense(self._num_layers):
            return
        h = activations(mlp, torch.cat(inputs)[: o.cluster_tokens])
        mass = contributions(h, mlp).pow(2).sort(dim=1, descending=True).values
        kept = mass.cumsum(1) / mass.sum(1, keepdim=True).clamp(min=1e-30)
        width = mlp.width // o.experts
        counts = [(o.shared + k) * width for k in range(0, o.experts - o.shared + 1)]
        self._loss_curves[layer] = [float(1 - kept[:, n - 1].mean()) if n else 1.0 for n in counts]

    def _layer_top_k(self, layer: int) -> int:
        """Uniform top_k, or step 2 of the adaptive budget: greedy allocation of the model's L·top_k
        routed slots, each to the layer whose proxy loss it lowers most (at least 1 per layer)."""
        if self.options.budget == "uniform":
            return self.options.top_k
        if self._allocation is None:
            curves = self._loss_curves
            alloc = {i: 1 for i in curves}
            for _ in range(len(curves) * (self.options.top_k - 1)):
                gains = {i: c[alloc[i]] - c[alloc[i] + 1] for i, c in curves.items() if alloc[i] + 1 < len(c)}
                best = max(gains, key=lambda i: (gains[i], -i))
                alloc[best] += 1
            self._allocation = alloc
        return self._allocation[layer]

    def _dense(self, layers: int) -> tuple[int, ...]:
        return tuple(sorted({i % layers for i in self.options.dense_layers}))

    def apply(self, layer: int, current: DenseMLP | MoeLayer, data: LayerData | None = None):
        """Carve one dense MLP from its calibration inputs (steps 1–5 of the module docstring)."""
        if data is None:
            raise BadInput("carve needs calibration data: pass --calib FILE or set calibration.dataset.")
        o = self.options
        mlp: DenseMLP = current
        inputs = data.inputs
        width = mlp.width // o.experts
        if layer in self._dense(self._num_layers):
            return mlp
        sample = self.sample_tokens(layer, inputs, o.max_tokens)
        h = activations(mlp, sample)
        contribution = contributions(h, mlp)
        features = self._features(h, contribution)
        order = torch.argsort(self._shared_score(contribution, features), descending=True)
        shared_idx = torch.sort(order[: o.shared * width]).values
        routed_idx = torch.sort(order[o.shared * width:]).values
        profiles = features[: o.cluster_tokens, routed_idx].T
        groups, reps = balanced_clusters(profiles, o.experts - o.shared, width, o.kmeans_init, self.seed)
        groups = [routed_idx[g] for g in groups]
        experts = torch.cat(groups)
        top_k = self._layer_top_k(layer)
        moe = MoeLayer(mlp=mlp.neurons(experts), widths=[width] * len(groups), scoring="softmax", top_k=top_k,
                       combine="unit", shared=mlp.neurons(shared_idx) if o.shared else None, bias=mlp.down_bias)
        h_routed = h[:, experts]
        oracle = expert_output_norms(h_routed, moe.mlp.down.float(), moe.widths)
        if top_k == len(groups):  # every expert on every token: a zero router makes it exact in any format
            moe.router = torch.zeros(len(groups), mlp.up.shape[1])
        else:
            moe.router = self._router(sample, oracle, mlp, routed_idx[reps], top_k)
        if o.combine == "renormalize":
            scale_to_temperature(moe, sample, o.router_temperature)
            moe.scales = torch.full((moe.num_experts,), float(top_k))
        stats = routing_diagnostics(moe, sample, oracle, expert_activation_mass(h_routed, moe.widths))
        dense_out = h @ mlp.down.float().T
        stats.update(compensate(moe, sample, h_routed, h[:, shared_idx] if o.shared else None, dense_out,
                                o.compensation))
        stats["calibration_tokens"] = int(sample.shape[0])
        moe.stats = stats
        return moe

    def _features(self, h: torch.Tensor, contribution: torch.Tensor) -> torch.Tensor:
        """[T, I] profile of each neuron over the calibration tokens."""
        o = self.options
        if o.features == "markers":
            k = max(1, round(o.marker_fraction * h.shape[1]))
            return top_k_mask(h.abs(), k).to(h.dtype)
        magnitude = contribution if o.features == "contribution" else h.abs()
        return magnitude / magnitude.norm(dim=0).clamp(min=1e-12)

    def _shared_score(self, contribution: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.options.features == "markers":
            return features.mean(0)  # activation rate, as in CMoE
        return contribution.mean(0)

    def _router(self, x, oracle, mlp: DenseMLP, representatives, top_k: int) -> torch.Tensor:
        router = self.options.router
        if router == "representative":
            rows = mlp.gate if mlp.gated else mlp.up
            return rows[representatives].float()
        if router == "centroid":
            return centroid_router(x, oracle, top_k)
        return ridge_router(x, oracle)


def contributions(h: torch.Tensor, mlp: DenseMLP) -> torch.Tensor:
    """|h_i|·‖down_:,i‖ per token and neuron [T, I]: how much each neuron adds to the output's norm."""
    return h.abs() * mlp.down.float().norm(dim=0)


def balanced_clusters(profiles: torch.Tensor, clusters: int, size: int, n_init: int, seed: int):
    """Split N = clusters·size profiles [N, D] into equal groups: k-means centroids, then the balanced
    assignment minimising total squared distance (each centroid gets `size` slots). Returns the
    groups (index tensors) and each group's representative (the member nearest its centroid)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    data = profiles.float().numpy()
    km = KMeans(n_clusters=clusters, n_init=n_init, random_state=seed).fit(data)
    data, centers = data.astype(np.float64), km.cluster_centers_.astype(np.float64)
    dist = (data ** 2).sum(1)[:, None] - 2 * data @ centers.T + (centers ** 2).sum(1)[None]
    rows, cols = linear_sum_assignment(np.repeat(dist, size, axis=1))
    label = cols[np.argsort(rows)] // size
    groups, reps = [], []
    for c in range(clusters):
        members = np.flatnonzero(label == c)
        groups.append(torch.from_numpy(members))
        reps.append(int(members[np.argmin(dist[members, c])]))
    return groups, torch.tensor(reps)

