"""Every output checked as a user loads it: all 12 families, tied and untied, with the shapes of their best-known
real checkpoints, through the identity slice and upcycling at init in every format the family allows; the
post-write load check refuses a checkpoint that would load with a weight missing or re-initialised."""

import json

import pytest
import torch

from moefy.arch import SIZE_KEYS
from moefy.export import FORMATS
from tests.conftest import FAMILY_CONFIGS, assert_matches_dense, load_dense, logits, random_ids, read_json, run_cli

# what the family's best-known real checkpoint sets (on top of the tiny shapes of FAMILY_CONFIGS)
REAL_DEFAULTS = {
    "gpt_neox": dict(rotary_pct=0.25, use_parallel_residual=True),  # Pythia
    "gemma": dict(hidden_act="gelu_pytorch_tanh"),  # Gemma: scaled embeddings
    "gemma2": dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(final_logit_softcapping=None),
    "phi3": dict(),  # fused gate_up_proj
    "gpt2": dict(activation_function="gelu_new"),  # Conv1D
    "granite": dict(mlp_bias=False),
    "olmo2": dict(),
    "llama": dict(mlp_bias=False),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
}
ALL_FAMILIES = {**{f: {} for f in ("llama", "mistral", "qwen2", "qwen3")}, **FAMILY_CONFIGS}
# the formats each family may be written in by these exact recipes
FORMATS_OF = {"llama": ("native", "mixtral", "granitemoeshared", "qwen2_moe"),
              "mistral": ("native", "mixtral", "granitemoeshared"),
              "qwen2": ("native", "qwen2_moe"), "qwen3": ("native", "qwen3_moe"), "granite": ("native", "granitemoe")}
CASES = [(family, tied, recipe, fmt) for family in sorted(ALL_FAMILIES) for tied in (True, False)
         for recipe in ("mlpmoe", "upcycle-8x2") for fmt in FORMATS_OF.get(family, ("native",))]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One tiny checkpoint per (family, tied), built on first use."""
    from tests.conftest import make_tiny

    built = {}

    def get(family, tied):
        if (family, tied) not in built:
            path = tmp_path_factory.mktemp(f"{family}-{'tied' if tied else 'untied'}") / "src"
            built[family, tied] = make_tiny(path, family, tie_word_embeddings=tied,
                                            **{**ALL_FAMILIES[family], **REAL_DEFAULTS[family]})
        return built[family, tied]

    return get


@pytest.mark.parametrize("family,tied,recipe,fmt", CASES,
                         ids=[f"{f}-{'tied' if t else 'untied'}-{r}-{m}" for f, t, r, m in CASES])
def test_exact_recipes_load_exactly_in_every_allowed_format(sources, tmp_path, family, tied, recipe, fmt):
    src = sources(family, tied)
    out = tmp_path / "out"
    code, _, err = run_cli("convert", src, "-r", recipe, "-o", out, "--format", fmt)
    assert code == 0, err
    check = read_json(out / "moefy.json")["load_check"]
    assert check["exact_expected"] and check["max_abs_logit_diff"] <= check["tolerance"], check
    assert_matches_dense(out, src)
    if fmt == "native":  # the modeling code written into OUT loads it the same way
        from transformers import AutoModelForCausalLM

        ids = random_ids()
        stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        torch.testing.assert_close(logits(stock, ids), logits(load_dense(src), ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt,damage", [("mixtral", "drop"), ("mixtral", "rename"), ("native", "drop"),
                                        ("native", "rename")])
def test_an_export_that_would_load_wrong_is_refused(sources, tmp_path, monkeypatch, fmt, damage):
    """A tensor dropped or renamed in the writer (forced here) would be initialised afresh by transformers:
    convert exits 1 naming it, and OUT is never published."""
    fmt_cls = type(FORMATS[fmt])
    original = fmt_cls.layer_tensors

    def damaged(self, layer, block, source):
        tensors = dict(original(self, layer, block, source))
        if layer == 1:
            name = sorted(tensors)[0]
            tensor = tensors.pop(name)
            if damage == "rename":
                tensors[name + "_renamed"] = tensor
        return tensors

    monkeypatch.setattr(fmt_cls, "layer_tensors", damaged)
    out = tmp_path / "out"
    code, _, err = run_cli("convert", sources("llama", False), "-r", "mlpmoe", "-o", out, "--format", fmt)
    assert code == 1, err
    assert "does not load as written" in err and "layers.1." in err and "OUT was not published" in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_exact_recipe_whose_logits_drift_is_refused(sources, tmp_path, monkeypatch):
    """A writer bug that keeps every name but changes a value: the logit comparison catches it."""
    fmt_cls = type(FORMATS["native"])
    original = fmt_cls.layer_tensors

    def drifted(self, layer, block, source):
        tensors = dict(original(self, layer, block, source))
        name = next(n for n in sorted(tensors) if n.endswith("down_proj"))
        tensors[name] = tensors[name] * 1.01
        return tensors

    monkeypatch.setattr(fmt_cls, "layer_tensors", drifted)
    out = tmp_path / "out"
    code, _, err = run_cli("convert", sources("llama", True), "-r", "mlpmoe", "-o", out, "--format", "native")
    assert code == 1 and "logits differ" in err and not out.exists(), err


def test_lossy_recipes_record_their_gap_and_the_check_can_be_skipped(sources, tmp_path):
    src = sources("llama", True)
    out = tmp_path / "drop"
    assert run_cli("convert", src, "-r", "drop-upcycle-8x2", "-o", out)[0] == 0
    check = read_json(out / "moefy.json")["load_check"]
    assert not check["exact_expected"] and check["max_abs_logit_diff"] > 0 and check["mean_abs_logit_diff"] > 0
    assert "load_check.seconds" in read_json(out / "moefy.json")["timing"]
    code, _, err = run_cli("convert", src, "-r", "mlpmoe", "-o", tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0, err  # rounding to bf16 is not the recipe's error: recorded, not refused
    assert not read_json(tmp_path / "bf16" / "moefy.json")["load_check"]["exact_expected"]
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", tmp_path / "skip", "--skip-load-check")[0] == 0
    assert read_json(tmp_path / "skip" / "moefy.json")["load_check"] == {"skipped": True}


@pytest.mark.parametrize("key,value", [("hidden_size", "lots"), ("num_hidden_layers", 0), ("vocab_size", -3),
                                       ("intermediate_size", True), ("num_key_value_heads", "two"),
                                       ("max_position_embeddings", "big"), ("rms_norm_eps", [1]),
                                       ("hidden_act", "swoosh")])
def test_a_wrong_config_field_is_bad_input_naming_the_key(sources, tmp_path, key, value):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(sources("llama", True), src)
    config = json.loads((src / "config.json").read_text())
    config[key] = value
    (src / "config.json").write_text(json.dumps(config))
    for extra in (["--dry-run"], []):
        code, _, err = run_cli("convert", src, "-r", "mlpmoe", "-o", tmp_path / "out", *extra)
        assert code == 2 and f"`{key}`" in err and "config.json" in err, err
        assert "internal error" not in err and "Traceback" not in err
    code, _, err = run_cli("eval", src, "--dataset", src / "config.json", "--max-windows", "1", "--seq-len", "64")
    assert code == 2 and f"`{key}`" in err, err
    code, _, err = run_cli("inspect", src)  # it describes what it computes with: sizes and activation
    assert (code == 2 and f"`{key}`" in err) if key in SIZE_KEYS + ("hidden_act",) else code == 0, err
