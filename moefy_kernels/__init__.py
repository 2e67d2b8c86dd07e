"""Sparse-expert forward passes behind one entry point, `moe_forward` (contract: DESIGN.md).

Backends: `reference` (plain loop, the oracle), `torch` (gathered decode / grouped matmuls, CPU and GPU),
`triton` (fused kernels, CUDA; on CPU only under TRITON_INTERPRET=1, for tests). `reference` and `torch`
are differentiable (torch is the training path); triton is inference only.
`auto` picks triton for CUDA tensors when it is installed, else torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moefy_kernels import cpu_decode
from moefy_kernels.reference import experts_reference
from moefy_kernels.routing import ACTIVATIONS, route
from moefy_kernels.torch_ops import decode_layout, experts_torch, fused_decode


@dataclass(frozen=True)
class Backend:
    """route(logits, top_k, scoring, combine) → (weights [T, k] fp32, ids [T, k]);
    experts(hidden, weights, ids, w13, w2, activation, gated, b13=None) → Σ_k weight · expert(hidden), [T, H] fp32."""

    route: Callable
    experts: Callable


def _route(logits, top_k, scoring, combine):
    return route(logits, top_k, scoring=scoring, combine=combine)


BACKENDS = {"reference": Backend(_route, experts_reference), "torch": Backend(_route, experts_torch)}
try:
    from moefy_kernels.triton_moe import experts_triton, route_triton
except ImportError:  # triton is Linux-only; the other backends cover everything else
    pass
else:
    BACKENDS["triton"] = Backend(route_triton, experts_triton)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["moe_forward", "route", "Backend", "BACKENDS", "resolve_backend", "check_inputs", "decode_layout"]


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """Map `auto` to a concrete backend for tensors on `device`; reject names this build cannot run."""
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if backend == "auto":
        return "triton" if on_cuda and "triton" in BACKENDS else "torch"
    if backend not in BACKENDS:
        missing = " (triton is not installed)" if backend == "triton" else ""
        raise ValueError(f"unknown backend {backend!r}{missing}; available: auto, {', '.join(BACKENDS)}")
    if backend == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels in "
                         "the slow interpreter); use --backend torch on CPU")
    return backend


def check_inputs(hidden, router_logits, w13, w2, top_k, *, gated=True, shared=None, expert_scales=None,
                 activation="silu", b13=None) -> None:
    """Raise ValueError naming the first inconsistent argument instead of computing garbage."""
    def fail(msg):
        raise ValueError(f"moe_forward: {msg}")

    if hidden.dim() != 2:
        fail(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        fail(f"w13 must be [E, 2*I, H] and w2 [E, H, I], got {tuple(w13.shape)} and {tuple(w2.shape)}")
    tokens, dim = hidden.shape
    experts, width = w2.shape[0], w2.shape[2]
    rows = (2 if gated else 1) * width
    if tuple(w13.shape) != (experts, rows, dim) or w2.shape[1] != dim:
        fail(f"with H={dim} from hidden and E={experts}, I={width} from w2 {tuple(w2.shape)}, w13 must be "
             f"{(experts, rows, dim)} ({'gate rows then up rows' if gated else 'not gated'}), got {tuple(w13.shape)}")
    if tuple(router_logits.shape) != (tokens, experts):
        fail(f"router_logits must be [T={tokens}, E={experts}], got {tuple(router_logits.shape)}")
    if not 1 <= top_k <= experts:
        fail(f"top_k={top_k} must be between 1 and the number of experts ({experts})")
    if activation not in ACTIVATIONS:
        fail(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    tensors = {"hidden": hidden, "w13": w13, "w2": w2}
    if b13 is not None:
        if tuple(b13.shape) != (experts, rows):
            fail(f"b13 (the experts' input biases) must be [E={experts}, {rows}], got {tuple(b13.shape)}")
        tensors["b13"] = b13
    if shared is not None:
        if len(shared) not in (2, 3):
            fail("shared must be (w13, w2) or (w13, w2, b13)")
        s13, s2 = shared[:2]
        if s13.dim() != 2 or s2.dim() != 2 or s13.shape[1] != dim or s2.shape[0] != dim or \
                s13.shape[0] != (2 if gated else 1) * s2.shape[1]:
            fail(f"shared must be (w13 [2*Is, H={dim}], w2 [H={dim}, Is]), got {tuple(s13.shape)}, {tuple(s2.shape)}")
        tensors.update(shared_w13=s13, shared_w2=s2)
        if len(shared) == 3 and shared[2] is not None:
            if tuple(shared[2].shape) != (s13.shape[0],):
                fail(f"the shared expert's b13 must be [{s13.shape[0]}], got {tuple(shared[2].shape)}")
            tensors["shared_b13"] = shared[2]
    if expert_scales is not None and tuple(expert_scales.shape) != (experts,):
        fail(f"expert_scales must be [E={experts}], got {tuple(expert_scales.shape)}")
    for name, tensor in tensors.items():
        if tensor.dtype not in KERNEL_DTYPES or tensor.dtype != hidden.dtype:
            fail(f"{name} is {tensor.dtype}; hidden and all expert weights must share one of fp32/bf16/fp16 "
                 f"(hidden is {hidden.dtype})")
        if tensor.device != hidden.device or router_logits.device != hidden.device:
            fail(f"{name} is on {tensor.device}, hidden on {hidden.device}: put them on one device")
        if tensor.stride(-1) != 1 and not (name.endswith("w2") and tensor.transpose(-1, -2).is_contiguous()):
            fail(f"{name} has strides {tensor.stride()}: its last dimension must be contiguous; call .contiguous() "
                 "once at load time")


def moe_forward(hidden: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
                *, scoring: str = "softmax", combine: str = "renormalize", activation: str = "silu",
                gated: bool = True, shared=None, expert_scales: torch.Tensor | None = None,
                b13: torch.Tensor | None = None, backend: str = "auto", check: bool = True) -> torch.Tensor:
    """Top-k routed experts (+ optional always-on shared expert) on hidden [T, H] → [T, H].

    w13 is [E, 2*I, H] (gate rows then up rows; [E, I, H] when not gated), w2 is [E, H, I]; b13 [E, 2*I]
    the experts' input biases (GPT-2-style MLPs; an output bias belongs to the layer, not to the experts);
    shared is (w13, w2) or (w13, w2, b13); expert_scales [E] multiplies each expert's output on top of its
    combine weight. `check=False` skips `check_inputs`, for callers whose weights agree by construction
    (a native MoeBlock: at decode the checks cost as much as a tenth of the block).
    """
    if check:
        check_inputs(hidden, router_logits, w13, w2, top_k, gated=gated, shared=shared,
                     expert_scales=expert_scales, activation=activation, b13=b13)
    chosen = BACKENDS[resolve_backend(backend, hidden.device)]
    weights, experts = chosen.route(router_logits, top_k, scoring, combine)
    if expert_scales is not None:
        weights = weights * expert_scales.float()[experts]
    if chosen is BACKENDS["torch"] and shared is not None and (len(shared) == 2 or shared[2] is None) and gated:
        out = fused_decode(hidden, weights, experts, w13, w2, activation, gated, b13,  # decode: one kernel call
                           cpu_decode.split_shared(shared[0], shared[1]))
        if out is not None:
            return out.to(hidden.dtype)
    out = chosen.experts(hidden, weights, experts, w13, w2, activation, gated, b13)
    if shared is not None:  # one expert that every token selects with weight 1: a dense GEMM pair
        tokens = hidden.shape[0]
        ones = torch.ones(tokens, 1, dtype=torch.float32, device=hidden.device)
        zeros = torch.zeros(tokens, 1, dtype=torch.int64, device=hidden.device)
        shared_b13 = shared[2][None] if len(shared) == 3 and shared[2] is not None else None
        out = out + chosen.experts(hidden, ones, zeros, shared[0][None], shared[1][None], activation, gated,
                                   shared_b13)
    return out.to(hidden.dtype)
