import pytest
import torch

from moefy.moe.modeling_moefy import _dense_masked_moe
from moefy_kernels import moe_forward, route


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
