"""Fast PyTorch MoE forward: tokens sorted by expert, one matmul pair per hit expert."""

from __future__ import annotations

import torch

from moefy_kernels.reference import expert_mlp
from moefy_kernels.routing import route


def moe_forward_torch(hidden, router_logits, w13, w2, top_k, *, scoring="softmax", combine="renormalize",
                      activation="silu", gated=True, shared=None, expert_scales=None):
    weights, experts = route(router_logits, top_k, scoring=scoring, combine=combine)
    if expert_scales is not None:
        weights = weights * expert_scales.float()[experts]
    num_tokens = hidden.shape[0]
    flat_experts = experts.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    token_of_slot = order // top_k
    counts = torch.bincount(flat_experts, minlength=w13.shape[0]).tolist()
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    slot_weights = weights.reshape(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of_slot[start:start + n]
        y = expert_mlp(hidden[rows].float(), w13[e].float(), w2[e].float(), activation, gated)
        out.index_add_(0, rows, y * slot_weights[start:start + n, None])
        start += n
    if shared is not None:
        out += expert_mlp(hidden.float(), shared[0].float(), shared[1].float(), activation, gated)
    return out.to(hidden.dtype)
