"""Fast PyTorch experts (CPU and GPU): a per-token loop for one or two tokens; on CPU with narrow experts,
every expert as two dense matmuls (masked by the routing weights); else (token, slot) pairs sorted by
expert and two grouped matmuls (`torch._grouped_mm` where this build has it, else one matmul pair per
hit expert on contiguous slices), then `index_add` back to tokens. The routing weight scales
the narrow intermediate (I_e wide), not the H-wide output; rows are gathered with `index_select`
(3× faster than advanced indexing on CPU, measured). Every path is differentiable: end-to-end
distillation trains on this backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moefy_kernels.reference import expert_mlp
from moefy_kernels.routing import activation_fn

PER_TOKEN_MAX = 2  # up to this many tokens, looping over the selected experts beats sorting
EVERY_EXPERT_MAX_RATIO = 6


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


def _every_expert_is_faster(x: torch.Tensor, w2: torch.Tensor, top_k: int) -> bool:
    """On CPU, grouped matmuls of experts narrower than 16 run far below dense-GEMM speed: computing every
    expert as two dense matmuls wins while the routed experts are at most EVERY_EXPERT_MAX_RATIO × top_k
    (measured: a training step of the demo model with 128 experts of width 8, 26 active, 4.3 vs 6.1 s;
    one block's forward and backward with 168 such experts, 18 active, 52 vs 35 ms: grouped stays), and
    always below width 8 (672 experts of width 2, 76 active: a training step took minutes grouped, a
    few seconds dense)."""
    width = w2.shape[-1]
    return x.device.type == "cpu" and (width < 8 or width < 16 and w2.shape[0] <= EVERY_EXPERT_MAX_RATIO * top_k)


def _every_expert(x, weights, experts, w13, w2, act, gated, b13):
    """Every expert on every token as two dense matmuls, the unselected ones weighted 0. (modeling_moefy's
    `_dense_masked_moe` computes the same on its own: that file must run where moefy_kernels is absent.)"""
    tokens, (num, dim, width) = x.shape[0], w2.shape
    z = F.linear(x, w13.reshape(-1, dim)).view(tokens, num, -1)
    h = _glu(z if b13 is None else z + b13, act, gated)
    mask = torch.zeros(tokens, num, 1, dtype=x.dtype, device=x.device)
    h = h * mask.scatter(1, experts[..., None], weights[..., None])
    return F.linear(h.reshape(tokens, num * width), w2.permute(1, 0, 2).reshape(dim, num * width))


def experts_torch(hidden, weights, experts, w13, w2, activation, gated, b13=None):
    x, w13, w2, weights = hidden.float(), w13.float(), w2.float(), weights.float()
    b13 = None if b13 is None else b13.float()
    if x.shape[0] <= PER_TOKEN_MAX:
        out = torch.zeros_like(x)
        for t, row in enumerate(experts.tolist()):
            for j, e in enumerate(row):
                out[t] += weights[t, j] * expert_mlp(x[t], w13[e], w2[e], activation, gated,
                                                     None if b13 is None else b13[e])
        return out
    if _every_expert_is_faster(x, w2, experts.shape[1]):
        return _every_expert(x, weights, experts, w13, w2, activation_fn(activation), gated, b13)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of_slot = order // experts.shape[1]
    counts = torch.bincount(flat, minlength=w13.shape[0])
    row_bias = None if b13 is None else b13.index_select(0, flat[order])
    y = _grouped(x.index_select(0, token_of_slot), weights.reshape(-1)[order, None], row_bias, counts, w13, w2,
                 activation_fn(activation), gated)
    return torch.zeros_like(x).index_add(0, token_of_slot, y)
