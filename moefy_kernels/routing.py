"""Routing semantics shared by every backend: scores → top-k → combine weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORINGS = ("softmax", "sigmoid")
COMBINES = ("unit", "prob", "renormalize")
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation_fn(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def check_semantics(scoring: str, combine: str) -> None:
    """The routing semantics every backend implements; anything else is a ValueError."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; expected one of {COMBINES}")


def route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", combine: str = "renormalize"):
    """Return (weights [T, k] fp32, expert ids [T, k]) for the given semantics.

    Scores are computed in fp32 like the standard transformers MoE classes; ties in top-k
    resolve as `torch.topk` does, so every backend picks the same experts.
    """
    check_semantics(scoring, combine)
    logits = router_logits.float()
    probs = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    top_p, top_i = torch.topk(probs, top_k, dim=-1)
    if combine == "unit":
        top_p = torch.ones_like(top_p)
    elif combine == "renormalize":
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    return top_p, top_i
