"""Transform plugins: validated options, a weight-free plan, and a per-layer apply.

Lifecycle (llm-compressor style), in this order:
1. `check(source)` validates the options against the architecture (config only, nothing read);
2. `plan(previous, source)` says what the layers will look like, so the export format is chosen up front
   (pure: it sets no state);
3. `setup(source, previous)` reads what the run needs (files the options name, other checkpoints) and
   sets the run's state — still before any tensor is written, so `--dry-run` checks it too;
4. an optional dense `preview` pass sees every layer before any is rewritten;
5. `apply(layer, block, data)` rewrites one layer at a time, in layer order, so memory stays bounded by one
   layer (+ the calibration activations when a transform needs them: see moefy.calib);
6. an optional `finalize` sees the whole written model (end-to-end distillation).
Calling preview, apply or finalize before setup is a pipeline bug and raises RuntimeError.
"""

from __future__ import annotations

import functools
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


def _after_setup(method):
    """`method`, refusing to run before `setup` (the lifecycle above)."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if not self.__dict__.get("_set_up"):
            raise RuntimeError(f"{type(self).__name__}.{method.__name__} called before setup(): a pipeline calls "
                               f"check, plan and setup, then preview / apply / finalize")
        return method(self, *args, **kwargs)
    return guarded


def _marks_setup(method):
    @functools.wraps(method)
    def setup(self, *args, **kwargs):
        method(self, *args, **kwargs)
        self._set_up = True
    return setup


GUARDED = ("preview_request", "preview", "apply", "finalize")


class Transform:
    name: ClassVar[str]
    Options: ClassVar[type[Options]]
    summary: ClassVar[str]

    def __init__(self, options: Options, seed: int = 0):
        self.options = options
        self.seed = seed

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in GUARDED:
            if name in vars(cls):
                setattr(cls, name, _after_setup(vars(cls)[name]))
        if "setup" in vars(cls):
            cls.setup = _marks_setup(vars(cls)["setup"])

    def check(self, source: SourceInfo) -> None:
        """Raise BadInput when the options cannot apply to this architecture (config only)."""

    def plan(self, previous: LayerPlan | None, source: SourceInfo) -> LayerPlan:
        """The layers after this transform, from `previous` (None: the dense model), weight-free and pure."""
        raise NotImplementedError

    @_marks_setup
    def setup(self, source: SourceInfo, previous: LayerPlan | None) -> None:
        """Read what the run needs and set its state (counters, opened files); BadInput for what is wrong
        with them. `previous` is the plan this transform starts from."""

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

    @_after_setup
    def preview_request(self) -> Preview | None:
        """Ask for a dense preview pass (model-wide decisions, e.g. budgets, prompt hidden states)."""
        return None

    @_after_setup
    def preview(self, layer: int, mlp: DenseMLP, inputs: list[torch.Tensor]) -> None:
        """One layer of the preview pass: the dense MLP and its inputs, [T_b, H] per batch (one text per
        batch when the request gave texts)."""

    @_after_setup
    def apply(self, layer: int, current: DenseMLP | MoeLayer, data: LayerData | None = None) -> DenseMLP | MoeLayer:
        """Rewrite one layer; `data` is given when the pipeline calibrates, else None."""
        raise NotImplementedError

    @_after_setup
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
