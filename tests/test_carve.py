"""carve and the layer-by-layer calibration pipeline on tiny random models."""

from pathlib import Path

import pytest
import torch

import moefy
from moefy.arch import adapter_for
from moefy.calib import load_calibration
from moefy.transforms.routers import ridge_router, top_k_recall
from moefy.io.checkpoint import open_source
from moefy.transforms.carve import balanced_clusters
from tests.conftest import FAMILY_CONFIGS, assert_matches_dense, load_dense, logits, random_ids, read_json, run_cli


def _recipe(directory: Path) -> Path:
    path = directory / "carve.yaml"
    path.write_text("transforms:\n  - carve: {experts: 4, shared: 0, top_k: 2}\n"
                    "calibration: {samples: 4, seq_len: 32}\n")
    return path


def _carve(tiny_dir, text_file, out, *sets, fmt="auto"):
    code, stdout, stderr = run_cli("convert", tiny_dir, "-r", _recipe(out.parent), "-o", out, "--calib", text_file,
                                   *[a for s in sets for a in ("--set", s)], "--format", fmt)
    assert code == 0, stderr
    return read_json(out / "moefy.json")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", *FAMILY_CONFIGS])
def test_layer_inputs_match_the_dense_model(tiny, text_file, family):
    """The meta-device runner reproduces what the real model feeds each MLP, bit for bit — also where the
    layer norms or scales the MLP's output before the residual add (Gemma 2/3, OLMo 2, Granite), passes
    arguments positionally (GPT-2) or runs attention and MLP in parallel (GPT-NeoX)."""
    overrides = {"sliding_window": 8} if family == "mistral" else FAMILY_CONFIGS.get(family, {})
    path = tiny(family, **overrides)
    ckpt = open_source(path)
    calibration = load_calibration(ckpt, str(text_file), 3, 24, batch_size=2)
    model = load_dense(path)
    adapter = adapter_for(ckpt.config)
    layers = model.get_submodule(adapter.layers_prefix)
    seen = {}
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, []).append(a[0]))
    with torch.no_grad():
        for start in range(0, 3, 2):
            model(input_ids=calibration.tokens[start:start + 2])
    runner = calibration.runner(ckpt, adapter)
    for i, layer in enumerate(layers):
        expected = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[i]])
        torch.testing.assert_close(runner.mlp_inputs(i), expected, atol=1e-6, rtol=0)
        runner.advance(layer.mlp)


