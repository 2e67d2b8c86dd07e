"""Deliberately plain MoE forward: one token, one selected expert at a time.

This is the oracle every faster backend is tested against; keep it obvious.
"""

from __future__ import annotations

import torch

from moefy_kernels.routing import activation_fn


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, activation: str, gated: bool,
               b13: torch.Tensor | None = None) -> torch.Tensor:
    """One expert on a [*, H] input: w2 · act(gate x + b_gate) ⊙ (up x + b_up), or w2 · act(w x + b) when not
    gated (b13: the expert's input biases, [2·I] or [I]; None: none)."""
    act = activation_fn(activation)
    z = x @ w13.T if b13 is None else x @ w13.T + b13
    if gated:
        gate, up = z.chunk(2, dim=-1)
        return (act(gate) * up) @ w2.T
    return act(z) @ w2.T


def experts_reference(hidden, weights, experts, w13, w2, activation, gated, b13=None):
    """Σ_j weights[t, j] · expert_{experts[t, j]}(hidden[t]), in fp32, token by token."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for t in range(hidden.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            bias = None if b13 is None else b13[e].float()
            out[t] += weights[t, j] * expert_mlp(hidden[t].float(), w13[e].float(), w2[e].float(), activation,
                                                 gated, bias)
    return out
