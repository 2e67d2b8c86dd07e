import os

import pytest
import torch

from moefy.moe.modeling_moefy import _dense_masked_moe
from moefy_kernels import BACKENDS, cpu_decode, moe_forward, route, torch_ops


def _weights(e, i, h, gated=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, (2 if gated else 1) * i, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, generator=g) / i ** 0.5
    return w13, w2


@pytest.mark.parametrize("combine", ["unit", "prob", "renormalize"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_weights(scoring, combine):
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    weights, experts = route(logits, 3, scoring=scoring, combine=combine)
    probs = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    assert torch.equal(experts, probs.topk(3, dim=-1).indices)
    if combine == "unit":
        assert torch.equal(weights, torch.ones(9, 3))
    elif combine == "renormalize":
        torch.testing.assert_close(weights.sum(-1), torch.ones(9))
    else:
        torch.testing.assert_close(weights, probs.topk(3, dim=-1).values)


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("experts,top_k", [(4, 1), (4, 4), (16, 2), (16, 4)])
@pytest.mark.parametrize("combine", ["unit", "prob", "renormalize"])
@pytest.mark.parametrize("with_shared", [False, True])
def test_torch_matches_reference(tokens, experts, top_k, combine, with_shared):
    h, i = 32, 16
    w13, w2 = _weights(experts, i, h)
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(2))
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(3))
    shared = (torch.randn(2 * 24, h) / h ** 0.5, torch.randn(h, 24) / 24 ** 0.5) if with_shared else None
    scales = torch.rand(experts) + 0.5
    kwargs = dict(combine=combine, shared=shared, expert_scales=scales)
    ref = moe_forward(x, logits, w13, w2, top_k, backend="reference", **kwargs)
    fast = moe_forward(x, logits, w13, w2, top_k, backend="torch", **kwargs)
    fallback = _dense_masked_moe(x, logits, w13, w2, top_k, scoring="softmax", activation="silu", gated=True,
                                 **kwargs)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fallback, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens,experts,width", [(2, 6, 8), (40, 6, 8), (9, 16, 8), (10, 6, 6)])
@pytest.mark.parametrize("biased", [False, True])
def test_torch_backend_gradients_match_the_reference(monkeypatch, tokens, experts, width, biased):
    """The training path: gradients in the input, the weights, their biases and the routing weights equal
    the reference's (autograd through the plain loop) on each of torch's sparse paths: the gathered decode
    path (2 tokens), grouped matmuls with their own backward (16 experts for 9 tokens leave some without
    rows) and one matmul pair per expert (6-wide fp32 experts are not 16-byte aligned for the grouped
    matmul)."""
    monkeypatch.setattr(torch_ops, "_every_expert_is_faster", lambda *_: False)
    _assert_torch_matches_reference(tokens, experts, width, 2, biased, True, "silu")


@pytest.mark.parametrize("biased", [False, True])
def test_decode_with_experts_read_in_place_has_the_reference_gradients(monkeypatch, biased):
    """Big experts at decode are read in place (one matmul pair each): the training path's gradients too."""
    monkeypatch.setattr(torch_ops, "LOOP_MIN_EXPERT_BYTES", 0)
    monkeypatch.setattr(cpu_decode, "applies", lambda *_: False)
    _assert_torch_matches_reference(2, 6, 8, 2, biased, True, "silu")


@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu_tanh")])
@pytest.mark.parametrize("biased", [False, True])
def test_every_expert_path_matches_the_reference(monkeypatch, gated, activation, biased):
    """Narrow experts on CPU: every expert as two dense matmuls, masked — outputs and gradients as the reference."""
    monkeypatch.setattr(torch_ops, "_every_expert_is_faster", lambda *_: True)
    _assert_torch_matches_reference(30, 12, 8, 3, biased, gated, activation)


