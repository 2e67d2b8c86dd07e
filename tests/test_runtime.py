"""The inference runtime as a user meets it: decode through every format on the fast path, `moefy bench`
(the shape of its report, not its timings) and `moefy generate`."""

from pathlib import Path

import pytest
import torch

import moefy
from moefy.bench import decode_weight_bytes
from moefy_kernels import cpu_decode
from tests.conftest import load_dense, read_json, run_cli

# (family, shared experts, format): routed carves with distinct experts, so a wrong expert choice shows
DECODE_CASES = [("llama", 0, "mixtral"), ("llama", 1, "qwen2_moe"), ("llama", 1, "granitemoeshared"),
                ("llama", 1, "native"), ("qwen3", 0, "qwen3_moe"), ("granite", 0, "granitemoe"), ("gpt2", 0, "native")]


def _carve(tiny, text_file, tmp_path: Path, family: str, shared: int, fmt: str) -> Path:
    recipe = tmp_path / "carve.yaml"
    recipe.write_text(f"transforms:\n  - carve: {{experts: 8, shared: {shared}, top_k: 2}}\n"
                      "calibration: {samples: 4, seq_len: 32}\n")
    src = tiny(family, **({"n_inner": 128} if family == "gpt2" else {}))
    out = tmp_path / "out"
    code, _, err = run_cli("convert", src, "-r", recipe, "-o", out, "--calib", text_file, "--format", fmt)
    assert code == 0, err
    return out


def _down_weights(model) -> list[torch.Tensor]:
    from moefy.loading import moe_blocks

    return [block.experts.down_proj for _, block in moe_blocks(model)]


