"""fit_router after carve / slice / upcycle on tiny models: better recall, exact exports, MLP router, bad input."""

from pathlib import Path

import pytest
import torch
import yaml

from moefy.transforms.routers import ridge_router, routing_diagnostics
from moefy.moe.layer import DenseMLP, MoeLayer
from tests.conftest import assert_matches_dense, load_dense, logits, random_ids, read_json, run_cli

CARVE = {"carve": {"experts": 8, "shared": 0, "top_k": 2, "router": "representative"}}


def _convert(source, out: Path, transforms: list, *args, samples: int = 8, fmt: str = "auto"):
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(yaml.safe_dump({"transforms": transforms, "calibration": {"samples": samples, "seq_len": 32}}))
    return run_cli("convert", source, "-r", recipe, "-o", out, "--format", fmt, *args)


@pytest.mark.parametrize("method", ["least-squares", "logistic", "mlp"])
def test_fit_router_after_carve_raises_recall(tiny, text_file, tmp_path, method):
    path = tiny("llama", intermediate_size=256)
    code, _, stderr = _convert(path, tmp_path / "out", [CARVE, {"fit_router": {"method": method}}],
                               "--calib", text_file)
    assert code == 0, stderr
    record = read_json(tmp_path / "out" / "moefy.json")
    for layer in record["layers"].values():
        assert layer["fit_method"] == method
        assert layer["router_recall"] > layer["router_recall_before"]
        assert {"mass_coverage", "expert_load_max_over_mean", "expert_load_entropy", "rel_error"} <= layer.keys()
    expected = "native" if method == "mlp" else "mixtral"
    assert record["format"]["name"] == expected and record["format"]["exact"]
    code, _, stderr = run_cli("validate", tmp_path / "out")
    assert code == 0, stderr


def test_mlp_router_loads_with_remote_code(tiny, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    import moefy

    path = tiny("llama", intermediate_size=256)
    code, _, stderr = _convert(path, tmp_path / "out", [CARVE, {"fit_router": {"method": "mlp", "hidden": 16}}],
                               "--calib", text_file)
    assert code == 0, stderr
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    block = remote.model.layers[0].mlp
    assert block.router_in.weight.shape == (16, 64) and block.router_out.weight.abs().sum() > 0
    ids = random_ids()
    torch.testing.assert_close(logits(remote, ids), logits(moefy.load(tmp_path / "out"), ids), atol=1e-5, rtol=0)


def test_fit_router_turns_a_static_slice_into_a_routed_moe(tiny, text_file, tmp_path):
    path = tiny("qwen2", intermediate_size=256)
    slice_ = {"slice": {"experts": 8}}
    code, _, stderr = _convert(path, tmp_path / "routed", [slice_, {"fit_router": {"top_k": 3}}], "--calib", text_file)
    assert code == 0, stderr
    record = read_json(tmp_path / "routed" / "moefy.json")
    assert record["format"]["name"] == "qwen2_moe" and record["layers"]["0"]["top_k"] == 3
    assert record["layers"]["0"]["scales"] == [3.0] * 8  # k folded in: renormalised weights ≈ 1/k
    # every expert active: the fitted router is irrelevant, the MoE is still the dense MLP
    code, _, stderr = _convert(path, tmp_path / "all", [slice_, {"fit_router": {"top_k": 8}}], "--calib", text_file)
    assert code == 0, stderr
    assert_matches_dense(tmp_path / "all", path)


def test_fit_router_on_a_full_carve_stays_exact(tiny, text_file, tmp_path):
    path = tiny("llama")
    full = {"carve": {"experts": 4, "shared": 0, "top_k": 4}}
    code, _, stderr = _convert(path, tmp_path / "out", [full, {"fit_router": {}}], "--calib", text_file)
    assert code == 0, stderr
    assert_matches_dense(tmp_path / "out", path)


def test_standard_export_of_a_fitted_carve_tracks_native(tiny, text_file, tmp_path):
    """The temperature trick: renormalised softmax at small temperature ≈ unit weights of the same ranking."""
    path = tiny("llama", intermediate_size=256)
    ids = random_ids(length=32)
    dense = logits(load_dense(path), ids)
    errors = {}
    for fmt, fit in (("mixtral", {}), ("native", {"temperature": None})):
        code, _, stderr = _convert(path, tmp_path / fmt, [{"carve": {**CARVE["carve"], "combine": "unit"}},
                                                           {"fit_router": fit}], "--calib", text_file, fmt=fmt)
        if fmt == "mixtral":  # carve's unit weights are not Mixtral's; fit_router's temperature makes them so
            assert code == 2 and "unit weights" in stderr, stderr
            code, _, stderr = _convert(path, tmp_path / fmt, [CARVE, {"fit_router": fit}], "--calib", text_file,
                                       fmt=fmt)
        assert code == 0, stderr
        import moefy

        errors[fmt] = float((logits(moefy.load(tmp_path / fmt), ids) - dense).pow(2).mean())
    assert errors["mixtral"] == pytest.approx(errors["native"], rel=0.1)


def test_routing_diagnostics_of_a_perfect_router():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=gen)
    truth = torch.randn(4, 8, generator=gen)
    oracle = (x @ truth.T).exp()
    moe = MoeLayer(mlp=DenseMLP(None, torch.randn(8, 8), torch.randn(8, 8), "relu"), widths=[2] * 4,
                   scoring="softmax", top_k=2, combine="unit", router=ridge_router(x, (x @ truth.T)))
    stats = routing_diagnostics(moe, x, oracle, oracle)
    assert stats["router_recall"] > 0.95 and stats["mass_coverage"] > 0.6
    assert 0 < stats["expert_load_entropy"] <= 1 and stats["expert_load_max_over_mean"] >= 1


@pytest.mark.parametrize("transforms,samples,message", [
    ([{"fit_router": {}}], 8, "put it after carve, slice or upcycle"),
    ([CARVE, {"fit_router": {"method": "svm"}}], 8, "method"),
    ([CARVE, {"fit_router": {}}], 4, "needs at least 256 calibration tokens"),
    ([{"slice": {"experts": 8}}, {"fit_router": {}}], 8, "needs fit_router.top_k"),
    ([{"slice": {"experts": 8}}, {"fit_router": {"top_k": 9}}], 8, "exceeds the 8 experts"),
    ([CARVE, {"fit_router": {"top_k": 3}}], 8, "differs from the 2 experts"),
])
def test_bad_fit_router_input_exits_2(tiny, text_file, tmp_path, transforms, samples, message):
    code, _, stderr = _convert(tiny("llama", intermediate_size=256), tmp_path / "out", transforms, "--calib",
                               text_file, samples=samples)
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "out").exists()
