"""Deliberately plain MoE forward: one token, one selected expert at a time.

This is the oracle every faster backend is tested against; keep it obvious.
"""

from __future__ import annotations

import torch

from moefy_kernels.routing import activation_fn, route


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """One expert on a [*, H] input: w2 · act(gate x) ⊙ (up x), or w2 · act(w x) when not gated."""
    act = activation_fn(activation)
    if gated:
        gate, up = (x @ w13.T).chunk(2, dim=-1)
        return (act(gate) * up) @ w2.T
    return act(x @ w13.T) @ w2.T


def moe_forward_reference(hidden, router_logits, w13, w2, top_k, *, scoring="softmax", combine="renormalize",
                          activation="silu", gated=True, shared=None, expert_scales=None):
    weights, experts = route(router_logits, top_k, scoring=scoring, combine=combine)
    out = torch.zeros_like(hidden, dtype=torch.float32)
    for t in range(hidden.shape[0]):
        x = hidden[t].float()
        for slot in range(top_k):
            e = int(experts[t, slot])
            scale = weights[t, slot] * (expert_scales[e].float() if expert_scales is not None else 1.0)
            out[t] += scale * expert_mlp(x, w13[e].float(), w2[e].float(), activation, gated)
        if shared is not None:
            out[t] += expert_mlp(x, shared[0].float(), shared[1].float(), activation, gated)
    return out.to(hidden.dtype)