@pytest.mark.parametrize("family,shared,fmt", DECODE_CASES, ids=[f"{f}-shared{s}-{m}" for f, s, m in DECODE_CASES])
def test_decode_on_the_gathered_path_equals_the_reference(tiny, text_file, tmp_path, family, shared, fmt):
    """One token, a batch of 3 single tokens (a union of selected experts smaller than all) and 6 tokens (the
    union is every expert), and cached greedy decoding: the torch backend's gathered path in the decode
    layout gives the reference backend's fp32 logits within 1e-5."""
    out = _carve(tiny, text_file, tmp_path, family, shared, fmt)
    fast, ref = moefy.load(out, backend="torch"), moefy.load(out, backend="reference")
    assert all(w.transpose(-1, -2).is_contiguous() for w in _down_weights(fast))  # stored for decode
    if cpu_decode.kernel() is not None:  # shared experts are read in the routed experts' kernel call
        from moefy.loading import moe_blocks

        blocks = [block for _, block in moe_blocks(fast)]
        if fmt != "native":  # standard blocks decode in one kernel call, after their own router
            installed = ["forward" in vars(block) for block in blocks]
            # except where the router returns another tuple (GraniteMoe's in transformers 5.13: ids first)
            assert all(installed) or (fmt.startswith("granitemoe") and not any(installed))
        if fmt == "granitemoeshared":  # its shared MLP is the decoder layer's: fused in a call of its own
            assert all("forward" in vars(layer.shared_mlp) for layer in fast.model.layers)
        if fmt == "native" and shared:
            assert all(block.shared.down_proj.t().is_contiguous() for block in blocks)
    for shape in ((1, 1), (3, 1), (1, 6)):
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            torch.testing.assert_close(fast(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    steps = [m.generate(prompt, max_new_tokens=4, do_sample=False, output_scores=True, pad_token_id=0,
                        return_dict_in_generate=True) for m in (fast, ref)]
    assert torch.equal(steps[0].sequences, steps[1].sequences)
    torch.testing.assert_close(torch.stack(steps[0].scores), torch.stack(steps[1].scores), atol=1e-5, rtol=0)


def test_static_native_decode_on_the_fused_kernel_equals_the_reference(tiny, tmp_path):
    """A static MoE (mlpmoe, every expert weighted by its scale) decodes on the fused kernel where it is built:
    the reference's logits within 1e-5 for 1, 3 and 6 tokens, and the dense model's too (an identity)."""
    src, out = tiny("llama"), tmp_path / "out"
    code, _, err = run_cli("convert", src, "-r", "mlpmoe", "-o", out, "--format", "native")
    assert code == 0, err
    fast, ref, dense = moefy.load(out, backend="torch"), moefy.load(out, backend="reference"), load_dense(src)
    for shape in ((1, 1), (3, 1), (1, 6)):
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            got = fast(ids).logits
            torch.testing.assert_close(got, ref(ids).logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(got, dense(ids).logits, atol=1e-5, rtol=0)
    if cpu_decode.kernel() is not None:
        from moefy.loading import moe_blocks

        assert all(block.experts.down_proj.t().is_contiguous() for _, block in moe_blocks(fast))


def test_bench_compares_with_the_recorded_source(tiny, text_file, tmp_path):
    out = _carve(tiny, text_file, tmp_path, "llama", 1, "qwen2_moe")
    report_path = tmp_path / "bench.json"
    code, stdout, err = run_cli("bench", out, "--prompt-tokens", 8, "--new-tokens", 3, "--rounds", 2,
                                "--threads", 1, "--json", report_path)
    assert code == 0, err
    report = read_json(report_path)
    source = read_json(out / "moefy.json")["source"]["origin"]
    assert report["baseline"] == source and report["model"] == str(out)
    assert (report["threads"], report["rounds"], report["batch"], report["backend"]) == (1, 2, 1, "torch")
    model, base = report["runs"]["model"], report["runs"]["baseline"]
    for run in (model, base):
        assert len(run["prefill_samples"]) == len(run["decode_samples"]) == 2
        assert run["prefill_tokens_per_s"] > 0 and run["decode_tokens_per_s"] > 0
    assert model["decode_weight_bytes"] < base["decode_weight_bytes"] == base["weight_bytes"]  # 2 of 7 routed
    assert report["bytes_ideal_ratio"] == pytest.approx(base["decode_weight_bytes"] / model["decode_weight_bytes"])
    assert report["decode_of_ideal"] == pytest.approx(report["decode_ratio"] / report["bytes_ideal_ratio"])
    assert report["peak_rss_bytes"] > 0 and report["machine"]
    assert "ratio" in stdout

    code, _, err = run_cli("bench", out, "--baseline", "none", "--prompt-tokens", 4, "--new-tokens", 2,
                           "--rounds", 1, "--json", report_path)
    assert code == 0, err
    report = read_json(report_path)
    assert report["baseline"] is None and report["decode_ratio"] is None and list(report["runs"]) == ["model"]


def test_decode_weight_bytes_counts_one_row_of_an_untied_embedding(tiny):
    path = tiny("llama", tie_word_embeddings=False)
    model = load_dense(path)
    params = sum(p.numel() for p in model.parameters())
    assert decode_weight_bytes(model, str(path)) == 4 * (params - 127 * 64)  # vocab 128, hidden 64


@pytest.mark.parametrize("args,needle", [
    (("--new-tokens", "1"), "--new-tokens 1 must be at least 2"),
    (("--prompt-tokens", "300"), "max_position_embeddings"),
    (("--device", "tpu"), "expected cpu or cuda"),
    (("--backend", "magic"), "--backend"),
    (("--dtype", "float64"), "--dtype 'float64' is unknown"),
])
def test_bench_bad_input_is_exit_2(tiny, args, needle):
    code, _, err = run_cli("bench", tiny("llama"), "--rounds", "1", *args)
    assert code == 2 and needle in " ".join(err.split()), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
@pytest.mark.parametrize("command", ["convert", "validate", "bench", "generate"])
def test_device_cuda_without_a_gpu_is_exit_2(tiny, tmp_path, command):
    """Every command with --device refuses cuda up front, naming the fix, where torch has no GPU."""
    args = {"convert": ("-r", "mlpmoe", "-o", tmp_path / "out"), "validate": (), "bench": ("--baseline", "none"),
            "generate": ("--prompt", "hi")}[command]
    code, _, err = run_cli(command, tiny("llama"), *args, "--device", "cuda")
    assert code == 2 and "this machine has no CUDA GPU" in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


def test_generate_streams_the_greedy_continuation(tiny):
    from moefy.loading import load_tokenizer

    path = tiny("llama")
    code, stdout, err = run_cli("generate", path, "--prompt", "The fox", "--max-new-tokens", "6")
    assert code == 0, err
    tokenizer, model = load_tokenizer(path), load_dense(path)
    ids = tokenizer("The fox", return_tensors="pt").input_ids
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)[0, ids.shape[1]:]
    assert stdout.rstrip("\n") == tokenizer.decode(expected, skip_special_tokens=True)

    code, _, err = run_cli("generate", path, "--prompt", "hi", "--chat")
    assert code == 2 and "no chat template" in err
