"""Fast PyTorch experts (CPU and GPU). Decode (a few tokens): on CPU in fp32, the fused kernel reads the
selected experts in place in one call (`cpu_decode`, with a shared expert where the block has one); else
the selected experts gathered into one block and one matmul pair (big experts read in place, a matmul pair
each), no loop over small experts. Prefill: on CPU with narrow experts, every expert as two dense matmuls
(masked by the routing weights); else (token, slot) pairs sorted by expert and two grouped matmuls
(`torch._grouped_mm` where this build has it, else one matmul pair per hit expert on contiguous slices),
then `index_add` back to tokens. The routing weight scales the narrow intermediate (I_e wide), not the
H-wide output; rows are gathered with `index_select` (3× faster than advanced indexing on CPU, measured).
Every path is differentiable: end-to-end distillation trains on this backend.

w2 [E, H, I] may be stored with its last dimension contiguous, or with each expert's down weights as rows
([E, I, H] in memory, `decode_layout`), which the fused kernel reads in place and the gathered path copies
as one contiguous block per selected expert.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from moefy_kernels import cpu_decode
from moefy_kernels.routing import activation_fn

GATHER_MAX_TOKENS = 8  # up to this many tokens, gathering the union of their experts beats sorting


def decode_layout(w2: torch.Tensor, top_k: int) -> torch.Tensor:
    """w2 [E, H, I] with the same values and shape, re-stored so that CPU decode reads it cheapest: [E, I, H]
    in memory, where the fused kernel reads each expert's down weights as rows and a gathered copy of the
    selected ones is one contiguous block each (not H strided pieces). Without the kernel, a block that selects
    every expert (top_k = E) gets [H, E, I] instead: the dense MLP's down matrix [H, E·I], which MKL's one
    matmul per decoded token reads ~10 % faster than its transpose (prefill reads either at the same speed)."""
    if top_k < w2.shape[0] or cpu_decode.kernel() is not None:
        return w2.transpose(1, 2).contiguous().transpose(1, 2)
    return w2.permute(1, 0, 2).contiguous().permute(1, 0, 2)


def _has_grouped_mm(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """`torch._grouped_mm` runs fp32 on CPU (on CUDA it wants bf16) and needs 16-byte aligned operands and
    strides: experts at least 4 fp32 wide, in multiples of 4 (tiny carves have 2-wide experts)."""
    if not hasattr(torch, "_grouped_mm") or not (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        return False
    width_bytes = w2.shape[-1] * x.element_size()  # the stride of the [N, I] intermediate
    return width_bytes % 16 == 0 and all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0
                                                                          for s in t.stride() if s != 1)
                                         for t in (x, w13, w2))


class _GroupedLinear(torch.autograd.Function):
    """x [N, in] · w[e]ᵀ on each expert's rows (offs: cumulative row counts) → [N, out]. Its own backward
    because torch's `_grouped_mm` has none on CPU; both gradients are grouped matmuls again: the input's
    over the same row groups, the weights' grouped along the rows (the reduction dimension)."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad):
        x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, w, offs=offs) if ctx.needs_input_grad[0] else None
        grad_w = torch._grouped_mm(grad.t(), x, offs=offs) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def _glu(z: torch.Tensor, act, gated: bool) -> torch.Tensor:
    if not gated:
        return act(z)
    gate, up = z.chunk(2, dim=-1)
    return act(gate) * up


def _grouped(x_sorted, row_weights, row_bias, counts, w13, w2, act, gated):
    """row_weights · expert e on rows counts[:e].sum() … counts[:e+1].sum() of x_sorted; row_bias: each row's
    expert input bias [N, rows] or None."""
    if _has_grouped_mm(x_sorted, w13, w2):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        z = _GroupedLinear.apply(x_sorted, w13, offs)
        h = _glu(z if row_bias is None else z + row_bias, act, gated) * row_weights
        return _GroupedLinear.apply(h, w2, offs)
    out = torch.empty(x_sorted.shape[0], w2.shape[1], dtype=x_sorted.dtype, device=x_sorted.device)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            rows = slice(start, start + n)
            z = F.linear(x_sorted[rows], w13[e], None if row_bias is None else row_bias[start])
            out[rows] = F.linear(_glu(z, act, gated) * row_weights[rows], w2[e])
            start += n
    return out


# (min expert width, grouped-path cost ÷ its ideal k/E of a dense MLP): CPU, fp32, 512 tokens, 2 cores,
# `python scripts/bench_cpu_paths.py` (docs/BENCHMARKS.md); ≥ 256 from bench_moe's 2048 / 8192 rows
GROUPED_COST = ((256, 1.3), (96, 2.0), (24, 6.0), (8, 22.0))


