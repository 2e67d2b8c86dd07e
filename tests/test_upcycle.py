"""upcycle: exact at initialisation in every router mode and export format; Drop-Upcycling; sources."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moefy.io.checkpoint import open_source
from tests.conftest import assert_matches_dense, read_json, run_cli

PROMPTS = [{"positive": ["def main(): return 0", "import numpy as np"], "negative": ["Once upon a time"]},
           {"positive": ["Once upon a time there was a fox"]},
           {"positive": ["The lazy dog sleeps"], "negative": ["x = 1"]},
           {"positive": ["Paris is the capital of France"]}]


def _upcycle(source, out: Path, options: dict, *args, calib_samples: int = 4):
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(yaml.safe_dump({"transforms": [{"upcycle": options}],
                                      "calibration": {"samples": calib_samples, "seq_len": 32}}))
    return run_cli("convert", source, "-r", recipe, "-o", out, *args)


def _prompts_file(directory: Path, entries=PROMPTS) -> Path:
    path = directory / "prompts.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("options", [
    {"experts": 4, "top_k": 1},
    {"experts": 4, "top_k": 2, "router": "zero"},
    {"experts": 4, "top_k": 4},
    {"experts": 8, "top_k": 4, "granularity": 2},
    {"experts": 16, "top_k": 4, "granularity": 4},
    {"experts": 4, "top_k": 2, "shared": "copy"},
    {"experts": 8, "top_k": 2, "granularity": 2, "shared": "slice", "shared_fraction": 0.25},
    {"experts": 4, "top_k": 2, "router": "kmeans"},
    {"experts": 8, "top_k": 4, "granularity": 2, "router": "hidden"},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_upcycle_is_exact_at_init(tiny, text_file, tmp_path, family, options):
    path = tiny(family)
    if options.get("router") == "hidden":
        options = {**options, "prompts": str(_prompts_file(tmp_path))}
    code, _, stderr = _upcycle(path, tmp_path / "out", options, "--calib", text_file)
    assert code == 0, stderr
    record = read_json(tmp_path / "out" / "moefy.json")
    expected = {"llama": "granitemoeshared" if "shared" in options else "mixtral", "qwen2": "qwen2_moe"}[family]
    assert record["format"]["name"] == expected and record["format"]["exact"]
    assert all(layer["exact_at_init"] for layer in record["layers"].values())
    assert_matches_dense(tmp_path / "out", path)


def test_routers_differ_by_mode_and_hidden_rows_follow_the_prompts(tiny, text_file, tmp_path):
    path = tiny("llama")
    prompts = _prompts_file(tmp_path)
    routers = {}
    for mode in ("random", "kmeans", "hidden"):
        options = {"experts": 4, "top_k": 2, "router": mode, **({"prompts": str(prompts)} if mode == "hidden" else {})}
        code, _, stderr = _upcycle(path, tmp_path / mode, options, "--calib", text_file)
        assert code == 0, stderr
        routers[mode] = load_file(tmp_path / mode / "model.safetensors")["model.layers.1.block_sparse_moe.gate.weight"]
    assert not torch.allclose(routers["random"], routers["kmeans"])
    for mode in ("kmeans", "hidden"):  # unit rows, centred: they sum to ~0 for hidden
        torch.testing.assert_close(routers[mode].norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    assert routers["hidden"].sum(0).norm() < 1.0


def test_drop_upcycling_redraws_the_same_neurons_in_every_matrix(tiny, tmp_path):
    path = tiny("llama", intermediate_size=64)
    options = {"experts": 4, "top_k": 2, "drop": 0.5}
    for out in ("a", "b"):
        code, _, stderr = _upcycle(path, tmp_path / out, options, "--seed", "3")
        assert code == 0, stderr
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # seeded, deterministic
    dense = load_file(next(path.glob("*.safetensors")))
    prefix = "model.layers.0.block_sparse_moe.experts"
    changed_sets = []
    for e in range(4):
        gate_changed = (a[f"{prefix}.{e}.w1.weight"] != dense["model.layers.0.mlp.gate_proj.weight"]).any(1)
        up_changed = (a[f"{prefix}.{e}.w3.weight"] != dense["model.layers.0.mlp.up_proj.weight"]).any(1)
        down_changed = (a[f"{prefix}.{e}.w2.weight"] != dense["model.layers.0.mlp.down_proj.weight"]).any(0)
        assert torch.equal(gate_changed, up_changed) and torch.equal(gate_changed, down_changed)
        assert int(gate_changed.sum()) == 32
        changed_sets.append(gate_changed)
        fresh = a[f"{prefix}.{e}.w1.weight"][gate_changed]
        original = dense["model.layers.0.mlp.gate_proj.weight"]
        assert abs(float(fresh.std()) / float(original.std()) - 1) < 0.1  # statistics matched
    assert len({tuple(s.tolist()) for s in changed_sets}) == 4  # a different subset per expert
    record = read_json(tmp_path / "a" / "moefy.json")
    assert not record["layers"]["0"]["exact_at_init"] and record["layers"]["0"]["dropped_neurons_per_copy"] == 32


def test_experts_from_several_checkpoints(tiny, tmp_path):
    base, other = tiny("llama"), tiny("llama")
    other_weights = load_file(next(other.glob("*.safetensors")))
    with torch.no_grad():  # make the second checkpoint's MLPs differ from the base's
        for name in list(other_weights):
            if ".mlp." in name:
                other_weights[name] = other_weights[name] * -1.5
    from safetensors.torch import save_file

    save_file(other_weights, next(other.glob("*.safetensors")), metadata={"format": "pt"})
    code, _, stderr = _upcycle(base, tmp_path / "out", {"experts": 2, "top_k": 1, "sources": [None, str(other)]})
    assert code == 0, stderr
    out = load_file(tmp_path / "out" / "model.safetensors")
    prefix = "model.layers.1.block_sparse_moe.experts"
    base_weights = load_file(next(base.glob("*.safetensors")))
    assert torch.equal(out[f"{prefix}.0.w1.weight"], base_weights["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(out[f"{prefix}.1.w1.weight"], other_weights["model.layers.1.mlp.gate_proj.weight"])
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(out[q], base_weights[q])
    assert not read_json(tmp_path / "out" / "moefy.json")["layers"]["1"]["exact_at_init"]


@pytest.mark.parametrize("options,message", [
    ({"experts": 4, "top_k": 2, "router": "learned"}, "router"),
    ({"experts": 4, "top_k": 5}, "exceeds upcycle.experts"),
    ({"experts": 6, "top_k": 2, "granularity": 4}, "multiples of granularity"),
    ({"experts": 8, "top_k": 4, "granularity": 2, "router": "zero"}, "router=zero needs granularity 1"),
    ({"experts": 4, "top_k": 2, "router": "hidden"}, "needs upcycle.prompts"),
    ({"experts": 4, "top_k": 2, "router": "hidden", "prompts": "/nonexistent/prompts.yaml"}, "does not exist"),
    ({"experts": 4, "top_k": 2, "router": "hidden", "prompts": "PROMPTS3"}, "one entry per expert copy"),
    ({"experts": 4, "top_k": 2, "sources": [None]}, "one per copy"),
    ({"experts": 4, "top_k": 2, "router": "kmeans"}, "needs calibration data"),
])
def test_bad_upcycle_options_exit_2(tiny, tmp_path, options, message):
    if options.get("prompts") == "PROMPTS3":
        options = {**options, "prompts": str(_prompts_file(tmp_path, PROMPTS[:3]))}
    code, _, stderr = _upcycle(tiny("llama"), tmp_path / "out", options)
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_source_of_another_architecture_is_refused(tiny, tmp_path):
    other = tiny("llama", intermediate_size=96)
    options = {"experts": 2, "top_k": 1, "sources": [None, str(other)]}
    code, _, stderr = _upcycle(tiny("llama"), tmp_path / "out", options)
    assert code == 2 and "intermediate_size" in stderr, stderr
    assert open_source(other).config["intermediate_size"] == 96