@pytest.mark.parametrize("family,fmt", [("llama", "native"), ("llama", "mixtral"), ("llama", "qwen2_moe"),
                                        ("llama", "granitemoeshared"),
                                        ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe"), ("mistral", "mixtral")])
def test_carve_at_full_activation_is_exact(tiny, text_file, tmp_path, family, fmt):
    path = tiny(family)
    record = _carve(path, text_file, tmp_path / "out", "transforms.0.carve.shared=0",
                    "transforms.0.carve.top_k=4", fmt=fmt)
    assert record["format"]["name"] == fmt and record["format"]["exact"]
    assert record["calibration"]["tokens"] == 4 * 32
    assert_matches_dense(tmp_path / "out", path)


def test_carve_full_activation_with_shared_and_compensation_stays_exact(tiny, text_file, tmp_path):
    path = tiny("llama")
    _carve(path, text_file, tmp_path / "out", "transforms.0.carve.shared=1", "transforms.0.carve.top_k=3",
           "transforms.0.carve.compensation.refit_down=true", "transforms.0.carve.compensation.bias=true")
    import moefy

    ids = random_ids()
    torch.testing.assert_close(logits(moefy.load(tmp_path / "out"), ids), logits(load_dense(path), ids),
                               atol=1e-4, rtol=0)  # the refit is a least-squares solve: exact up to its rounding


def test_partial_carve_records_diagnostics_and_compensation_helps(tiny, text_file, tmp_path):
    path = tiny("llama", intermediate_size=256)
    plain = _carve(path, text_file, tmp_path / "a", "transforms.0.carve.experts=8", "transforms.0.carve.shared=1",
                   "transforms.0.carve.top_k=2")
    comp = _carve(path, text_file, tmp_path / "b", "transforms.0.carve.experts=8", "transforms.0.carve.shared=1",
                  "transforms.0.carve.top_k=2", "transforms.0.carve.compensation.refit_down=true",
                  "transforms.0.carve.compensation.bias=true")
    for layer in comp["layers"].values():
        assert layer["rel_error_final"] < layer["rel_error"]
        assert 0 <= layer["router_recall"] <= 1 and layer["expert_load_max_over_mean"] >= 1
    assert comp["format"]["name"] == "native" and "output bias" in comp["format"]["reason"]
    assert plain["format"]["name"] == "granitemoeshared"  # shared + renormalised flat weights: exact standard
    ids = random_ids()
    carved, dense = logits(moefy.load(tmp_path / "b"), ids), logits(load_dense(path), ids)
    assert (carved - dense).abs().max() > 1e-4  # 3/8 active really drops something


def test_sequential_mode_feeds_carved_outputs_forward(tiny, text_file, tmp_path):
    path = tiny("llama", num_hidden_layers=3)
    seq = _carve(path, text_file, tmp_path / "s", "transforms.0.carve.top_k=1", "transforms.0.carve.shared=0")
    ind = _carve(path, text_file, tmp_path / "i", "transforms.0.carve.top_k=1", "transforms.0.carve.shared=0",
                 "calibration.mode=independent")
    assert seq["layers"]["0"]["rel_error"] == ind["layers"]["0"]["rel_error"]  # same inputs at layer 0
    assert seq["layers"]["2"]["rel_error"] != ind["layers"]["2"]["rel_error"]


def test_carve_is_deterministic(tiny, text_file, tmp_path):
    path = tiny("llama")
    _carve(path, text_file, tmp_path / "a", "transforms.0.carve.top_k=2")
    _carve(path, text_file, tmp_path / "b", "transforms.0.carve.top_k=2")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_balanced_clusters_partition_into_equal_groups():
    profiles = torch.randn(48, 10, generator=torch.Generator().manual_seed(0))
    groups, reps = balanced_clusters(profiles, 6, 8, n_init=2, seed=0)
    assert sorted(torch.cat(groups).tolist()) == list(range(48))
    assert all(len(g) == 8 for g in groups)
    assert all(int(r) in g.tolist() for r, g in zip(reps, groups))


def test_ridge_router_recovers_a_linear_map_and_recall_counts_overlap():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(500, 16, generator=gen), torch.randn(6, 16, generator=gen)
    torch.testing.assert_close(ridge_router(x, x @ w.T, ridge=1e-9), w, atol=1e-4, rtol=0)
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert top_k_recall(scores, torch.tensor([[3.0, 0.0, 2.0, 1.0]]), 2) == 0.5
    assert top_k_recall(scores, scores, 4) == 1.0


@pytest.mark.parametrize("sets,needle", [
    (["transforms.0.carve.shared=4"], "must be smaller than carve.experts"),
    (["transforms.0.carve.top_k=4", "transforms.0.carve.shared=1"], "exceeds the 3 routed experts"),
    (["transforms.0.carve.experts=5"], "does not divide the MLP width 128"),
    (["calibration.samples=500"], "fewer than the 500 samples"),
])
def test_carve_bad_input(tiny, text_file, tmp_path, sets, needle):
    code, _, stderr = run_cli("convert", tiny("llama"), "-r", _recipe(tmp_path), "-o", tmp_path / "o", "--calib",
                              text_file, *[a for s in sets for a in ("--set", s)])
    assert code == 2 and needle in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", [None, ""])
def test_carve_needs_calibration_data(tiny, tmp_path, content):
    args = []
    if content is not None:
        (tmp_path / "empty.txt").write_text(content)
        args = ["--calib", tmp_path / "empty.txt"]
    code, _, stderr = run_cli("convert", tiny("llama"), "-r", _recipe(tmp_path), "-o", tmp_path / "o", *args)
    assert code == 2 and ("needs calibration data" in stderr or "is empty" in stderr), stderr


def test_reported_errors_are_those_of_the_block_that_is_written():
    """carve's diagnostics come from cached activations; they must equal the written block's forward."""
    from moefy.moe.layer import DenseMLP
    from moefy.plan import SourceInfo
    from moefy.transforms.base import LayerData
    from moefy.transforms.carve import Carve, CarveOptions

    gen = torch.Generator().manual_seed(0)
    mlp = DenseMLP(torch.randn(64, 16, generator=gen), torch.randn(64, 16, generator=gen),
                   torch.randn(16, 64, generator=gen), "silu")
    x = torch.randn(300, 16, generator=gen)
    carve = Carve(CarveOptions(experts=8, shared=2, top_k=2, compensation={"refit_down": True, "bias": True}))
    source = SourceInfo(adapter_for({"model_type": "llama"}), {"intermediate_size": 64, "num_hidden_layers": 1})
    with pytest.raises(RuntimeError, match="before setup"):
        carve.apply(0, mlp, LayerData(x, mlp))
    carve.check(source)
    carve.setup(source, carve.plan(None, source))
    moe = carve.apply(0, mlp, LayerData(x, mlp))
    dense = mlp.forward(x)
    error = float((moe.forward(x) - dense).pow(2).sum() / dense.pow(2).sum())
    assert moe.stats["rel_error_final"] == pytest.approx(error, rel=1e-3, abs=1e-5)
    assert moe.stats["rel_error_final"] < moe.stats["rel_error"]


def test_adaptive_budget_keeps_the_mean_and_goes_native(tiny, text_file, tmp_path):
    path = tiny("llama", num_hidden_layers=4, intermediate_size=256)
    record = _carve(path, text_file, tmp_path / "out", "transforms.0.carve.experts=8",
                    "transforms.0.carve.top_k=3", "transforms.0.carve.budget=adaptive",
                    "transforms.0.carve.budget_samples=2")
    ks = [layer["top_k"] for layer in record["layers"].values()]
    assert sum(ks) == 4 * 3 and all(1 <= k <= 8 for k in ks)
    assert record["format"]["name"] == "native" and "same number of experts" in record["format"]["reason"]
    code, _, stderr = run_cli("validate", tmp_path / "out")
    assert code == 0, stderr
