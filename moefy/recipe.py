"""Recipes: YAML files of transforms + calibration + output + gates, validated before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from moefy.errors import BadInput
from moefy.io.yaml_file import load_yaml
from moefy.transforms import TRANSFORMS, Transform

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(_Strict):
    samples: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=2)
    dataset: str | None = None
    mode: Literal["sequential", "independent"] = "sequential"  # later layers see earlier layers' changes, or not
    batch_size: int = Field(8, ge=1)


class OutputConfig(_Strict):
    format: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    shard_size: str | int = "2GB"

    @field_validator("shard_size")
    @classmethod
    def _a_size(cls, value):
        from moefy.io.writer import parse_size

        try:
            size = parse_size(value)
        except (ValueError, OverflowError):
            size = None
        if isinstance(value, bool) or size is None or size < 1:
            raise ValueError(f"{value!r} is not a size: give bytes or a number with KB/MB/GB/KiB/MiB/GiB, e.g. 2GB")
        return value


class GatesConfig(_Strict):
    max_delta_ppl_pct: float | None = None
    dataset: str | None = None
    max_windows: int = Field(40, ge=1)
    seq_len: int = Field(512, ge=2)


class Recipe(_Strict):
    name: str = "custom"
    description: str = ""
    measured: str = Field("", description="what this recipe measured on the demo model, both axes: Δppl and "
                                          "decode / prefill × dense (docs/BENCHMARKS.md, with the command)")
    transforms: list[dict[str, dict[str, Any] | None]] = Field(min_length=1)
    calibration: CalibrationConfig = CalibrationConfig()
    output: OutputConfig = OutputConfig()
    gates: GatesConfig | None = None
    _path: Path | None = PrivateAttr(None)  # the YAML file it was read from

    @property
    def path(self) -> Path | None:
        return self._path

    @field_validator("transforms")
    @classmethod
    def _one_key_each(cls, value):
        for i, step in enumerate(value):
            if len(step) != 1:
                raise ValueError(f"transforms.{i} must be a mapping with exactly one transform name, got {list(step)}")
        return value

    def build_transforms(self, seed: int) -> list[Transform]:
        built = []
        for i, step in enumerate(self.transforms):
            (name, options), = step.items()
            if name not in TRANSFORMS:
                raise BadInput(f"recipe transforms.{i}: unknown transform {name!r}. Valid transforms: "
                               f"{', '.join(sorted(TRANSFORMS))}.")
            cls = TRANSFORMS[name]
            try:
                built.append(cls(cls.Options.model_validate(options or {}), seed=seed))
            except ValidationError as exc:
                raise BadInput(f"recipe transforms.{i}.{name}: {_describe(exc)}. Valid options: "
                               f"{', '.join(cls.Options.model_fields)}.") from None
        return built


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIGS_DIR.glob("*.yaml"))}


def _set_key(data: dict, dotted: str, value: Any) -> None:
    node: Any = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
            if node is None:
                raise KeyError(key)
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _validated(data: dict, where: str) -> Recipe:
    """The recipe of `data`, its transforms' options validated too; BadInput names `where` (the file, or `--set`
    when the file alone was valid)."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise BadInput(f"{where}: {_describe(exc)}. Top-level keys: {', '.join(Recipe.model_fields)}.") from None
    try:
        recipe.build_transforms(0)
    except BadInput as exc:
        raise BadInput(f"{where}: {exc}") from None
    return recipe


def load_recipe(spec: str, overrides: list[str] = ()) -> Recipe:
    """Load a recipe by path or built-in name and apply `--set KEY=VALUE` overrides (YAML values)."""
    path = Path(spec)
    if not path.is_file():
        builtins = builtin_recipes()
        if spec not in builtins:
            raise BadInput(f"recipe {spec!r} is neither a file nor a built-in recipe. Built-in recipes: "
                           f"{', '.join(builtins)} (see `moefy recipes`).")
        path = builtins[spec]
    data = load_yaml(path, "recipe")
    if not isinstance(data, dict):
        raise BadInput(f"recipe {path} must be a YAML mapping with a `transforms:` list.")
    _validated(data, f"recipe {path}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--set {item!r} must look like KEY=VALUE, e.g. transforms.0.slice.experts=32.")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise BadInput(f"--set {key}: the value {raw!r} is not valid YAML ({' '.join(str(exc).split())[:120]})."
                           f" Quote strings, e.g. --set name='\"my recipe\"'.") from None
        try:
            _set_key(data, key, value)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError):
            raise BadInput(f"--set {key}: no such place in recipe {path.name}. Keys are dotted paths, list "
                           f"items by index, e.g. transforms.0.slice.experts=32.") from None
    recipe = _validated(data, f"--set {' '.join(overrides)} (on recipe {path})" if overrides else f"recipe {path}")
    recipe._path = path
    return recipe