def test_every_expert_path_is_chosen_where_it_was_measured_faster():
    """The cases of scripts/bench_cpu_paths.py (512 tokens, docs/BENCHMARKS.md), each on its faster side."""
    x = torch.zeros(512, 576)
    assert torch_ops._every_expert_is_faster(x, torch.zeros(16, 576, 96), 16)  # mlpmoe: every expert selected
    assert not torch_ops._every_expert_is_faster(x, torch.zeros(16, 576, 96), 4)  # wide and sparse: grouped
    assert torch_ops._every_expert_is_faster(x, torch.zeros(48, 576, 24), 16)  # carve-50's routed part
    assert not torch_ops._every_expert_is_faster(x, torch.zeros(56, 576, 24), 8)  # carve-25's: grouped
    assert torch_ops._every_expert_is_faster(x, torch.zeros(192, 576, 8), 32)  # 8-wide: grouped costs 22×
    assert torch_ops._every_expert_is_faster(x, torch.zeros(672, 576, 2), 76)  # 2-wide: dense at any ratio
    assert not torch_ops._every_expert_is_faster(x.to("meta"), torch.zeros(128, 576, 8), 26)  # only on CPU


GATHER_CASES = [(1, 8, 2), (1, 8, 8), (3, 16, 2), (5, 8, 2), (8, 48, 16), (2, 768, 100)]


@pytest.mark.parametrize("tokens,experts,top_k", GATHER_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "decode"])
@pytest.mark.parametrize("gated,biased", [(True, False), (False, True)])
@pytest.mark.parametrize("read", ["gathered", "in-place", "fused"])
def test_gathered_decode_path_matches_the_reference(monkeypatch, tokens, experts, top_k, layout, gated, biased,
                                                    read):
    """Decode-sized batches (T ≤ GATHER_MAX_TOKENS) on the gathered path: one token, every expert selected,
    a union smaller than all experts, one that covers them all, a fine-grained 768 × 2 carve; w2 as given or
    in its decode layout, input biases, a shared expert, expert scales; experts copied into one block, read
    in place (as big ones are), or by the fused CPU kernel where it applies (SwiGLU, no biases, the decode
    layout) — the reference's output within fp32 tolerance."""
    assert tokens <= torch_ops.GATHER_MAX_TOKENS
    if read == "fused":
        if cpu_decode.kernel() is None:
            pytest.skip("the CPU decode kernel cannot be built here (no c++ / ninja)")
    else:
        monkeypatch.setattr(cpu_decode, "applies", lambda *_: False)
    monkeypatch.setattr(torch_ops, "LOOP_MIN_EXPERT_BYTES", 0 if read == "in-place" else 2**62)
    width = 2 if experts > 100 else 8
    w13, w2 = _weights(experts, width, 16, gated)
    w2 = torch_ops.decode_layout(w2, top_k) if layout == "decode" else w2
    b13 = torch.randn(experts, w13.shape[1], generator=torch.Generator().manual_seed(6)) if biased else None
    shared = (torch.randn((2 if gated else 1) * 12, 16) / 4, torch.randn(16, 12) / 12 ** 0.5)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(4))
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(5))
    kwargs = dict(gated=gated, activation="silu" if gated else "gelu", b13=b13, shared=shared,
                  expert_scales=torch.rand(experts) + 0.5, combine="prob")
    ref = moe_forward(x, logits, w13, w2, top_k, backend="reference", **kwargs)
    torch.testing.assert_close(moe_forward(x, logits, w13, w2, top_k, backend="torch", **kwargs), ref,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [None, "gated", "ungated"])
@pytest.mark.parametrize("tokens,experts,top_k,width,hidden", [(1, 8, 2, 8, 16), (1, 768, 128, 2, 40),
                                                             (3, 16, 4, 24, 33), (8, 6, 6, 5, 16)])
