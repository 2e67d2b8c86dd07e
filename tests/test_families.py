"""Families beyond Llama/Mistral/Qwen: everything family-specific sits outside the MLP, except Phi-3's fused
gate/up projection and GPT-2/GPT-NeoX's non-gated MLPs with biases (GPT-2's stored transposed). Every
transform is exact where the math says so, through both loaders of the native format."""

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


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_transform_is_exact_on_family(tiny, tmp_path, text_file, family, transform):
    from transformers import AutoModelForCausalLM

    import moefy

    src = tiny(family, **FAMILY_CONFIGS[family])
    recipe, sets = TRANSFORMS[transform]
    out = tmp_path / "out"
    code, _, stderr = run_cli("convert", src, "-r", recipe, "-o", out, "--calib", text_file,
                              *[a for s in sets for a in ("--set", s)])
    assert code == 0, stderr
    config = read_json(out / "config.json")
    assert config["model_type"] == "moefy" and config["base_model_type"] == family  # no exact standard format
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
