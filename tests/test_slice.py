"""Fractal Fade and Compensated Pruning: their definitions, checked against the dense model they came from."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import moefy
from moefy.moe.layer import DenseMLP
from moefy.transforms.slice import Slice, SliceOptions, branch_widths, fade_keep_counts, neuron_scores
from tests.conftest import assert_matches_dense, logits, random_ids, read_json, run_cli


def _mlp(width=128, hidden=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DenseMLP(torch.randn(width, hidden, generator=g), torch.randn(width, hidden, generator=g),
                    torch.randn(hidden, width, generator=g), "silu")


def test_branch_widths_spread_the_remainder():
    assert branch_widths(10, 3) == [4, 3, 3]
    assert branch_widths(128, 16) == [8] * 16


def test_dyadic_fade_keeps_the_top_half_whole_and_hits_the_target():
    widths = [32] * 16
    order = list(range(16))
    keep = fade_keep_counts(widths, order, 0.2, "dyadic", 1)
    assert keep[:8] == [32] * 8  # level 0: the more important half keeps everything
    assert keep[8:12] == [keep[8]] * 4 and keep[12] <= keep[8]  # self-similar levels, decreasing
    assert abs(1 - sum(keep) / 512 - 0.2) < 0.01


def _set_up(transform: Slice) -> Slice:
    transform.setup(source=None, previous=None)  # slice reads nothing at setup; apply needs it to have run
    return transform


@pytest.mark.parametrize("schedule", ["dyadic", "geometric", "uniform"])
@pytest.mark.parametrize("target", [0.1, 0.3])
def test_fade_removes_the_target_fraction(schedule, target):
    transform = _set_up(Slice(SliceOptions(experts=8, fade={"target_removed": target, "schedule": schedule})))
    layer = transform.apply(0, _mlp())
    assert abs(layer.stats["neurons_removed_fraction"] - target) <= 0.02
    assert sum(layer.widths) == layer.mlp.width


def _zeroed_dense(src, out_dir, keep_fn):
    """Write a copy of SRC whose MLP down columns are multiplied by keep_fn(layer, mlp) (0 = removed)."""
    import shutil

    shutil.copytree(src, out_dir)
    weights = load_file(src / "model.safetensors")
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        mlp = DenseMLP(weights[p + "gate_proj.weight"], weights[p + "up_proj.weight"], weights[p + "down_proj.weight"],
                       "silu")
        weights[p + "down_proj.weight"] = mlp.down * keep_fn(mlp)
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def test_fade_equals_dense_with_the_faded_neurons_removed(tiny, tmp_path):
    src = tiny("llama")
    out = tmp_path / "fade"
    assert run_cli("convert", src, "-r", "mlpmoe-fade", "-o", out, "--set", "transforms.0.slice.experts=8")[0] == 0
    assert read_json(out / "config.json")["model_type"] == "moefy"  # unequal widths → native
    transform = _set_up(Slice(SliceOptions(experts=8, fade={"target_removed": 0.2})))

    def keep(mlp):
        kept = torch.zeros(mlp.width)
        scores = neuron_scores(mlp, "down_max")
        widths = branch_widths(mlp.width, 8)
        layer = transform.apply(0, mlp)
        for b, (start, k) in enumerate(zip([sum(widths[:i]) for i in range(8)], layer.widths)):
            idx = torch.arange(start, start + widths[b])
            kept[idx[torch.topk(scores[idx], k).indices]] = 1
        return kept

    reference = _zeroed_dense(src, tmp_path / "ref", keep)
    assert_matches_dense(out, reference)
    stats = read_json(out / "moefy.json")["layers"]["0"]
    assert abs(stats["neurons_removed_fraction"] - 0.2) < 0.02


@pytest.mark.parametrize("compensation,factor", [("sqrt", math.sqrt(8 / 6)), ("linear", 8 / 6), ("none", 1.0)])
def test_compensated_pruning_equals_scaled_dense(tiny, tmp_path, compensation, factor):
    src = tiny("llama")
    out = tmp_path / "pruned"
    code, _, err = run_cli("convert", src, "-r", "mlpmoe-compensated", "-o", out, "--set",
                           "transforms.0.slice.experts=8", "--set",
                           f"transforms.0.slice.prune.compensation={compensation}")
    assert code == 0, err
    config = read_json(out / "config.json")
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 6

    def keep(mlp):
        scores = neuron_scores(mlp, "down_max").view(8, 16).sum(1)
        dropped = torch.topk(scores, 2, largest=False).indices
        column = torch.full((8, 16), factor)
        column[dropped] = 0
        return column.reshape(-1)

    reference = _zeroed_dense(src, tmp_path / "ref", keep)
    ids = random_ids()
    assert_matches_dense(out, reference, ids)
    stats = read_json(out / "moefy.json")["layers"]["1"]
    assert len(stats["pruned_branches"]) == 2 and stats["scales"] == [round(factor, 6)] * 6


def test_compensated_pruning_native_matches_mixtral(tiny, tmp_path):
    src = tiny("llama")
    outs = {}
    for fmt in ("native", "mixtral"):
        outs[fmt] = tmp_path / fmt
        assert run_cli("convert", src, "-r", "mlpmoe-compensated", "-o", outs[fmt], "--format", fmt)[0] == 0
    ids = random_ids()
    native = logits(moefy.load(outs["native"]), ids)
    torch.testing.assert_close(native, logits(moefy.load(outs["mixtral"]), ids), atol=1e-5, rtol=0)
    # the scaled static MoE by its definition (one expert at a time) agrees with the fused path
    torch.testing.assert_close(native, logits(moefy.load(outs["native"], backend="reference"), ids), atol=1e-5,
                               rtol=0)
