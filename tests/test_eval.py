"""Perplexity protocol (DESIGN.md) and the eval/convert-gate reports."""

import json
import math

import torch

import moefy
from moefy.evaluate import evaluate
from tests.conftest import char_tokenizer, load_dense, read_json, run_cli

EVAL_KEYS = ("model", "baseline", "dataset", "dataset_sha256", "seq_len", "windows", "tokens", "ppl", "baseline_ppl",
             "delta_pct", "params_total", "params_active_per_token", "mlp_active_fraction", "backend", "tokens_per_s")


def test_perplexity_follows_the_protocol(tiny, text_file):
    src = tiny("llama")
    report = evaluate(str(src), baseline=None, dataset=str(text_file), seq_len=32, max_windows=5, batch_size=2)
    ids = char_tokenizer()(text_file.read_text(), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: 5 * 32]).view(5, 32)
    with torch.no_grad():
        out = load_dense(src)(input_ids=windows).logits
    nll = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.isclose(report["ppl"], math.exp(float(nll)), rel_tol=1e-5)
    assert report["windows"] == 5 and report["tokens"] == 160 and report["baseline_ppl"] is None


def test_eval_json_report_and_identity_delta(tiny, tmp_path, text_file):
    src = tiny("llama")
    out = tmp_path / "out"
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out)[0] == 0
    report_path = tmp_path / "eval.json"
    code, stdout, err = run_cli("eval", out, "--baseline", src, "--dataset", text_file, "--seq-len", "64",
                                "--json", report_path)
    assert code == 0, err
    report = read_json(report_path)
    assert all(k in report for k in EVAL_KEYS)
    assert abs(report["delta_pct"]) < 1e-3 and report["tokens_per_s"] > 0
    assert "Δ ppl" in stdout


def test_jsonl_dataset(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": "hello world " * 20}) for _ in range(10)))
    report = evaluate(str(tiny("llama")), baseline=None, dataset=str(data), seq_len=32)
    assert report["windows"] == len(char_tokenizer()("\n\n".join(["hello world " * 20] * 10))["input_ids"]) // 32


def test_gate_passes_for_identity_and_is_recorded(tiny, tmp_path, text_file):
    src = tiny("llama")
    out = tmp_path / "out"
    code, stdout, err = run_cli("convert", src, "-r", "mlpmoe", "-o", out, "--eval-dataset", text_file,
                                "--set", "gates.seq_len=128")  # the tiny model takes 256 positions
    assert code == 0, err
    assert "Δ ppl" in stdout  # the measured table is shown, not only the verdict
    record = read_json(out / "moefy.json")
    assert record["gates"]["checked"] and record["gates"]["passed"]
    assert "Perplexity on" in (out / "README.md").read_text()


def test_missed_gate_exits_1_and_keeps_output(tiny, tmp_path, text_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("transforms: [{slice: {experts: 8, prune: {branches: 4}}}]\n"
                      "gates: {max_delta_ppl_pct: -50, seq_len: 128}\n")
    out = tmp_path / "out"
    code, _, err = run_cli("convert", tiny("llama"), "-r", recipe, "-o", out, "--eval-dataset", text_file)
    assert code == 1 and "gate" in err
    assert read_json(out / "moefy.json")["gates"]["passed"] is False


def test_crlf_text_reads_like_text_mode(tmp_path):
    from moefy.io.data import load_text

    path = tmp_path / "crlf.raw"
    path.write_bytes(b"one\r\ntwo\rthree\n")
    data = load_text(str(path))
    assert data.text == "one\ntwo\nthree\n"
    import hashlib

    assert data.sha256 == hashlib.sha256(b"one\r\ntwo\rthree\n").hexdigest()


def test_eval_of_native_output_never_asks_for_remote_code(tiny, tmp_path, text_file):
    out = tmp_path / "native"
    assert run_cli("convert", tiny("llama"), "-r", "mlpmoe", "-o", out, "--format", "native")[0] == 0
    code, stdout, err = run_cli("eval", out, "--dataset", text_file, "--seq-len", "64")
    assert code == 0, err
    assert "custom code" not in stdout + err and "trust_remote_code" not in stdout + err


def test_eval_backends_agree_on_a_standard_export(tiny, tmp_path, text_file):
    """A Mixtral export runs on every moefy backend through transformers' experts hook (triton: interpreter)."""
    src = tiny("llama")
    out = tmp_path / "out"
    assert run_cli("convert", src, "-r", "upcycle-8x2", "-o", out)[0] == 0
    assert read_json(out / "config.json")["model_type"] == "mixtral"
    reports = {backend: evaluate(str(out), baseline=None, dataset=str(text_file), seq_len=32, max_windows=2,
                                 backend=backend) for backend in ("auto", "reference", "triton")}
    assert [r["backend"] for r in reports.values()] == ["torch", "reference", "triton"]
    assert moefy.load(out, backend="triton").config._experts_implementation == "moefy_triton"
    dense = evaluate(str(src), baseline=None, dataset=str(text_file), seq_len=32, max_windows=2)["ppl"]
    for report in reports.values():  # upcycling is exact at init, on every backend
        assert math.isclose(report["ppl"], dense, rel_tol=1e-5)