def test_fused_cpu_decode_kernel_matches_the_reference(tokens, experts, top_k, width, hidden, shared):
    """The C++ kernel on its own: odd hidden sizes (SIMD tails), 2-wide experts, several tokens, every
    expert selected, a shared expert (sigmoid-gated as Qwen2-MoE's, or a plain sum) in the same call; the
    reference's fp32 output within 1e-5, and the same bytes with 1 and 2 threads (its summation order does
    not depend on the thread count)."""
    if cpu_decode.kernel() is None:
        pytest.skip("the CPU decode kernel cannot be built here (no c++ / ninja)")
    g = torch.Generator().manual_seed(tokens + experts)
    w13 = torch.randn(experts, 2 * width, hidden, generator=g) / hidden ** 0.5
    # [E, I, H] in memory, as for a block that routes (top-1), whatever k this call selects
    w2 = torch_ops.decode_layout(torch.randn(experts, hidden, width, generator=g) / width ** 0.5, 1)
    x = torch.randn(tokens, hidden, generator=g)
    logits = torch.randn(tokens, experts, generator=g)
    weights, chosen = route(logits, top_k)
    ref = moe_forward(x, logits, w13, w2, top_k, backend="reference")
    extra = None
    if shared is not None:
        sg, su = (torch.randn(3 * width, hidden, generator=g) / hidden ** 0.5 for _ in range(2))
        s2 = cpu_decode.rows_layout(torch.randn(hidden, 3 * width, generator=g) / width ** 0.5)
        gate = torch.randn(1, hidden, generator=g) if shared == "gated" else None
        extra = (sg, su, s2, gate)
        assert cpu_decode.shared_applies(*extra)
        scale = torch.sigmoid(x @ gate.T) if gate is not None else 1.0
        ref = ref + scale * torch.nn.functional.linear(torch.nn.functional.silu(x @ sg.T) * (x @ su.T), s2)
    union = torch.unique(chosen)
    dense_w = torch.zeros(tokens, experts).scatter(1, chosen, weights).index_select(1, union)
    assert cpu_decode.applies(x, w13, w2, "silu", True, None)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(cpu_decode.swiglu_experts(x, dense_w, union, w13, w2, extra))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[0], outs[1])


def test_the_reused_gather_buffer_works_in_and_out_of_inference_mode():
    """The per-thread buffer first made under inference mode (`moefy validate`) is written outside it later."""
    w = torch.randn(8, 4, 16)
    with torch.inference_mode():
        torch.testing.assert_close(torch_ops._gather(w, torch.tensor([1, 3]), "test"), w[[1, 3]])
    torch.testing.assert_close(torch_ops._gather(w, torch.tensor([0, 2, 5]), "test"), w[[0, 2, 5]])


def test_decode_layout_keeps_values_and_shape():
    _, w2 = _weights(4, 8, 16)
    routed, every = torch_ops.decode_layout(w2, 2), torch_ops.decode_layout(w2, 4)
    assert torch.equal(routed, w2) and torch.equal(every, w2)
    assert routed.transpose(1, 2).is_contiguous()  # [E, I, H]: a selected expert is one block
    if cpu_decode.kernel() is not None:  # which reads every expert in place too
        assert every.transpose(1, 2).is_contiguous()
    else:
        assert every.permute(1, 0, 2).is_contiguous()  # [H, E, I]: the dense down matrix for MKL