def _every_expert_is_faster(x: torch.Tensor, w2: torch.Tensor, top_k: int) -> bool:
    """On CPU, the every-expert path costs about one dense MLP; grouped matmuls cost the routed fraction k/E
    of it times an overhead that grows fast as experts narrow (sorting, gathering, many small GEMMs):
    ≈ 2 at width 96, ≈ 4.5–8 at 24–32, ≈ 22 at 8, 84 at 2 (`GROUPED_COST`; below width 8 grouped is never
    taken). A fixed table, not a timing at run time, so the same inputs always take the same path and a
    run's numerics never depend on machine load."""
    if x.device.type != "cpu":
        return False
    width = w2.shape[-1]
    overhead = next((cost for min_width, cost in GROUPED_COST if width >= min_width), None)
    return overhead is None or top_k / w2.shape[0] * overhead >= 1


def _every_expert(x, weights, experts, w13, w2, act, gated, b13):
    """Every expert on every token as two dense matmuls, the unselected ones weighted 0. (modeling_moefy's
    `_dense_masked_moe` computes the same on its own: that file must run where moefy_kernels is absent.)"""
    tokens, (num, dim, width) = x.shape[0], w2.shape
    z = F.linear(x, w13.reshape(-1, dim)).view(tokens, num, -1)
    h = _glu(z if b13 is None else z + b13, act, gated)
    mask = torch.zeros(tokens, num, 1, dtype=x.dtype, device=x.device)
    h = h * mask.scatter(1, experts[..., None], weights[..., None])
    return F.linear(h.reshape(tokens, num * width), w2.permute(1, 0, 2).reshape(dim, num * width))


_workspace = threading.local()  # per thread: {(slot, dtype): flat CPU buffer}, grown to the largest block seen


def _gather(weights: torch.Tensor, index: torch.Tensor, slot: str) -> torch.Tensor:
    """`weights.index_select(0, index)`, on CPU outside autograd into a buffer reused from call to call: a
    fresh multi-MB block per decoded token costs more in page faults than the copy itself (bench_moe.py,
    2048 × 8192, E16 k4, T = 1: 11.4 vs 4.7 ms per layer). One buffer per thread and slot, so concurrent
    threads never share one; it holds at most one layer's experts."""
    if weights.device.type != "cpu" or (torch.is_grad_enabled() and weights.requires_grad):
        return weights.index_select(0, index)
    shape = (index.numel(), *weights.shape[1:])
    buffers = _workspace.__dict__.setdefault("buffers", {})
    buffer = buffers.get((slot, weights.dtype))
    if buffer is None or buffer.numel() < math.prod(shape):
        with torch.inference_mode(False):  # a normal tensor: one made in inference mode can't be written outside
            buffer = buffers[slot, weights.dtype] = torch.empty(math.prod(shape), dtype=weights.dtype)
    return torch.index_select(weights, 0, index, out=buffer[:math.prod(shape)].view(shape))


# a selected expert at least this big (w13 + w2 bytes) is read in place, one matmul pair each, instead of
# being copied into a gathered block (bench_moe.py, T = 1: 2048 × 8192 E16 k4, 12 MiB each, 1.9 vs 4.7 ms;
# 576 × 1536 E16 k4, 648 KiB each, 0.20 vs 0.29 ms); in a timed loop over both at 576 × 1536, 216 KiB
# experts (16 of 48) were a tie and 162 KiB ones (16 of 64) faster gathered, 0.17 vs 0.29 ms
LOOP_MIN_EXPERT_BYTES = 256 * 1024
# the fused CPU kernel reads experts up to this size; bigger ones go to MKL one matmul pair each, which reads
# long rows faster (bench_moe.py, T = 1: 4096 × 14336 E16 k4, 42 MiB each, 7.35 ms fused vs 6.53 per
# expert; E256 k64, 2.6 MiB each, 7.10 vs 7.65 ms; 2048 × 8192 E16 k4, 12 MiB each, 2.06 vs 1.90 ms)
FUSED_MAX_EXPERT_BYTES = 4 * 2**20


def selected_union(weights: torch.Tensor, experts: torch.Tensor, num: int):
    """(the experts any of a few tokens selected [U] — None when that is every expert —, each token's weight
    for each of them [T, U], 0 where it did not select it)."""
    tokens = weights.shape[0]
    if tokens == 1 and experts.shape[1] < num:
        return experts[0], weights
    dense_w = torch.zeros(tokens, num, dtype=weights.dtype, device=weights.device).scatter(1, experts, weights)
    chosen = torch.unique(experts) if tokens * experts.shape[1] < num else None
    return chosen, dense_w if chosen is None else dense_w.index_select(1, chosen)


def _expert_bytes(w13: torch.Tensor, w2: torch.Tensor) -> int:
    """The bytes of one expert's weights ([gate; up] rows and down weights)."""
    return (w13.shape[1] * w13.shape[2] + w2.shape[1] * w2.shape[2]) * w13.element_size()


