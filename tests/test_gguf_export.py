"""`moefy export-gguf`: GGUF in, GGUF out. Read back with gguf's own reader: every key and tensor llama.cpp's
loader requires for the architecture, in the shapes it creates them; the decoder bit-identical to the source
GGUF's; and the file's function — run by a deliberately plain reading of llama.cpp's graph (interleaved RoPE,
softmax top-k renormalised, Granite's scales) — equal to the moefy output's logits."""

import math
import stat

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import moefy
from moefy.io.output import umask
from tests.conftest import read_json, run_cli

gguf = pytest.importorskip("gguf", reason="writing GGUF needs the `gguf` package (pip install gguf)")
from tests.test_gguf_input import write_tiny_gguf  # noqa: E402 - after the skip: it needs gguf too

HIDDEN, INTER, LAYERS = 16, 128, 2
# what llama.cpp's loaders (src/models/llama.cpp, granite-moe.cpp) read without a default
REQUIRED_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                 "attention.layer_norm_rms_epsilon", "expert_count", "expert_used_count")
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp",
                 "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
SHARED_TENSORS = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hidden=HIDDEN, inter=INTER, layers=LAYERS)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(("The quick brown fox jumps over the lazy dog. " * 8 + "\n") * 20)
    return path


def _convert(source, out, transform: dict, *args):
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(yaml.safe_dump({"transforms": [transform], "calibration": {"samples": 4, "seq_len": 32}}))
    code, _, err = run_cli("convert", source, "-r", recipe, "-o", out, *args)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def outputs(source, text, tmp_path_factory):
    """{format: moefy output} of the tiny GGUF: mlpmoe as Mixtral, an upcycle with a shared expert as
    GraniteMoeShared."""
    root = tmp_path_factory.mktemp("outs")
    mixtral = _convert(source, root / "mixtral", {"slice": {"experts": 16}})
    shared = _convert(source, root / "shared", {"upcycle": {"experts": 8, "top_k": 2, "granularity": 2,
                                                            "shared": "slice", "shared_fraction": 0.25}},
                      "--calib", text)
    assert read_json(mixtral / "moefy.json")["format"]["name"] == "mixtral"
    assert read_json(shared / "moefy.json")["format"]["name"] == "granitemoeshared"
    return {"mixtral": mixtral, "granitemoeshared": shared}


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(reader) -> dict[str, torch.Tensor]:
    """name → tensor in torch's order (GGUF lists dimensions innermost first); f16/bf16 read as f32."""
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        out[t.name] = torch.from_numpy(data.astype(np.float32).reshape(shape).copy())
    return out


