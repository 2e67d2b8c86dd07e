"""`upcycle`: sparse upcycling — every expert starts as a copy of the dense MLP (Komatsuzaki et al.).

* Copies: N copies, top-k routing with renormalised softmax weights. The weights of the k chosen
  copies sum to 1, so the block equals the dense MLP at initialisation whatever the router says.
* Fine-grained (`granularity` g, NVIDIA's "virtual groups"): each copy is cut into g slices of I/g
  neurons, E = N·g experts, top_k = k·g.  All g slices of a copy share one router row, so top-(k·g)
  picks whole copies; each slice then gets weight p_c/g (p_c: the copy's renormalised weight), and
  Σ_j slice_j = the whole MLP, so scaling every expert's output by g restores the dense output:
      y = Σ_{c chosen} Σ_j g · (p_c / g) · slice_{c,j}(x) = Σ_c p_c · MLP(x) = MLP(x).
* Shared expert: `copy` — a full copy always on, both halves weighted ½ (exact); `slice` — the
  `shared_fraction` most important neurons (max |down column|) always on, the copies made of the rest.
* Drop-Upcycling (Nakamura et al. 2025): re-initialise a fraction `drop` of each copy's intermediate
  neurons (same indices in gate, up and down) from a normal with the original matrix's mean and std;
  a different, seeded subset per copy. Not an identity (that is the point: it breaks expert symmetry).
* Router init: `random` (seeded normal), `zero` (copies only: with slices, ties would split copies),
  `hidden` (mergekit-style: mean MLP-input hidden state of each copy's positive prompts minus its
  negative prompts, centred across copies, unit rows), `kmeans` (centroids of the calibration tokens'
  MLP inputs, scikit-learn).
* `sources`: copy c's MLPs from another checkpoint of the same architecture (mergekit-moe style);
  attention, embeddings and norms come from the recipe's source.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError

from moefy.transforms.routers import unit_rows
from moefy.errors import BadInput
from moefy.io.checkpoint import open_source
from moefy.io.yaml_file import load_yaml
from moefy.moe.layer import DenseMLP, MoeLayer, concat_mlps
from moefy.plan import LayerPlan, Options, SourceInfo
from moefy.transforms.base import LayerData, Preview, Transform, read_mlp
from moefy.transforms.slice import neuron_scores


class ExpertPrompts(Options):
    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(default_factory=list)


class UpcycleOptions(Options):
    experts: int = Field(8, ge=2, description="routed experts E = copies × granularity")
    top_k: int = Field(2, ge=1, description="routed experts active per token (a multiple of granularity)")
    granularity: int = Field(1, ge=1, description="slices per copy (fine-grained upcycling)")
    router: Literal["random", "zero", "hidden", "kmeans"] = Field("random", description="router initialisation")
    router_std: float = Field(0.02, gt=0, description="std of the random router")
    prompts: str | None = Field(None, description="YAML file, one {positive: [...], negative: [...]} per copy (hidden)")
    drop: float = Field(0.0, ge=0, le=1, description="Drop-Upcycling: fraction of each copy's neurons re-initialised")
    shared: Literal["none", "copy", "slice"] = Field("none", description="an always-on shared expert")
    shared_fraction: float = Field(0.25, gt=0, lt=1, description="neurons in the shared slice (shared: slice)")
    sources: list[str | None] = Field(
        default_factory=list, description="per copy, a same-architecture checkpoint for its MLPs (null: the source)")
    kmeans_tokens: int = Field(8192, ge=16, description="calibration tokens clustered (router: kmeans)")


class Upcycle(Transform):
    name = "upcycle"
    Options = UpcycleOptions
    summary = "sparse upcycling: expert copies (exact at init), fine-grained slices, Drop-Upcycling, router inits"

    @property
    def copies(self) -> int:
        return self.options.experts // self.options.granularity

    @property
    def only_rearranges(self) -> bool:
        return self.options.drop == 0 and self.options.shared != "copy"  # re-drawn neurons, halved copies

    @property
    def exact(self) -> bool:
        return self.options.drop == 0 and not any(self.options.sources)  # identical copies of the source's MLP

    def input_paths(self) -> dict[str, str]:
        named = {f"upcycle.sources.{i}": spec for i, spec in enumerate(self.options.sources) if spec is not None}
        return {**named, **({"upcycle.prompts": self.options.prompts} if self.options.prompts else {})}

    @property
    def needs_calibration(self) -> bool:
        return self.options.router == "kmeans"

    def min_calibration_tokens(self, source: SourceInfo) -> int:
        return self.copies * 4 if self.needs_calibration else 0

    def check(self, source: SourceInfo) -> None:
        o, g = self.options, self.options.granularity
        if o.top_k > o.experts:
            raise BadInput(f"upcycle.top_k={o.top_k} exceeds upcycle.experts={o.experts}.")
        if o.experts % g or o.top_k % g:
            raise BadInput(f"upcycle.experts={o.experts} and top_k={o.top_k} must be multiples of granularity={g}: "
                           f"the {g} slices of a copy are routed together (that keeps the MoE exact at init).")
        if o.router == "zero" and g > 1:
            raise BadInput("upcycle.router=zero needs granularity 1: with all logits tied, top-k would pick slices "
                           "of different copies and the MoE would not equal the dense MLP. Use router: random.")
        if self._routed_width(source.mlp_width) % g:
            raise BadInput(f"upcycle.granularity={g} does not divide the routed MLP width "
                           f"{self._routed_width(source.mlp_width)}. Pick a divisor.")
        if o.prompts and o.router != "hidden":
            raise BadInput(f"upcycle.prompts is only used by router: hidden (router is {o.router}).")

    def setup(self, source: SourceInfo, previous: LayerPlan | None) -> None:
        self._prompts = self._load_prompts() if self.options.router == "hidden" else None
        self._info = source
        self._sources = self._open_sources(source)
        self._hidden_rows: dict[int, torch.Tensor] = {}

    def _routed_width(self, width: int) -> int:
        o = self.options
        if o.shared != "slice":
            return width
        g = o.granularity
        return max(g, round((1 - o.shared_fraction) * width / g) * g)

    def _load_prompts(self) -> list[ExpertPrompts]:
        path = self.options.prompts
        if path is None:
            raise BadInput("upcycle.router=hidden needs upcycle.prompts: a YAML file with one "
                           "{positive: [...], negative: [...]} entry per expert copy.")
        file = Path(path).expanduser()
        if not file.is_file():
            raise BadInput(f"upcycle.prompts file {file} does not exist.")
        entries = load_yaml(file, "upcycle.prompts file")
        try:
            prompts = [ExpertPrompts.model_validate(e) for e in entries] if isinstance(entries, list) else None
        except (ValidationError, TypeError) as exc:
            raise BadInput(f"upcycle.prompts file {file} is not a YAML list of {{positive: [...], negative: [...]}} "
                           f"entries ({str(exc).splitlines()[0]}).") from None
        if prompts is None or len(prompts) != self.copies:
            raise BadInput(f"upcycle.prompts file {file} must list one entry per expert copy: {self.copies} "
                           f"(experts {self.options.experts} / granularity {self.options.granularity}).")
        if any(not text.strip() for p in prompts for text in p.positive + p.negative):
            raise BadInput(f"upcycle.prompts file {file} has an empty prompt.")
        return prompts

    def _open_sources(self, source: SourceInfo) -> list:
        """The checkpoint each copy's MLPs come from (None: the recipe's source), checked for shape."""
        specs = self.options.sources
        if not specs:
            return [None] * self.copies
        if len(specs) != self.copies:
            raise BadInput(f"upcycle.sources lists {len(specs)} checkpoints; give one per copy ({self.copies}), "
                           f"null for the recipe's source.")
        opened = []
        for spec in specs:
            if spec is None:
                opened.append(None)
                continue
            ckpt = open_source(spec)
            ckpt.add_prefix(source.adapter.base_prefix)
            adapter = source.adapter
            keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", adapter.activation_key)
            diff = [k for k in keys if adapter.setting(ckpt.config, k) != adapter.setting(source.config, k)]
            if diff:
                raise BadInput(f"upcycle.sources: {spec} differs from the source in {', '.join(diff)}; experts can "
                               f"only come from checkpoints of the same architecture and shape.")
            opened.append(ckpt)
        return opened

    def plan(self, previous: LayerPlan | None, source: SourceInfo) -> LayerPlan:
        if previous is not None:
            raise BadInput("upcycle must be the first transform of a recipe: it starts from the dense MLP.")
        o = self.options
        return LayerPlan(num_experts=o.experts, expert_width=self._routed_width(source.mlp_width) // o.granularity,
                         scoring="softmax", top_k=o.top_k, combine="renormalize", shared=o.shared != "none")

    def preview_request(self) -> Preview | None:
        if self._prompts is None:
            return None
        texts = dict.fromkeys(t for p in self._prompts for t in p.positive + p.negative)
        self._texts = list(texts)
        return Preview(texts=tuple(self._texts))

    def preview(self, layer: int, mlp: DenseMLP, inputs: list[torch.Tensor]) -> None:
        """router: hidden — one row per copy from the mean MLP input of its prompts (each prompt averaged first)."""
        means = {t: x.float().mean(0) for t, x in zip(self._texts, inputs)}
        rows = []
        for p in self._prompts:
            row = torch.stack([means[t] for t in p.positive]).mean(0)
            if p.negative:
                row = row - torch.stack([means[t] for t in p.negative]).mean(0)
            rows.append(row)
        rows = torch.stack(rows)
        self._hidden_rows[layer] = unit_rows(rows - rows.mean(0))

    def apply(self, layer: int, current: DenseMLP | MoeLayer, data: LayerData | None = None) -> MoeLayer:
        o, g = self.options, self.options.granularity
        mlp: DenseMLP = current
        shared, routed = self._split_shared(mlp)
        copies = []
        for c, ckpt in enumerate(self._sources):
            copy = routed if ckpt is None else self._split_shared(read_mlp(ckpt, self._info, layer))[1]
            copies.append(self._drop(copy, layer, c) if o.drop > 0 else copy)
        scale = float(g) * (0.5 if o.shared == "copy" else 1.0)
        rows = self._router_rows(layer, mlp.up.shape[1], data)
        moe = MoeLayer(mlp=concat_mlps(copies), widths=[routed.width // g] * o.experts, scoring="softmax",
                       top_k=o.top_k, combine="renormalize", scales=torch.full((o.experts,), scale),
                       router=rows.repeat_interleave(g, dim=0), shared=shared, bias=mlp.down_bias)
        moe.stats = {"copies": self.copies, "granularity": g, "router_init": o.router,
                     "dropped_neurons_per_copy": round(o.drop * routed.width),
                     "exact_at_init": self.exact}
        return moe

    def _split_shared(self, mlp: DenseMLP) -> tuple[DenseMLP | None, DenseMLP]:
        """(shared expert or None, the part every copy is made of)."""
        shared = self.options.shared
        if shared == "none":
            return None, mlp
        if shared == "copy":
            whole = mlp.span(0, mlp.width)
            return dataclasses.replace(whole, down=whole.down * 0.5), mlp
        order = torch.argsort(neuron_scores(mlp, "down_max"), descending=True)
        cut = mlp.width - self._routed_width(mlp.width)
        return mlp.neurons(torch.sort(order[:cut]).values), mlp.neurons(torch.sort(order[cut:]).values)

    def _drop(self, mlp: DenseMLP, layer: int, copy: int) -> DenseMLP:
        """Drop-Upcycling: re-draw a seeded subset of neurons from N(mean, std) of each original matrix (and
        input-bias vector)."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + layer) * 1009 + copy)
        index = torch.randperm(mlp.width, generator=gen)[: round(self.options.drop * mlp.width)]

        def redraw(weight: torch.Tensor | None, dim: int) -> torch.Tensor | None:
            if weight is None:
                return None
            weight = weight.clone()
            shape = (len(index), *weight.shape[1:]) if dim == 0 else (weight.shape[0], len(index))
            fresh = torch.randn(shape, generator=gen) * weight.float().std() + weight.float().mean()
            if dim == 0:
                weight[index] = fresh.to(weight.dtype)
            else:
                weight[:, index] = fresh.to(weight.dtype)
            return weight

        return dataclasses.replace(mlp, gate=redraw(mlp.gate, 0), up=redraw(mlp.up, 0), down=redraw(mlp.down, 1),
                                   gate_bias=redraw(mlp.gate_bias, 0), up_bias=redraw(mlp.up_bias, 0))

    def _router_rows(self, layer: int, hidden: int, data: LayerData | None) -> torch.Tensor:
        """One router row per copy [N, H]."""
        o = self.options
        if o.router == "zero":
            return torch.zeros(self.copies, hidden)
        if o.router == "random":
            return torch.randn(self.copies, hidden, generator=self.layer_generator(layer)) * o.router_std
        if o.router == "hidden":
            return self._hidden_rows[layer]
        if data is None:
            raise BadInput("upcycle.router=kmeans needs calibration data: pass --calib FILE or set "
                           "calibration.dataset.")
        return self._kmeans_rows(layer, data.inputs)

    def _kmeans_rows(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        from sklearn.cluster import KMeans

        sample = self.sample_tokens(layer, x, self.options.kmeans_tokens).float()
        km = KMeans(n_clusters=self.copies, n_init=3, random_state=self.seed).fit(sample.numpy())
        centers = torch.from_numpy(km.cluster_centers_).float()
        return unit_rows(centers - sample.mean(0))
