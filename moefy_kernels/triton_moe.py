"""Fused sparse-expert forward in Triton: route → align → grouped GEMM + GLU → grouped GEMM + weight → Σ_k.

In the spirit of vLLM's fused_moe, ScatterMoE and σ-MoE's CVMM, written for moefy's block semantics:

1. `_route_kernel`: one program per token: scores (softmax | sigmoid) → k rounds of argmax → combine
   weights (unit | prob | renormalize), all in fp32.
2. `align`: (token, slot) pairs sorted by expert, each expert's run padded to BLOCK_M in the *index list*
   only (weights and activations are never copied); pure tensor ops, no host sync: the grid is sized
   from the worst case and surplus blocks exit at once.
3. `_expert_up_kernel`: grouped GEMM x · W13[e]ᵀ with the gate and up accumulators sharing each input
   tile, activation and product in the epilogue (SwiGLU / GeGLU; or act(x·W1ᵀ) when not gated).
4. `_expert_down_kernel`: grouped GEMM h · W2[e]ᵀ, routing weight in the epilogue, each row written to
   its own (token, slot) position, so the sum over k that follows is a fixed-order, deterministic sum.

When T·k is small next to the number of experts, alignment would mostly add padding: `_gemv_up_kernel` /
`_gemv_down_kernel` take one (token, slot) pair per program instead (no tl.dot, so any width works), the
first split along the hidden dimension into fp32 partials so that a single token still fills the GPU, the
second summing them in order with the activation fused into its loads.
Accumulation is fp32 for bf16/fp16/fp32 inputs; fp32 inputs multiply in IEEE fp32 (no TF32).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from moefy_kernels.routing import COMBINES, check_semantics

ACTIVATION_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
SMALL_BATCH_PAIRS = 32  # T·k up to this: one program per (token, slot) pair, no alignment
BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 64
GEMV_BLOCK_N, GEMV_BLOCK_K = 16, 256
GEMV_PROGRAMS_PER_SM = 8  # small-batch programs per multiprocessor the hidden dimension is split to reach


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:
        return x * tl.sigmoid(x)
    elif ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(y) = 2σ(2y) − 1
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation (upcast first where the interpreter mishandles half types)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, experts_ptr, num_experts, stride_t,
                  TOP_K: tl.constexpr, SOFTMAX: tl.constexpr, COMBINE: tl.constexpr, BLOCK_E: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < num_experts
    logits = tl.load(logits_ptr + t * stride_t + offs, mask=valid, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        z = tl.exp(logits - tl.max(logits, axis=0))
        scores = z / tl.sum(z, axis=0)
    else:
        scores = tl.sigmoid(logits)
    scores = tl.where(valid, scores, float("-inf"))
    total = 0.0
    for j in tl.static_range(TOP_K):
        best = tl.max(scores, axis=0)
        idx = tl.min(tl.where(scores == best, offs, BLOCK_E), axis=0)  # lowest index among ties
        tl.store(experts_ptr + t * TOP_K + j, idx)
        tl.store(weights_ptr + t * TOP_K + j, best)
        total += best
        scores = tl.where(offs == idx, float("-inf"), scores)
    if COMBINE == 0:  # unit (1: prob keeps the scores)
        for j in tl.static_range(TOP_K):
            tl.store(weights_ptr + t * TOP_K + j, 1.0)
    elif COMBINE == 2:  # renormalize
        for j in tl.static_range(TOP_K):
            tl.store(weights_ptr + t * TOP_K + j, tl.load(weights_ptr + t * TOP_K + j) / total)


def route_triton(router_logits: torch.Tensor, top_k: int, scoring: str, combine: str):
    """(weights [T, k] fp32, expert ids [T, k] int64), the semantics of `moefy_kernels.routing.route`."""
    check_semantics(scoring, combine)
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    experts = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens:
        _route_kernel[(num_tokens,)](router_logits, weights, experts, num_experts, router_logits.stride(0),
                                     TOP_K=top_k, SOFTMAX=scoring == "softmax", COMBINE=COMBINES.index(combine),
                                     BLOCK_E=max(16, triton.next_power_of_2(num_experts)))
    return weights, experts


def align(experts: torch.Tensor, num_experts: int, block_m: int):
    """Slots sorted by expert, each expert's run padded to `block_m` with the sentinel T·k.

    Returns (sorted_slots [P], block_expert [P / block_m]) where P = T·k + E·(block_m − 1) rounded up
    to block_m: the worst case, known without reading the routing back to the host. Blocks past the
    used ones carry the expert id `num_experts` and exit at once.
    """
    flat = experts.reshape(-1)
    num_slots = flat.numel()
    # scatter_add, not bincount: bincount reads the maximum id back to size its output (a host sync on CUDA)
    counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    run_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_slots, device=flat.device) - run_start[sorted_experts]
    capacity = triton.cdiv(num_slots + num_experts * (block_m - 1), block_m) * block_m
    sorted_slots = torch.full((capacity,), num_slots, dtype=torch.int64, device=flat.device)
    sorted_slots[(padded_end - padded)[sorted_experts] + rank] = order
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)  # == num_experts past the end
    return sorted_slots, block_expert


@triton.jit
def _add_bias(acc_gate, acc_up, b_ptr, e, cols, col_ok, width, stride_be, GATED: tl.constexpr):
    """The expert's input biases on the gate (or only) and up accumulators; [N] or [M, N] alike."""
    b_base = b_ptr + e.to(tl.int64) * stride_be
    acc_gate += tl.load(b_base + cols, mask=col_ok, other=0.0).to(tl.float32)
    if GATED:
        acc_up += tl.load(b_base + width + cols, mask=col_ok, other=0.0).to(tl.float32)
    return acc_gate, acc_up