def _assert_torch_matches_reference(tokens, experts, width, top_k, biased, gated, activation):
    w13, w2 = _weights(experts, width, 16, gated)
    b13 = torch.randn(experts, w13.shape[1], generator=torch.Generator().manual_seed(6)) if biased else None
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(4))
    weights, ids = route(torch.randn(tokens, experts, generator=torch.Generator().manual_seed(5)), top_k)
    outputs, grads = [], []
    for fn in (BACKENDS["reference"].experts, BACKENDS["torch"].experts):
        leaves = [t.clone().requires_grad_() for t in (x, weights, w13, w2, b13) if t is not None]
        y = fn(leaves[0], leaves[1], ids, leaves[2], leaves[3], activation, gated, *leaves[4:])
        y.pow(2).sum().backward()
        outputs.append(y.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_non_gated_experts(activation):
    w13, w2 = _weights(4, 16, 32, gated=False)
    x = torch.randn(10, 32)
    logits = torch.randn(10, 4)
    ref = moe_forward(x, logits, w13, w2, 2, activation=activation, gated=False, backend="reference")
    fast = moe_forward(x, logits, w13, w2, 2, activation=activation, gated=False, backend="torch")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_reference_is_the_definition():
    """One token, top-1, unit weight: the output is exactly that expert's SwiGLU MLP."""
    w13, w2 = _weights(3, 8, 16)
    x = torch.randn(1, 16)
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    out = moe_forward(x, logits, w13, w2, 1, combine="unit", backend="reference")
    gate, up = (x @ w13[1].T).chunk(2, dim=-1)
    torch.testing.assert_close(out, (torch.nn.functional.silu(gate) * up) @ w2[1].T)


def test_bad_backend_and_top_k():
    w13, w2 = _weights(4, 8, 16)
    with pytest.raises(ValueError, match="backend"):
        moe_forward(torch.randn(2, 16), torch.randn(2, 4), w13, w2, 1, backend="cuda-magic")
    with pytest.raises(ValueError, match="top_k"):
        moe_forward(torch.randn(2, 16), torch.randn(2, 4), w13, w2, 5)


triton_moe = pytest.importorskip("moefy_kernels.triton_moe", reason="triton is not installed (Linux only)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (atol, rtol) against the fp32 reference: fp32 differs only by summation order; half types round the
# input, the stored intermediate and the output.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (4e-2, 2e-2), torch.float16: (5e-3, 5e-3)}
# A covering set of the grid E ∈ {4, 16, 64} × k ∈ {1, 2, 4} × widths 16–256 × shared × T ∈ {1, 7, 64, 300}
# × unit/prob weights: the interpreter takes seconds per call, so every value appears, not every product.
TRITON_CASES = [  # tokens, experts, top_k, width, shared, combine, dtype
    (1, 4, 1, 16, False, "unit", torch.float32),
    (1, 64, 4, 256, True, "prob", torch.float32),
    (7, 16, 2, 32, True, "renormalize", torch.float32),
    (7, 4, 4, 64, False, "prob", torch.bfloat16),
    (64, 16, 4, 48, False, "unit", torch.float32),
    (64, 4, 2, 128, True, "renormalize", torch.bfloat16),
    (64, 64, 1, 16, True, "prob", torch.float16),
    (300, 64, 4, 16, False, "renormalize", torch.float32),
    (300, 16, 2, 256, True, "unit", torch.float32),
]


def _case(tokens, experts, width, shared, dtype, hidden=32, gated=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 2 if gated else 1
    w13 = torch.randn(experts, rows * width, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, width, generator=g) / width ** 0.5
    x = torch.randn(tokens, hidden, generator=g)
    logits = torch.randn(tokens, experts, generator=g)
    pair = (torch.randn(rows * 24, hidden, generator=g) / hidden ** 0.5,
            torch.randn(hidden, 24, generator=g) / 24 ** 0.5)
    move = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return move(x), logits.to(DEVICE), move(w13), move(w2), tuple(map(move, pair)) if shared else None


@pytest.mark.parametrize("tokens,experts,top_k,width,shared,combine,dtype", TRITON_CASES)
def test_triton_matches_reference(tokens, experts, top_k, width, shared, combine, dtype):
    x, logits, w13, w2, pair = _case(tokens, experts, width, shared, dtype)
    scales = (torch.rand(experts, generator=torch.Generator().manual_seed(5)) + 0.5).to(DEVICE, dtype)
    kwargs = dict(combine=combine, shared=pair, expert_scales=scales)
    ref = moe_forward(x.float(), logits, w13.float(), w2.float(), top_k, backend="reference",
                      **{**kwargs, "shared": pair and tuple(t.float() for t in pair)})
    out = moe_forward(x, logits, w13, w2, top_k, backend="triton", **kwargs)
    assert out.dtype == dtype and out.shape == x.shape
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("gated,biased", [(True, False), (False, True)])
def test_triton_small_batch_splits_the_hidden_dimension(gated, biased):
    """One token over a hidden dimension of several GEMV blocks (with a ragged tail): the up kernel's partial
    sums over hidden chunks, added in order by the down kernel, equal the reference."""
    hidden, width = 3 * triton_moe.GEMV_BLOCK_K + 40, 24
    splits, chunk = triton_moe._gemv_splits(2, width, hidden, torch.device(DEVICE))
    assert splits > 1 and (splits - 1) * chunk < hidden <= splits * chunk
    x, logits, w13, w2, pair = _case(1, 4, width, False, torch.float32, hidden=hidden, gated=gated)
    b13 = torch.randn(w13.shape[:2], generator=torch.Generator().manual_seed(4)).to(DEVICE) if biased else None
    kwargs = dict(gated=gated, activation="silu" if gated else "gelu", b13=b13)
    ref = moe_forward(x, logits, w13, w2, 2, backend="reference", **kwargs)
    torch.testing.assert_close(moe_forward(x, logits, w13, w2, 2, backend="triton", **kwargs), ref,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation,gated", [("gelu_tanh", True), ("gelu", False), ("relu", False),
                                              ("silu", False)])
@pytest.mark.parametrize("tokens", [3, 40])  # the small-batch path and the aligned path
def test_triton_activations(activation, gated, tokens):
    x, logits, w13, w2, pair = _case(tokens, 4, 16, True, torch.float32, gated=gated)
    kwargs = dict(activation=activation, gated=gated, shared=pair, scoring="sigmoid", combine="prob")
    ref = moe_forward(x, logits, w13, w2, 2, backend="reference", **kwargs)
    torch.testing.assert_close(moe_forward(x, logits, w13, w2, 2, backend="triton", **kwargs), ref,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu_tanh")])
@pytest.mark.parametrize("tokens", [2, 3, 40])  # torch: per-token and grouped; triton: small-batch and aligned
def test_expert_input_biases(backend, gated, activation, tokens):
    """GPT-2-style experts: each expert's slice of the dense up (and gate) bias, on both fast paths."""
    x, logits, w13, w2, pair = _case(tokens, 4, 16, True, torch.float32, gated=gated)
    g = torch.Generator().manual_seed(9)
    b13 = torch.randn(w13.shape[:2], generator=g).to(DEVICE)
    pair = (*pair, torch.randn(pair[0].shape[0], generator=g).to(DEVICE))
    kwargs = dict(activation=activation, gated=gated, shared=pair, b13=b13)
    ref = moe_forward(x, logits, w13, w2, 2, backend="reference", **kwargs)
    torch.testing.assert_close(moe_forward(x, logits, w13, w2, 2, backend=backend, **kwargs), ref,
                               atol=1e-5, rtol=1e-5)
    # the reference is the definition: top-1 with unit weight is that expert's biased MLP
    top1 = moe_forward(x, logits, w13, w2, 1, backend="reference", combine="unit", activation=activation,
                       gated=gated, b13=b13)
    e = int(logits[0].argmax())
    z = torch.nn.functional.linear(x[:1], w13[e], b13[e])
    act = {"silu": torch.nn.functional.silu, "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}
    h = act[activation](z[:, :16]) * z[:, 16:] if gated else act[activation](z)
    torch.testing.assert_close(top1[:1], h @ w2[e].T)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("combine", ["unit", "prob", "renormalize"])
def test_triton_routing_matches_torch(scoring, combine):
    logits = torch.randn(37, 12, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    weights, experts = triton_moe.route_triton(logits, 3, scoring, combine)
    ref_weights, ref_experts = route(logits, 3, scoring=scoring, combine=combine)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights)


def test_alignment_pads_only_the_index_list():
    experts = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 0]])  # 8 slots: expert 0 ×3, 1 ×1, 2 ×4
    slots, block_expert = triton_moe.align(experts, num_experts=4, block_m=4)
    assert slots.numel() == 8 + 4 * 3  # the worst case, sized without reading the routing back
    used = [(int(e), slots[i * 4:(i + 1) * 4].tolist()) for i, e in enumerate(block_expert) if e < 4]
    assert used == [(0, [1, 4, 7, 8]), (1, [3, 8, 8, 8]), (2, [0, 2, 5, 6])]  # 8 = the padding sentinel
    assert (block_expert[len(used):] == 4).all()


def test_triton_is_deterministic():
    x, logits, w13, w2, _ = _case(64, 16, 32, False, torch.float32)
    first = moe_forward(x, logits, w13, w2, 4, backend="triton")
    assert torch.equal(first, moe_forward(x, logits, w13, w2, 4, backend="triton"))


BAD_INPUTS = [
    (dict(w13=torch.randn(4, 30, 16)), "w13 must be"),
    (dict(w2=torch.randn(4, 8, 16)), "w13 must be"),
    (dict(hidden=torch.randn(2, 3, 16)), r"hidden must be \[T, H\]"),
    (dict(router_logits=torch.randn(2, 5)), "router_logits must be"),
    (dict(top_k=5), "top_k=5"),
    (dict(hidden=torch.randn(2, 16, dtype=torch.float64)), "float64"),
    (dict(w2=torch.randn(4, 16, 16).to(torch.bfloat16)), "w2 is torch.bfloat16"),
    (dict(w13=torch.randn(4, 16, 32).transpose(1, 2)), "last dimension must be contiguous"),
    (dict(shared=(torch.randn(8, 16), torch.randn(16, 8))), "shared must be"),
    (dict(expert_scales=torch.ones(3)), "expert_scales must be"),
    (dict(b13=torch.ones(4, 16)), r"b13 \(the experts' input biases\) must be"),
]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("override,message", BAD_INPUTS)
def test_bad_kernel_inputs_raise(backend, override, message):
    args = dict(hidden=torch.randn(2, 16), router_logits=torch.randn(2, 4), w13=torch.randn(4, 32, 16),
                w2=torch.randn(4, 16, 16), top_k=2)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        moe_forward(**args, backend=backend)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from moefy_kernels import resolve_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_backend("triton", "cpu")
    assert resolve_backend("auto", "cpu") == "torch"


@pytest.mark.parametrize("arch,dtype", [(80, "bf16"), (90, "bf16"), (90, "fp32")])  # fp16 is bf16's code path
def test_triton_kernels_compile_for_gpus(arch, dtype):
    """Every kernel compiles ahead of time to a cubin for A100 (sm80) / H100 (sm90) without a GPU: the
    interpreter accepts shapes and ops that the GPU compiler rejects (block sizes < 16, dtypes)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiling needs real JIT functions
    code = f"from moefy_kernels.triton_moe import compile_for_gpu; print(compile_for_gpu({arch}, {dtype!r}))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["_route_kernel", "_expert_up_kernel", "_expert_down_kernel", "_gemv_up_kernel",
                                   "_gemv_down_kernel"]


@pytest.mark.parametrize("width", [2, 6])  # strides grouped_mm cannot take: the per-expert fallback
def test_torch_backend_on_narrow_experts(monkeypatch, width):
    monkeypatch.setattr(torch_ops, "_every_expert_is_faster", lambda *_: False)
    w13, w2 = _weights(8, width, 32)
    x, logits = torch.randn(20, 32), torch.randn(20, 8)
    ref = moe_forward(x, logits, w13, w2, 2, backend="reference")
    torch.testing.assert_close(moe_forward(x, logits, w13, w2, 2, backend="torch"), ref, atol=1e-5, rtol=1e-5)