@pytest.mark.parametrize("fmt, arch", [("mixtral", "llama"), ("granitemoeshared", "granitemoe")])
def test_the_file_holds_what_llamacpp_requires_and_the_decoder_of_the_source(outputs, source, fmt, arch):
    out = outputs[fmt]
    code, _, err = run_cli("export-gguf", out)
    assert code == 0, err
    path = out.with_name(out.name + ".gguf")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask()  # a file like any other the user writes
    reader = gguf.GGUFReader(str(path))
    fields, tensors = _fields(reader), _tensors(reader)
    assert fields["general.architecture"] == arch
    assert all(f"{arch}.{key}" in fields for key in REQUIRED_KEYS)
    if arch == "granitemoe":
        assert fields["granitemoe.logit_scale"] == 1.0 and fields["granitemoe.expert_shared_feed_forward_length"] > 0
    original = gguf.GGUFReader(str(source))
    assert {k: v for k, v in _fields(original).items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    config = read_json(out / "config.json")
    experts, width = config["num_local_experts"], config["intermediate_size"]
    expected = {"ffn_gate_inp": (experts, HIDDEN), "ffn_gate_exps": (experts, width, HIDDEN),
                "ffn_up_exps": (experts, width, HIDDEN), "ffn_down_exps": (experts, HIDDEN, width)}
    names = LAYER_TENSORS + (SHARED_TENSORS if arch == "granitemoe" else ())
    for i in range(LAYERS):
        assert all(f"blk.{i}.{name}.weight" in tensors for name in names)
        assert all(tuple(tensors[f"blk.{i}.{name}.weight"].shape) == shape for name, shape in expected.items())
    for name, tensor in _tensors(original).items():  # embeddings, attention, norms: the source's own bits
        if "ffn_" not in name or name.endswith("ffn_norm.weight"):
            assert torch.equal(tensors[name], tensor), name


def _rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope_interleaved(x, base):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs (2i, 2i+1) of each head by pos·base^(-2i/d)."""
    t, _, d = x.shape
    angle = torch.arange(t, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(x.shape)


def llamacpp_logits(path, ids: list[int]) -> torch.Tensor:
    """The GGUF's logits as llama.cpp's Llama / GraniteMoe graphs compute them, in float64, written plainly."""
    reader = gguf.GGUFReader(str(path))
    f, w = _fields(reader), {k: v.double() for k, v in _tensors(reader).items()}
    arch = f["general.architecture"]
    key = lambda name, default=None: f.get(f"{arch}.{name}", default)  # noqa: E731
    heads, kv_heads, eps = key("attention.head_count"), key("attention.head_count_kv"), \
        key("attention.layer_norm_rms_epsilon")
    top_k, residual = key("expert_used_count"), key("residual_scale", 1.0)
    x = w["token_embd.weight"][ids] * key("embedding_scale", 1.0)
    t = len(ids)
    for i in range(key("block_count")):
        p = lambda name, i=i: w[f"blk.{i}.{name}.weight"]  # noqa: E731
        h = _rms(x, p("attn_norm"), eps)
        q = _rope_interleaved((h @ p("attn_q").T).view(t, heads, -1), key("rope.freq_base"))
        k = _rope_interleaved((h @ p("attn_k").T).view(t, kv_heads, -1), key("rope.freq_base"))
        v = (h @ p("attn_v").T).view(t, kv_heads, -1)
        k, v = (z.repeat_interleave(heads // kv_heads, 1) for z in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) * key("attention.scale", 1 / math.sqrt(q.shape[-1]))
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        x = x + residual * (torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, -1) @ p("attn_output").T)
        h = _rms(x, p("ffn_norm"), eps)
        probs = (h @ p("ffn_gate_inp").T).softmax(-1)
        weights, chosen = probs.topk(top_k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        y = torch.zeros_like(h)
        for token in range(t):
            for weight, e in zip(weights[token], chosen[token]):
                act = torch.nn.functional.silu(p("ffn_gate_exps")[e] @ h[token]) * (p("ffn_up_exps")[e] @ h[token])
                y[token] += weight * (p("ffn_down_exps")[e] @ act)
        if f"blk.{i}.ffn_gate_shexp.weight" in w:
            y = y + (torch.nn.functional.silu(h @ p("ffn_gate_shexp").T) * (h @ p("ffn_up_shexp").T)) \
                @ p("ffn_down_shexp").T
        x = x + residual * y
    head = w.get("output.weight", w["token_embd.weight"])
    return _rms(x, w["output_norm.weight"], eps) @ head.T / key("logit_scale", 1.0)


@pytest.mark.parametrize("fmt", ["mixtral", "granitemoeshared"])
def test_the_file_computes_the_moefy_output(outputs, tmp_path, fmt):
    out, target = outputs[fmt], tmp_path / f"{fmt}.gguf"
    code, _, err = run_cli("export-gguf", out, "-o", target)
    assert code == 0, err
    ids = torch.randint(0, 259, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        expected = moefy.load(out)(input_ids=torch.tensor([ids])).logits[0].double()
    torch.testing.assert_close(llamacpp_logits(target, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, kind", [("f16", "F16"), ("bf16", "BF16")])
def test_half_types_round_the_matrices_and_keep_norms_and_routers_f32(outputs, tmp_path, dtype, kind):
    target = tmp_path / f"{dtype}.gguf"
    code, _, err = run_cli("export-gguf", outputs["mixtral"], "-o", target, "--dtype", dtype)
    assert code == 0, err
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(target)).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up_exps.weight"] == kind
    assert types["blk.0.attn_norm.weight"] == types["blk.0.ffn_gate_inp.weight"] == "F32"
    stored = load_file(outputs["mixtral"] / "model.safetensors")
    down = torch.stack([stored[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"] for e in range(16)])
    half = torch.float16 if dtype == "f16" else torch.bfloat16
    assert torch.equal(_tensors(gguf.GGUFReader(str(target)))["blk.1.ffn_down_exps.weight"], down.to(half).float())


def test_what_cannot_be_exported_is_exit_2_and_nothing_is_replaced(outputs, tiny, tmp_path):
    native = tmp_path / "native"
    code, _, err = run_cli("convert", tiny("llama"), "-r", "mlpmoe", "-o", native, "--format", "native")
    assert code == 0, err
    code, _, err = run_cli("export-gguf", native, "-o", tmp_path / "n.gguf")
    assert code == 2 and "native format" in err and not (tmp_path / "n.gguf").exists()
    hf = tmp_path / "hf"  # an HF source has no llama.cpp tokenizer to carry
    code, _, err = run_cli("convert", tiny("llama", intermediate_size=128), "-r", "mlpmoe", "-o", hf)
    assert code == 0, err
    code, _, err = run_cli("export-gguf", hf, "-o", tmp_path / "hf.gguf")
    assert code == 2 and "--tokenizer-from" in err
    code, _, err = run_cli("export-gguf", hf, "-o", tmp_path / "hf.gguf", "--tokenizer-from",
                           outputs["mixtral"].with_name("mixtral.yaml"))
    assert code == 2 and "not a .gguf file" in err
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"not moefy's")
    code, _, err = run_cli("export-gguf", outputs["mixtral"], "-o", mine)
    assert code == 2 and "--force" in err
    code, _, err = run_cli("export-gguf", outputs["mixtral"], "-o", mine, "--force")
    assert code == 2 and "not a GGUF moefy wrote" in err and mine.read_bytes() == b"not moefy's"
    code, _, err = run_cli("export-gguf", outputs["mixtral"], "-o", outputs["mixtral"] / "x.gguf")
    assert code == 2 and not (outputs["mixtral"] / "x.gguf").exists()
    target = tmp_path / "again.gguf"
    for _ in range(2):  # its own previous file is replaced with --force
        code, _, err = run_cli("export-gguf", outputs["mixtral"], "-o", target, "--force")
        assert code == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