def fused_fits(w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the fused CPU kernel, rather than MKL, should read these experts (FUSED_MAX_EXPERT_BYTES)."""
    return _expert_bytes(w13, w2) <= FUSED_MAX_EXPERT_BYTES


def fused_decode(x, weights, experts, w13, w2, activation, gated, b13=None, shared=None):
    """A few tokens' routed experts, plus an always-on `shared` expert (gate rows, up rows [Is, H], down [H, Is]
    stored as rows, its sigmoid gate [1, H] or None), in one call of the fused CPU kernel; None where that
    kernel does not apply, and the caller takes its usual path."""
    if x.shape[0] > GATHER_MAX_TOKENS or not (cpu_decode.applies(x, w13, w2, activation, gated, b13)
                                             and fused_fits(w13, w2)):
        return None
    if shared is not None and not cpu_decode.shared_applies(*shared):
        return None
    if x.shape[0] == 1:  # one token: its experts in routing order, every one of them too (the kernel takes any)
        return cpu_decode.swiglu_experts(x, weights.float(), experts[0], w13, w2, shared)
    chosen, w = selected_union(weights.float(), experts, w2.shape[0])
    if chosen is None:  # every expert: read in place all the same (~50 µs a layer fewer than a matmul pair)
        chosen = torch.arange(w2.shape[0])
    return cpu_decode.swiglu_experts(x, w, chosen, w13, w2, shared)


def _gathered(x, weights, experts, w13, w2, act, gated, b13):
    """A few tokens (decode) where the fused kernel does not apply: the union of their selected experts, each
    token weighting the ones it did not select 0. Small experts are gathered into one block (one matmul in,
    the GLU weighted per token, the same experts' down rows gathered, one matmul out) and big ones read where
    they lie, one matmul pair each (a copy would cost more than the per-expert call). A union of every expert
    is one dense matmul pair."""
    tokens, dim = x.shape[0], w2.shape[1]
    chosen, w = selected_union(weights, experts, w2.shape[0])
    if chosen is not None and _expert_bytes(w13, w2) >= LOOP_MIN_EXPERT_BYTES:
        out = torch.zeros_like(x)
        for j, e in enumerate(chosen.tolist()):
            z = F.linear(x, w13[e], None if b13 is None else b13[e])
            out = out + F.linear(_glu(z, act, gated) * w[:, j, None], w2[e])
        return out
    w13_c = w13 if chosen is None else _gather(w13, chosen, "w13")
    z = F.linear(x, w13_c.reshape(-1, dim)).view(tokens, w13_c.shape[0], -1)
    if b13 is not None:
        z = z + (b13 if chosen is None else b13.index_select(0, chosen))
    h = (_glu(z, act, gated) * w[..., None]).reshape(tokens, -1)  # [T, U·I]
    if chosen is None:  # a view in native's layout and in both `decode_layout`s; a copy of a contiguous w2
        return F.linear(h, w2.permute(1, 0, 2).reshape(dim, -1))
    # [E, I, H] is contiguous in the decode layout: each selected expert is one block copy
    return h @ _gather(w2.transpose(1, 2), chosen, "w2").reshape(-1, dim)


PATHS = ("gathered", "every_expert", "grouped")


def experts_torch(hidden, weights, experts, w13, w2, activation, gated, b13=None, *, path: str | None = None):
    """The torch backend's experts; `path` forces one of PATHS (benchmarks compare them), else the rule:
    gathered up to GATHER_MAX_TOKENS tokens, then every-expert or grouped by `GROUPED_COST`."""
    x, w13, w2, weights = hidden.float(), w13.float(), w2.float(), weights.float()
    b13 = None if b13 is None else b13.float()
    if path is None:
        path = ("gathered" if x.shape[0] <= GATHER_MAX_TOKENS else
                "every_expert" if _every_expert_is_faster(x, w2, experts.shape[1]) else "grouped")
    elif path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    if path == "gathered":
        out = fused_decode(x, weights, experts, w13, w2, activation, gated, b13)
        return out if out is not None else _gathered(x, weights, experts, w13, w2, activation_fn(activation),
                                                     gated, b13)
    if path == "every_expert":
        return _every_expert(x, weights, experts, w13, w2, activation_fn(activation), gated, b13)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of_slot = order // experts.shape[1]
    counts = torch.bincount(flat, minlength=w13.shape[0])
    row_bias = None if b13 is None else b13.index_select(0, flat[order])
    y = _grouped(x.index_select(0, token_of_slot), weights.reshape(-1)[order, None], row_bias, counts, w13, w2,
                 activation_fn(activation), gated)
    return torch.zeros_like(x).index_add(0, token_of_slot, y)
