"""Sparse-expert forward passes behind one entry point, `moe_forward` (contract: DESIGN.md).

Backends: `reference` (plain loop, the oracle), `torch` (grouped PyTorch path, CPU and GPU).
`auto` picks the fastest available for the tensors' device.
"""

from __future__ import annotations

import torch

from moefy_kernels.reference import moe_forward_reference
from moefy_kernels.routing import route
from moefy_kernels.torch_ops import moe_forward_torch

BACKENDS = {"reference": moe_forward_reference, "torch": moe_forward_torch}

__all__ = ["moe_forward", "route", "BACKENDS", "resolve_backend"]


def resolve_backend(backend: str) -> str:
    """Map `auto` to a concrete backend; reject names this build does not have."""
    if backend == "auto":
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: auto, {', '.join(BACKENDS)}")
    return backend


def moe_forward(hidden: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
                *, scoring: str = "softmax", combine: str = "renormalize", activation: str = "silu",
                gated: bool = True, shared=None, expert_scales: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """Top-k routed experts (+ optional always-on shared expert) on hidden [T, H] → [T, H].

    w13 is [E, 2*I, H] (gate rows then up rows; [E, I, H] when not gated), w2 is [E, H, I];
    expert_scales [E] multiplies each expert's output on top of its combine weight.
    """
    if not 1 <= top_k <= w13.shape[0]:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({w13.shape[0]})")
    fn = BACKENDS[resolve_backend(backend)]
    return fn(hidden, router_logits, w13, w2, top_k, scoring=scoring, combine=combine, activation=activation,
              gated=gated, shared=shared, expert_scales=expert_scales)
