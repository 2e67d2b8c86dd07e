"""Families beyond Llama/Mistral/Qwen: everything family-specific sits outside the MLP, except Phi-3's fused
gate/up projection and GPT-2/GPT-NeoX's non-gated MLPs with biases (GPT-2's stored transposed). Every
transform is exact where the math says so, through both loaders of the native format."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import FAMILY_CONFIGS, load_dense, logits, random_ids, read_json, run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# (recipe, overrides): the identity slice, upcycling at init, a carve with every expert active (and layer 0
# left dense, so the family's own MLP layout is written back)
TRANSFORMS = {
    "slice": ("mlpmoe", []),
    "upcycle": ("upcycle-8x2", []),
    "carve-100%": ("carve-50", ["transforms.0.carve.experts=8", "transforms.0.carve.shared=0",
                                "transforms.0.carve.top_k=8", "transforms.0.carve.compensation.refit_down=false",
                                "transforms.0.carve.dense_layers=[0]",
                                "calibration.samples=4", "calibration.seq_len=32"]),
    # a static slice routed by a fitted router that picks every expert
    "fit_router-all": (str(EXAMPLES / "fit-router-64k.yaml"), ["transforms.0.slice.experts=8",
                                                              "transforms.1.fit_router.top_k=8",
                                                              "calibration.samples=8", "calibration.seq_len=32"]),
}

# where `--format auto` finds an exact standard MoE class; everything else is native
STANDARD_EXPORTS = {("granite", "slice"): "granitemoe", ("granite", "upcycle"): "granitemoe",
                    ("granite", "fit_router-all"): "granitemoe"}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_transform_is_exact_on_family(tiny, tmp_path, text_file, family, transform):
    src = tiny(family, **FAMILY_CONFIGS[family])
    recipe, sets = TRANSFORMS[transform]
    out = tmp_path / "out"
    code, _, stderr = run_cli("convert", src, "-r", recipe, "-o", out, "--calib", text_file,
                              *[a for s in sets for a in ("--set", s)])
    assert code == 0, stderr
    assert read_json(out / "config.json")["model_type"] == STANDARD_EXPORTS.get((family, transform), "moefy")
    _assert_exact(out, src)


def _assert_exact(out, src):
    from transformers import AutoModelForCausalLM

    import moefy

    ids = random_ids()
    expected = logits(load_dense(src), ids)
    torch.testing.assert_close(logits(moefy.load(out), ids), expected, atol=1e-5, rtol=0)
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(stock, ids), expected, atol=1e-5, rtol=0)


def test_legacy_gemma_gelu_means_tanh(tiny):
    """Released Gemma configs say `gelu`; Gemma's own code runs the tanh approximation."""
    from moefy.arch import ADAPTERS

    assert ADAPTERS["gemma"].activation({"hidden_act": "gelu"}) == "gelu_tanh"
    assert ADAPTERS["gemma2"].activation({"hidden_activation": "gelu_pytorch_tanh"}) == "gelu_tanh"


def test_granite_shared_expert_exports_to_granitemoeshared(tiny, tmp_path, text_file):
    """GraniteMoeShared adds its shared expert ungated: a carve with one is exact there at full activation."""
    src = tiny("granite", **FAMILY_CONFIGS["granite"])
    out = tmp_path / "out"
    sets = ["transforms.0.carve.experts=4", "transforms.0.carve.shared=1", "transforms.0.carve.top_k=3",
            "transforms.0.carve.compensation.refit_down=false", "calibration.samples=4", "calibration.seq_len=32"]
    code, _, stderr = run_cli("convert", src, "-r", EXAMPLES / "carve-25-wide.yaml", "-o", out, "--calib", text_file,
                              *[a for s in sets for a in ("--set", s)])
    assert code == 0, stderr
    assert read_json(out / "config.json")["model_type"] == "granitemoeshared"
    assert read_json(out / "moefy.json")["format"]["exact"]
    _assert_exact(out, src)


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: in the interpreter on CPU
@pytest.mark.parametrize("family,recipe,sets", [
    ("gpt2", EXAMPLES / "carve-25-wide.yaml", ["transforms.0.carve.experts=8", "calibration.samples=4",
                                               "calibration.seq_len=32"]),  # routed + shared, biased, non-gated
    ("gpt_neox", "upcycle-8x2", []),
    ("granite", "upcycle-8x2", []),  # granitemoe: transformers' experts, on the hook and on moefy's routing
])
def test_validate_routed_blocks_of_new_families(tiny, tmp_path, text_file, family, recipe, sets, backend):
    """Partial activation: every backend matches the reference on the family's MoE blocks (input biases per
    expert, the output bias once)."""
    out = tmp_path / "out"
    code, _, stderr = run_cli("convert", tiny(family, **FAMILY_CONFIGS[family]), "-r", recipe, "-o", out,
                              "--calib", text_file, *[a for s in sets for a in ("--set", s)])
    assert code == 0, stderr
    report_path = tmp_path / "v.json"
    code, stdout, err = run_cli("validate", out, "--json", report_path, "--backend", backend)
    assert code == 0, stdout + err
    report = read_json(report_path)
    assert report["passed"] and report["max_abs_diff"] < 1e-5 and len(report["blocks"]) >= 2


@pytest.mark.parametrize("family,recipe,fmt,why", [
    ("gpt2", "upcycle-8x2", "native", "no standard MoE format for gpt2"),
    ("granite", "upcycle-8x2", "granitemoe", "exact standard format for granite"),
    ("granite", str(EXAMPLES / "carve-25-wide.yaml"), "granitemoeshared", "granitemoe has no shared expert"),
    ("llama", "mlpmoe-fade", "native", "needs experts of equal width"),
])
def test_inspect_says_which_format_and_why(tiny, tmp_path, family, recipe, fmt, why):
    src = tiny(family, **FAMILY_CONFIGS.get(family, {}))
    code, stdout, stderr = run_cli("inspect", src, "--recipe", recipe, "--json")
    assert code == 0, stderr
    export = json.loads(stdout)["export"]
    assert export["format"] == fmt and why in export["reason"] and export["exact"]
    if fmt == "native":  # what other engines make of it is said too
        assert "llama.cpp: no architecture" in export["engines"]
    if recipe == "upcycle-8x2":
        out = tmp_path / "out"
        assert run_cli("convert", src, "-r", recipe, "-o", out)[0] == 0
        code, _, stderr = run_cli("inspect", out, "--recipe", recipe)
        assert code == 2 and "already" in stderr


SMALL_CALIBRATION = ["calibration.samples=4", "calibration.seq_len=32"]


@pytest.mark.parametrize("recipe", ["mlpmoe-fade", "mlpmoe-compensated", "drop-upcycle-8x2", "cmoe-25", "carve-50"])
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3"])
def test_lossy_recipes_on_new_mlp_layouts(tiny, tmp_path, text_file, family, recipe):
    """Unequal widths, pruned branches, re-drawn neurons (and their biases), carves with shared experts: every
    shipped kind of lossy conversion runs on the non-gated/biased and fused layouts, and the written blocks
    match the reference."""
    out = tmp_path / "out"
    sets = [a for s in SMALL_CALIBRATION for a in ("--set", s)] if recipe.startswith(("cmoe", "carve")) else []
    code, _, stderr = run_cli("convert", tiny(family, **FAMILY_CONFIGS[family]), "-r", recipe, "-o", out,
                              "--calib", text_file, *sets)
    assert code == 0, stderr
    code, stdout, err = run_cli("validate", out, "--backend", "torch")
    assert code == 0, stdout + err