@triton.jit
def _expert_up_kernel(x_ptr, w_ptr, b_ptr, h_ptr, slots_ptr, block_expert_ptr, num_slots, num_experts, hidden,
                      width, stride_xt, stride_we, stride_wo, stride_be, stride_ht,
                      TOP_K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      IEEE: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[row] = act(x W_gate[e]ᵀ + b_gate) ⊙ (x W_up[e]ᵀ + b_up) for the aligned rows of one expert block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= num_experts:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slots_ptr + rows)
    live = slots < num_slots
    tokens = slots // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = (k0 + offs_k) < hidden
        x = tl.load(x_ptr + tokens[:, None].to(tl.int64) * stride_xt + (k0 + offs_k)[None, :],
                    mask=live[:, None] & k_ok[None, :], other=0.0)
        w_gate = tl.load(w_base + cols[None, :] * stride_wo + (k0 + offs_k)[:, None],
                         mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc_gate = _dot(x, w_gate, acc_gate, IEEE, UPCAST)
        if GATED:
            w_up = tl.load(w_base + (cols + width)[None, :] * stride_wo + (k0 + offs_k)[:, None],
                           mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc_up = _dot(x, w_up, acc_up, IEEE, UPCAST)
    if HAS_BIAS:
        acc_gate, acc_up = _add_bias(acc_gate, acc_up, b_ptr, e, cols[None, :], col_ok[None, :], width, stride_be,
                                     GATED)
    h = _activation(acc_gate, ACT)
    if GATED:
        h = h * acc_up
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_ht + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=live[:, None] & col_ok[None, :])


@triton.jit
def _expert_down_kernel(h_ptr, w_ptr, out_ptr, slots_ptr, block_expert_ptr, weights_ptr, num_slots, num_experts,
                        hidden, width, stride_ht, stride_we, stride_wo, stride_os,
                        IEEE: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[slot] = weight[slot] · h[row] W2[e]ᵀ, each row written to its (token, slot) position."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= num_experts:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slots_ptr + rows)
    live = slots < num_slots
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k_ok = (k0 + offs_k) < width
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_ht + (k0 + offs_k)[None, :],
                    mask=live[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wo + (k0 + offs_k)[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = _dot(h, w, acc, IEEE, UPCAST)
    weight = tl.load(weights_ptr + slots, mask=live, other=0.0)
    tl.store(out_ptr + slots[:, None].to(tl.int64) * stride_os + cols[None, :], acc * weight[:, None],
             mask=live[:, None] & col_ok[None, :])


@triton.jit
def _gemv_up_kernel(x_ptr, w_ptr, z_ptr, experts_ptr, hidden, width, k_chunk, stride_xt, stride_we, stride_wo,
                    stride_zs, stride_zp, TOP_K: tl.constexpr, GATED: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Small-batch path, first half: one (token, slot) pair × BLOCK_N rows × one chunk of the hidden dimension
    per program; the partial gate (and up) dot products go to z[split, pair] in fp32, to be summed in fixed
    order, activated and multiplied by the down kernel (split-K: at T = 1 a few pairs alone would leave most
    of the GPU idle)."""
    pair = tl.program_id(0)
    split = tl.program_id(2)
    e = tl.load(experts_ptr + pair).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xt
    w_base = w_ptr + e * stride_we
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_end = tl.minimum(hidden, (split + 1) * k_chunk)
    for k0 in range(split * k_chunk, k_end, BLOCK_K):
        k_ok = (k0 + offs_k) < k_end
        x = tl.load(x_row + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        mask = col_ok[:, None] & k_ok[None, :]
        w_gate = tl.load(w_base + cols[:, None] * stride_wo + (k0 + offs_k)[None, :], mask=mask, other=0.0)
        acc_gate += tl.sum(w_gate.to(tl.float32) * x[None, :], axis=1)
        if GATED:
            w_up = tl.load(w_base + (cols + width)[:, None] * stride_wo + (k0 + offs_k)[None, :], mask=mask, other=0.0)
            acc_up += tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
    z_row = z_ptr + split.to(tl.int64) * stride_zs + pair.to(tl.int64) * stride_zp
    tl.store(z_row + cols, acc_gate, mask=col_ok)
    if GATED:
        tl.store(z_row + width + cols, acc_up, mask=col_ok)


@triton.jit
def _gemv_down_kernel(z_ptr, b_ptr, w_ptr, out_ptr, experts_ptr, weights_ptr, hidden, width, splits,
                      stride_zs, stride_zp, stride_be, stride_we, stride_wo, stride_os,
                      GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Small-batch path, second half: h = act(Σ_split z_gate + b_gate) ⊙ (Σ_split z_up + b_up) for each block
    of the expert's width (the splits summed in order: deterministic), then out[pair] = weight · h W2[e]ᵀ."""
    pair = tl.program_id(0)
    e = tl.load(experts_ptr + pair).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e * stride_we
    z_pair = z_ptr + pair.to(tl.int64) * stride_zp
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k_ok = (k0 + offs_k) < width
        gate = tl.zeros((BLOCK_K,), dtype=tl.float32)
        up = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for s in range(splits):
            gate += tl.load(z_pair + s * stride_zs + k0 + offs_k, mask=k_ok, other=0.0)
            if GATED:
                up += tl.load(z_pair + s * stride_zs + width + k0 + offs_k, mask=k_ok, other=0.0)
        if HAS_BIAS:
            gate, up = _add_bias(gate, up, b_ptr, e, k0 + offs_k, k_ok, width, stride_be, GATED)
        h = _activation(gate, ACT)
        if GATED:
            h = h * up
        w = tl.load(w_base + cols[:, None] * stride_wo + (k0 + offs_k)[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    weight = tl.load(weights_ptr + pair)
    tl.store(out_ptr + pair.to(tl.int64) * stride_os + cols, acc * weight, mask=col_ok)


@functools.cache
def _multiprocessors(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _gemv_splits(pairs: int, width: int, hidden: int, device: torch.device) -> tuple[int, int]:
    """(splits of the hidden dimension, chunk length): enough programs to fill the GPU
    (GEMV_PROGRAMS_PER_SM per multiprocessor), each chunk a whole number of GEMV_BLOCK_K. The interpreter
    counts as a GPU of 2 multiprocessors, so that tests split too."""
    blocks = triton.cdiv(hidden, GEMV_BLOCK_K)
    target = GEMV_PROGRAMS_PER_SM * (_multiprocessors(device.index) if device.type == "cuda" else 2)
    splits = max(1, min(blocks, triton.cdiv(target, pairs * triton.cdiv(width, GEMV_BLOCK_N))))
    per_split = triton.cdiv(blocks, splits)
    return triton.cdiv(blocks, per_split), per_split * GEMV_BLOCK_K


def experts_triton(hidden: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor, activation: str, gated: bool, b13: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j weights[t, j] · expert_{experts[t, j]}(hidden[t]) → [T, H] fp32, for routing already decided."""
    num_tokens, dim = hidden.shape
    num_experts, width, top_k = w2.shape[0], w2.shape[2], experts.shape[1]
    num_slots = num_tokens * top_k
    act = ACTIVATION_IDS[activation]
    out = torch.empty(num_slots, dim, dtype=torch.float32, device=hidden.device)
    if num_slots == 0:
        return out.reshape(num_tokens, dim)
    weights = weights.reshape(-1).float().contiguous()
    experts = experts.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()  # the kernels read [E, H, I] rows; decode_layout is CPU's
    bias = dict(HAS_BIAS=b13 is not None)
    b13 = w13 if b13 is None else b13.contiguous()  # any pointer will do when HAS_BIAS is off
    if num_slots <= SMALL_BATCH_PAIRS:
        flat = experts.reshape(-1).contiguous()
        splits, chunk = _gemv_splits(num_slots, width, dim, hidden.device)
        z = torch.empty(splits, num_slots, w13.shape[1], dtype=torch.float32, device=hidden.device)
        _gemv_up_kernel[(num_slots, triton.cdiv(width, GEMV_BLOCK_N), splits)](
            hidden, w13, z, flat, dim, width, chunk, hidden.stride(0), w13.stride(0), w13.stride(1), z.stride(0),
            z.stride(1), TOP_K=top_k, GATED=gated, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=GEMV_BLOCK_K)
        _gemv_down_kernel[(num_slots, triton.cdiv(dim, GEMV_BLOCK_N))](
            z, b13, w2, out, flat, weights, dim, width, splits, z.stride(0), z.stride(1), b13.stride(0),
            w2.stride(0), w2.stride(1), out.stride(0), GATED=gated, ACT=act, **bias, BLOCK_N=GEMV_BLOCK_N,
            BLOCK_K=GEMV_BLOCK_K)
    else:
        slots, block_expert = align(experts, num_experts, BLOCK_M)
        h = torch.empty(slots.numel(), width, dtype=hidden.dtype, device=hidden.device)
        flags = dict(IEEE=hidden.dtype == torch.float32, UPCAST=_interpreting(), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                     BLOCK_K=BLOCK_K)
        _expert_up_kernel[(block_expert.numel(), triton.cdiv(width, BLOCK_N))](
            hidden, w13, b13, h, slots, block_expert, num_slots, num_experts, dim, width, hidden.stride(0),
            w13.stride(0), w13.stride(1), b13.stride(0), h.stride(0), TOP_K=top_k, GATED=gated, ACT=act, **bias,
            **flags)
        _expert_down_kernel[(block_expert.numel(), triton.cdiv(dim, BLOCK_N))](
            h, w2, out, slots, block_expert, weights, num_slots, num_experts, dim, width,
            h.stride(0), w2.stride(0), w2.stride(1), out.stride(0), **flags)
    return out.view(num_tokens, top_k, dim).sum(dim=1)


def compile_for_gpu(arch: int, dtype: str = "bf16") -> str:
    """Compile every kernel to a cubin for CUDA compute capability `arch` (80, 90, …) with the block sizes
    used above; no GPU needed. Returns the kernel names. CI runs this where it has no GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fp32_pointers = {"out_ptr", "weights_ptr", "logits_ptr", "z_ptr"}
    index_pointers = {"slots_ptr", "block_expert_ptr", "experts_ptr"}
    meta = {"TOP_K": 2, "GATED": True, "ACT": 0, "HAS_BIAS": True, "IEEE": dtype == "fp32", "UPCAST": False,
            "SOFTMAX": True, "COMBINE": 2, "BLOCK_E": 16, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}
    gemv = {"BLOCK_N": GEMV_BLOCK_N, "BLOCK_K": GEMV_BLOCK_K}
    names = []
    for kernel in (_route_kernel, _expert_up_kernel, _expert_down_kernel, _gemv_up_kernel, _gemv_down_kernel):
        constexprs = {**meta, **(gemv if kernel in (_gemv_up_kernel, _gemv_down_kernel) else {})}
        signature = {p.name: "constexpr" if p.is_constexpr else "*fp32" if p.name in fp32_pointers else
                     "*i64" if p.name in index_pointers else f"*{dtype}" if p.name.endswith("_ptr") else "i32"
                     for p in kernel.params}
        source = ASTSource(kernel, signature, {k: constexprs[k] for k, v in signature.items() if v == "constexpr"})
        triton.compile(source, target=GPUTarget("cuda", arch, 32))
        names.append(kernel.__name__)
    return " ".join(names)
