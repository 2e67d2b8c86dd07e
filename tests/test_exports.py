"""Every export of the identity slice reproduces the dense model: save → reload → fp32 logits within 1e-5."""

import json

import pytest
import torch
from safetensors import safe_open

import moefy
from tests.conftest import (FAMILIES, STANDARD_FORMATS, assert_matches_dense, load_dense, logits, random_ids, read_json,
                            run_cli)

CASES = [(family, fmt) for family in FAMILIES for fmt in ("auto", "native", *STANDARD_FORMATS[family])]
AUTO_CHOICE = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
ARCH = {"mixtral": "MixtralForCausalLM", "granitemoeshared": "GraniteMoeSharedForCausalLM",
        "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "native": "MoefyForCausalLM"}


@pytest.mark.parametrize("family,fmt", CASES)
def test_identity_slice_is_exact(tiny, tmp_path, family, fmt):
    src = tiny(family)
    out = tmp_path / "out"
    code, _, stderr = run_cli("convert", src, "-r", "mlpmoe", "-o", out, "--format", fmt)
    assert code == 0, stderr
    written = AUTO_CHOICE[family] if fmt == "auto" else fmt
    config = read_json(out / "config.json")
    assert config["architectures"] == [ARCH[written]]
    ids = random_ids()
    expected = logits(load_dense(src), ids)
    torch.testing.assert_close(logits(moefy.load(out), ids), expected, atol=1e-5, rtol=0)
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=written == "native", dtype=torch.float32)
    torch.testing.assert_close(logits(stock.eval(), ids), expected, atol=1e-5, rtol=0)


def test_side_files_copied_byte_for_byte(tiny, tmp_path):
    src = tiny("llama")
    out = tmp_path / "out"
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out)[0] == 0
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    record = read_json(out / "moefy.json")
    assert record["source"]["weights_sha256"].keys() == {"model.safetensors"}
    assert record["recipe"]["name"] == "mlpmoe" and record["format"]["name"] == "mixtral"
    assert "base_model:" in (out / "README.md").read_text()


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_round_trip(tiny, tmp_path, tied):
    src = tiny("llama", tie_word_embeddings=tied)
    for fmt in ("mixtral", "native"):
        out = tmp_path / fmt
        assert run_cli("convert", src, "-r", "mlpmoe", "-o", out, "--format", fmt)[0] == 0
        assert read_json(out / "config.json")["tie_word_embeddings"] is tied
        with safe_open(out / "model.safetensors", "pt") as f:
            assert ("lm_head.weight" in f.keys()) is not tied
        model = moefy.load(out)
        same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert same is tied
        torch.testing.assert_close(logits(model, random_ids()), logits(load_dense(src), random_ids()), atol=1e-5,
                                   rtol=0)


def test_llama3_rope_scaling_carried(tiny, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    src = tiny("llama", rope_parameters=rope)
    for fmt in ("mixtral", "qwen2_moe", "native"):
        out = tmp_path / fmt
        assert run_cli("convert", src, "-r", "mlpmoe", "-o", out, "--format", fmt)[0] == 0
        assert read_json(out / "config.json")["rope_parameters"] == read_json(src / "config.json")["rope_parameters"]
        ids = random_ids(length=120)  # long enough for the scaled frequencies to matter
        assert_matches_dense(out, src, ids)


def test_mistral_sliding_window_carried(tiny, tmp_path):
    src = tiny("mistral", sliding_window=8)
    out = tmp_path / "out"
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out)[0] == 0
    assert read_json(out / "config.json")["sliding_window"] == 8
    ids = random_ids(length=30)
    assert_matches_dense(out, src, ids)


def test_qwen2_moe_from_llama_gets_zero_qkv_biases_and_an_all_zero_shared_expert(tiny, tmp_path):
    src = tiny("llama")
    out = tmp_path / "out"
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out, "--format", "qwen2_moe")[0] == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert torch.count_nonzero(f.get_tensor("model.layers.0.self_attn.q_proj.bias")) == 0
        # no zero-width tensors (vLLM refuses them): an all-zero shared expert, 8 wide, whose output is exactly 0
        shared = [f.get_tensor(f"model.layers.1.mlp.shared_expert.{p}_proj.weight") for p in ("gate", "up", "down")]
        assert [t.shape for t in shared] == [(8, 64), (8, 64), (64, 8)] and not any(map(torch.count_nonzero, shared))
    assert read_json(out / "moefy.json")["load_check"]["max_abs_logit_diff"] <= 1e-4
    config = read_json(out / "config.json")
    assert config["qkv_bias"] is True and config["norm_topk_prob"] is True
    assert config["shared_expert_intermediate_size"] == 8


def test_sharded_output_has_index_and_metadata(tiny, tmp_path):
    src = tiny("llama")
    out = tmp_path / "out"
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out, "--set", "output.shard_size=60KB")[0] == 0
    index = read_json(out / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    with safe_open(out / shards[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert_matches_dense(out, src)


def test_ragged_widths_choose_native_and_stay_exact(tiny, tmp_path):
    src = tiny("llama")
    out = tmp_path / "out"
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out, "--set", "transforms.0.slice.experts=5")[0] == 0
    config = read_json(out / "config.json")
    assert config["model_type"] == "moefy"
    assert config["moe_layers"]["0"]["widths"] == [26, 26, 26, 25, 25]
    assert_matches_dense(out, src)
    reference = moefy.load(out, backend="reference")  # Σ α_e·expert_e(x), one expert at a time
    torch.testing.assert_close(logits(reference, random_ids()), logits(load_dense(src), random_ids()),
                               atol=1e-5, rtol=0)
    assert "grouped_mm" in read_json(out / "moefy.json")["format"]["reason"] or "equal width" in \
        read_json(out / "moefy.json")["format"]["reason"]


def test_inspect_reports_contract_fields(tiny, tmp_path):
    src = tiny("llama")
    out = tmp_path / "out"
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out)[0] == 0
    code, stdout, _ = run_cli("inspect", out, "--json")
    assert code == 0
    report = json.loads(stdout)
    for key in ("format", "architecture", "num_layers", "moe_layers", "num_experts", "top_k", "shared_experts",
                "expert_width", "params_total", "params_active_per_token", "mlp_active_fraction"):
        assert key in report
    dense_params = sum(p.numel() for p in load_dense(src).parameters())
    assert report["params_total"] == dense_params + 2 * 16 * 64  # + two zero routers
    assert report["num_experts"] == 16 and report["top_k"] == 16 and report["mlp_active_fraction"] == 1.0


def test_native_model_type_constant_matches_the_modeling_code():
    from moefy.export.native import MODEL_TYPE
    from moefy.moe.modeling_moefy import MoefyConfig

    assert MODEL_TYPE == MoefyConfig.model_type
