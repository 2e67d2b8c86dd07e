"""Transform plugins: validated options, a weight-free plan, and a per-layer apply.

Lifecycle (llm-compressor style): `check(source)` validates options against the architecture
before anything is written; `plan(prev)` says what the layers will look like so the export
format can be chosen up front; an optional dense `preview` pass sees every layer before any is
rewritten; `apply(layer, block, data)` rewrites one layer at a time, in layer order, so memory stays
bounded by one layer (+ the calibration activations when a transform needs them: see moefy.calib);
an optional `finalize` sees the whole written model (end-to-end distillation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moefy.errors import CheckFailed
from moefy.moe.layer import DenseMLP, MoeLayer
from moefy.plan import LayerPlan, Options, SourceInfo


@dataclass(frozen=True)
class LayerData:
    """What a calibrating transform sees of one layer."""

    inputs: torch.Tensor  # [T, H] the layer's MLP inputs on the calibration tokens (earlier layers already rewritten)
    teacher: DenseMLP  # the source's dense MLP of this layer


@dataclass(frozen=True)
class Preview:
    """A dense pass over every layer before any is rewritten: `samples` calibration samples, or `texts`
    (one sequence each)."""

    samples: int = 0
    texts: tuple[str, ...] = ()


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

    @property
    def needs_calibration(self) -> bool:
        """apply() then receives each layer's LayerData."""
        return False

    @property
    def only_rearranges(self) -> bool:
        """apply() only cuts, copies and concatenates weights (no arithmetic on them), so it may run on the
        stored dtype: a bf16 checkpoint then never pays for fp32 copies (tested byte-identical)."""
        return False

    @property
    def exact(self) -> bool:
        """The transform keeps the model's function in exact arithmetic (an identity regrouping, copies at init):
        `convert` then requires the written model's fp32 logits to match the source's."""
        return False

    def input_paths(self) -> dict[str, str]:
        """Files and checkpoints the options name (option → path): inputs a run never writes over."""
        return {}

    def layer_generator(self, layer: int) -> torch.Generator:
        """Randomness for one layer: seeded by --seed and the layer, so a run is reproducible."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + layer)

    def sample_tokens(self, layer: int, inputs: torch.Tensor, limit: int) -> torch.Tensor:
        """Up to `limit` of a layer's calibration tokens [T, H], in a seeded random order."""
        return inputs[torch.randperm(inputs.shape[0], generator=self.layer_generator(layer))[:limit]]

    def min_calibration_tokens(self, source: SourceInfo) -> int:
        """Fewest calibration tokens this transform can work with (checked before any work)."""
        return 1 if self.needs_calibration else 0

    def min_calibration_samples(self) -> int:
        """Fewest calibration samples (sequences) this transform can work with."""
        return 0

    def preview_request(self) -> Preview | None:
        """Ask for a dense preview pass (model-wide decisions, e.g. budgets, prompt hidden states)."""
        return None

    def preview(self, layer: int, mlp: DenseMLP, inputs: list[torch.Tensor]) -> None:
        """One layer of the preview pass: the dense MLP and its inputs, [T_b, H] per batch (one text per
        batch when the request gave texts)."""

    def apply(self, layer: int, current: DenseMLP | MoeLayer, data: LayerData | None = None) -> DenseMLP | MoeLayer:
        """Rewrite one layer; `data` is given when the pipeline calibrates, else None."""
        raise NotImplementedError

    def finalize(self, out_dir, source, calibration, dtype: str, shard_size: str) -> dict | None:
        """A model-wide pass once every layer is written to `out_dir` (in place, before it is renamed to OUT):
        e.g. end-to-end training. Returns what to record in moefy.json (None: nothing done)."""
        return None


def read_mlp(ckpt, info: SourceInfo, layer: int) -> DenseMLP:
    """Layer `layer`'s dense MLP from a checkpoint, in fp32, refusing NaN/Inf weights."""
    names = info.adapter.mlp_weight_names(layer, info.config)
    return mlp_from_tensors(info, {role: checked(name, ckpt.get(name), ckpt.path) for role, name in names.items()})


def mlp_from_tensors(info: SourceInfo, tensors: dict[str, torch.Tensor], upcast: bool = True) -> DenseMLP:
    """A dense MLP from its weights by role (`mlp_weight_names`): fp32, or as stored when `upcast` is False
    (weight-only pipelines only cut, copy and concatenate weights, and rounding happens once either way)."""
    weights = {role: tensor.float() if upcast else tensor for role, tensor in tensors.items()}
    roles = {"gate": None, **info.adapter.mlp_roles(weights)}
    return DenseMLP(**roles, activation=info.adapter.activation(info.config))


def checked(name: str, tensor: torch.Tensor, where) -> torch.Tensor:
    """`tensor`, after making sure it has no NaN/Inf (its min and max carry both, at memory speed)."""
    if tensor.is_floating_point() and tensor.numel():
        values = tensor if tensor.element_size() >= 2 else tensor.to(torch.float16)  # float8 has no aminmax
        if not torch.isfinite(torch.stack(torch.aminmax(values))).all():
            raise CheckFailed(f"{name} in {where} contains NaN or Inf; moefy will not convert a broken "
                              f"checkpoint. Repair or re-download it.")
    return tensor
