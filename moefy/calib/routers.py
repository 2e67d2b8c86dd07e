"""Routers built from calibration activations (used by `carve`, shared with `fit_router`).

Every router here is linear, [E, H], so it exports to any MoE format.  The oracle for a token is
what each expert actually contributes: ‖expert_e(x)‖, the norm of its output.
"""

from __future__ import annotations

import torch


def expert_output_norms(h: torch.Tensor, down: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """‖expert_e(x_t)‖ for every token and expert, [T, E], from intermediate activations h [T, I].

    ‖h_e W_eᵀ‖² = h_e (W_eᵀ W_e) h_eᵀ: an I_e × I_e Gram per expert instead of an H-wide output.
    """
    norms, start = [], 0
    for w in widths:
        h_e, w_e = h[:, start:start + w], down[:, start:start + w]
        norms.append(((h_e @ (w_e.T @ w_e)) * h_e).sum(1).clamp(min=0).sqrt())
        start += w
    return torch.stack(norms, dim=1)


def top_k_recall(scores: torch.Tensor, oracle: torch.Tensor, k: int) -> float:
    """Fraction of the oracle's top-k experts that `scores` also puts in its top-k."""
    if k >= scores.shape[1]:
        return 1.0
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(k, dim=1).indices, True)
    best = torch.zeros_like(oracle, dtype=torch.bool).scatter(1, oracle.topk(k, dim=1).indices, True)
    return float((chosen & best).sum() / best.sum())


def ridge_router(x: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """Least-squares router W [E, H] with x W^T ≈ targets; ridge is relative to the mean diagonal of xᵀx."""
    x = x.double()
    gram = x.T @ x
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    return torch.linalg.solve(gram, x.T @ targets.double()).T.float()


def centroid_router(x: torch.Tensor, oracle: torch.Tensor, k: int) -> torch.Tensor:
    """Row e = mean input of the tokens whose oracle top-k holds e, minus the mean input (unit norm)."""
    best = torch.zeros_like(oracle).scatter(1, oracle.topk(k, dim=1).indices, 1.0)
    means = (best.T @ x) / best.sum(0).clamp(min=1)[:, None]
    rows = means - x.mean(0)
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
