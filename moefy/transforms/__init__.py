"""Registry of transforms: add one with a module and one line here."""

from __future__ import annotations

from moefy.plan import LayerPlan, SourceInfo
from moefy.transforms.base import Transform
from moefy.transforms.carve import Carve
from moefy.transforms.distill import Distill
from moefy.transforms.fit_router import FitRouter
from moefy.transforms.slice import Slice
from moefy.transforms.upcycle import Upcycle

TRANSFORMS: dict[str, type[Transform]] = {
    Slice.name: Slice,
    Carve.name: Carve,
    Upcycle.name: Upcycle,
    FitRouter.name: FitRouter,
    Distill.name: Distill,
}

__all__ = ["TRANSFORMS", "Transform", "LayerPlan", "SourceInfo"]
