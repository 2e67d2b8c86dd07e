"""Compensation after routing: refit the down projections and add an output bias so a routed block
reproduces the dense MLP's output on the calibration tokens (shared by `carve` and `fit_router`)."""

from __future__ import annotations

import dataclasses

import torch
from pydantic import Field

from moefy.moe.layer import MoeLayer
from moefy.plan import Options

DIAGNOSTIC_TOKENS = 2048  # calibration tokens the reported reconstruction errors are measured on


class CompensationOptions(Options):
    refit_down: bool = Field(False, description="least-squares refit of down_proj under the routing mask")
    bias: bool = Field(False, description="output bias = mean of what the dropped experts contribute (native)")
    ridge: float = Field(1e-3, gt=0, description="refit ridge, relative to the mean diagonal of the Gram matrix")


def compensation_tokens(options: CompensationOptions, available: int) -> int:
    """Tokens `compensate` needs: all of them to refit, else only the diagnostic sample."""
    return available if options.refit_down or options.bias else min(available, DIAGNOSTIC_TOKENS)


def compensate(moe: MoeLayer, x: torch.Tensor, h_routed: torch.Tensor, h_shared: torch.Tensor | None,
               target: torch.Tensor, options: CompensationOptions) -> dict:
    """Apply `options` to `moe` in place, given its inputs x [T, H], the intermediate activations of its
    routed and shared experts and the dense output to reproduce; returns the relative errors before and after."""
    routed = h_routed * moe.neuron_weights(x)  # what each kept neuron feeds the down projection
    stats = {"rel_error": rel_error(moe, routed, h_shared, target)}
    if options.bias:
        moe.bias = None  # recomputed below, after any refit
    if options.refit_down:
        refit_down(moe, routed, h_shared, target, options.ridge)
    if options.bias:
        moe.bias = (target - block_output(moe, routed, h_shared)).mean(0)
    stats["rel_error_final"] = rel_error(moe, routed, h_shared, target)
    return stats


def block_output(moe: MoeLayer, routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """The block's output from cached (routing-weighted) activations; equals moe.forward(x)."""
    y = routed @ moe.mlp.down.float().T
    if shared is not None:
        y = y + shared @ moe.shared.down.float().T
    return y if moe.bias is None else y + moe.bias


def refit_down(moe: MoeLayer, routed: torch.Tensor, shared: torch.Tensor | None, target: torch.Tensor,
               ridge: float) -> None:
    """Closed-form ridge refit of every down column (routed and shared) so the routed block's output
    matches the dense MLP's on the calibration tokens, given the routing-weighted activations;
    the ridge pulls towards the current weights."""
    a = routed if shared is None else torch.cat([routed, shared], dim=1)
    w0 = moe.mlp.down.double() if shared is None else torch.cat([moe.mlp.down, moe.shared.down], dim=1).double()
    target = target if moe.bias is None else target - moe.bias
    gram = (a.T @ a).double()  # fp32 products, fp64 solve
    lam = ridge * float(gram.diagonal().mean())
    gram.diagonal().add_(lam)
    w = torch.linalg.solve(gram, (a.T @ target).double() + lam * w0.T).T.float()
    width = moe.mlp.width
    moe.mlp = dataclasses.replace(moe.mlp, down=w[:, :width].contiguous())
    if shared is not None:
        moe.shared = dataclasses.replace(moe.shared, down=w[:, width:].contiguous())


def rel_error(moe: MoeLayer, routed: torch.Tensor, shared: torch.Tensor | None, dense: torch.Tensor,
              tokens: int = DIAGNOSTIC_TOKENS) -> float:
    """‖y − y_dense‖² / ‖y_dense‖² of the block on the first `tokens` (random) calibration tokens."""
    y = block_output(moe, routed[:tokens], None if shared is None else shared[:tokens])
    ref = dense[:tokens]
    return round(float((y - ref).pow(2).sum() / ref.pow(2).sum()), 5)
