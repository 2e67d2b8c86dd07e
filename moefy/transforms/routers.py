"""Routers built from calibration activations (used by `carve`, shared with `fit_router`).

Every router here is linear, [E, H], so it exports to any MoE format.  The oracle for a token is
what each expert actually contributes: ‖expert_e(x)‖, the norm of its output.
"""

from __future__ import annotations

import math

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


def expert_activation_mass(h: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Σ |h_i| over each expert's neurons, [T, E]: the cheaper "activation-sum" oracle."""
    return torch.stack([part.abs().sum(1) for part in h.split(widths, dim=1)], dim=1)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[T, E] bool: True at each token's k highest scores."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(k, dim=1).indices, True)


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit L2 norm (zero rows stay zero)."""
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)


def top_k_recall(scores: torch.Tensor, oracle: torch.Tensor, k: int) -> float:
    """Fraction of the oracle's top-k experts that `scores` also puts in its top-k."""
    if k >= scores.shape[1]:
        return 1.0
    best = top_k_mask(oracle, k)
    return float((top_k_mask(scores, k) & best).sum() / best.sum())


def ridge_router(x: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """Least-squares router W [E, H] with x W^T ≈ targets; ridge is relative to the mean diagonal of xᵀx."""
    x = x.double()
    gram = x.T @ x
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    return torch.linalg.solve(gram, x.T @ targets.double()).T.float()


def centroid_router(x: torch.Tensor, oracle: torch.Tensor, k: int) -> torch.Tensor:
    """Row e = mean input of the tokens whose oracle top-k holds e, minus the mean input (unit norm)."""
    best = top_k_mask(oracle, k).to(x.dtype)
    means = (best.T @ x) / best.sum(0).clamp(min=1)[:, None]
    return unit_rows(means - x.mean(0))


def routing_diagnostics(moe, x: torch.Tensor, oracle: torch.Tensor, mass: torch.Tensor) -> dict:
    """How well `moe` routes tokens x [T, H]: top-k recall vs the oracle's output norms [T, E], the share of
    the activation mass [T, E] its selected experts carry, and the expert load (max/mean, normalised entropy)."""
    k = moe.top_k
    selected = moe.route(x).ne(0)
    load = selected.float().mean(0)
    share = load / load.sum()
    entropy = float(-(share * share.clamp(min=1e-30).log()).sum() / math.log(moe.num_experts))
    return {"router_recall": round(top_k_recall(moe.logits(x), oracle, k), 4),
            "mass_coverage": round(float((mass * selected).sum() / mass.sum().clamp(min=1e-30)), 4),
            "expert_load_max_over_mean": round(float(load.max() / load.mean()), 3),
            "expert_load_entropy": round(entropy, 4)}


def scale_to_temperature(moe, x: torch.Tensor, temperature: float) -> None:
    """Renormalised softmax routing whose top-k weights sit near 1/k: scale the router by the power of two
    that brings the logits' std on x [T, H] to about `temperature` (the ranking is unchanged bit for bit)."""
    spread = float(moe.logits(x).std())
    moe.scale_router(2.0 ** math.floor(math.log2(temperature / spread)) if spread > 0 else 1.0)
    moe.combine = "renormalize"
