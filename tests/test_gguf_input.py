"""A `.gguf` source is read only when it is well-formed: counts bounded by the bytes left (no hang), tensors
inside the file and apart (no silent misread), every tensor the architecture needs present (transformers would
fill a missing one with random values). Fuzzed: random mutations of a valid header give the original model, a
model the file really describes, or exit 2 — never another exit, a hang or a different tensor."""

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from moefy.errors import BadInput
from moefy.io.checkpoint import open_source
from tests.conftest import run_cli

gguf = pytest.importorskip("gguf", reason="reading .gguf sources needs the `gguf` package (pip install gguf)")


def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (a byte-level BPE vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_in[b] = chr(b)
        else:
            stand_in[b], extra = chr(256 + extra), extra + 1
    return [stand_in[b] for b in range(256)]


def write_tiny_gguf(path, hidden=16, inter=32, layers=2, heads=2, kv_heads=1, seed=0):
    """A llama GGUF of random f32 weights with a byte-level BPE tokenizer transformers can rebuild."""
    rng = np.random.default_rng(seed)
    tokens = _byte_tokens() + ["th", "er", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["t h", "e r"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    head_dim = hidden // heads
    w.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    w.add_tensor("output_norm.weight", 1 + weight(hidden))
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (kv_heads * head_dim, hidden)), ("attn_v", (kv_heads * head_dim, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (inter, hidden)),
                            ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(*shape) + (1 if "norm" in name else 0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class Valid:
    """The bytes of a valid tiny GGUF and where its fields lie (from gguf's own reader)."""

    def __init__(self, path):
        from gguf import GGUFReader

        self.raw = path.read_bytes()
        reader = GGUFReader(str(path))
        self.fields = {name: field.offset for name, field in reader.fields.items()}
        self.infos = [t.field.offset for t in reader.tensors]
        self.data_start = reader.data_offset


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return Valid(write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


def _materialized(path, cache, monkeypatch):
    """The state dict moefy dequantizes the file into (None: BadInput). Any other exception fails the test."""
    monkeypatch.setenv("MOEFY_CACHE", str(cache))
    try:
        checkpoint = open_source(str(path))
    except BadInput:
        return None
    return load_file(str(checkpoint.path / "model.safetensors"))


def _reader_tensors(path):
    """What gguf's own reader sees of the tensors: name → (type, shape, data bytes); None when it refuses."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        return {t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape), bytes(t.data)) for t in reader.tensors}
    except Exception:  # noqa: BLE001 - the reader raises many types on a damaged file
        return None


def _mutate_u(raw: bytes, at: int, code: str, value: int) -> bytes:
    return raw[:at] + struct.pack("<" + code, value) + raw[at + struct.calcsize(code):]


@pytest.mark.parametrize("case", ["magic", "version", "huge-array", "huge-tensor-count", "overlap", "past-end",
                                  "misaligned", "unknown-type", "renamed", "bool", "truncated", "rank"])
def test_damaged_gguf_headers_are_exit_2_naming_the_file(valid, tmp_path, monkeypatch, case):
    fields, infos, data_start, raw = valid.fields, valid.infos, valid.data_start, valid.raw
    tokens = fields["tokenizer.ggml.tokens"]
    first, second = infos[0], infos[1]
    name_len = struct.unpack_from("<Q", raw, first)[0]
    first_offset_at = first + 8 + name_len + 4 + 8 * struct.unpack_from("<I", raw, first + 8 + name_len)[0] + 4
    if case == "magic":
        raw = b"GGUX" + raw[4:]
    elif case == "version":
        raw = _mutate_u(raw, 4, "I", 7)
    elif case == "huge-array":  # an array length of 2^60: the reader would loop for ever
        key_len = struct.unpack_from("<Q", raw, tokens)[0]
        raw = _mutate_u(raw, tokens + 8 + key_len + 4 + 4, "Q", 2**60)
    elif case == "huge-tensor-count":
        raw = _mutate_u(raw, 8, "Q", 2**40)
    elif case == "overlap":  # the first tensor moved onto the second one's bytes
        second_name = struct.unpack_from("<Q", raw, second)[0]
        second_offset_at = second + 8 + second_name + 4 + 8 * 2 + 4
        raw = _mutate_u(raw, first_offset_at, "Q", struct.unpack_from("<Q", raw, second_offset_at)[0])
    elif case == "past-end":
        raw = _mutate_u(raw, first_offset_at, "Q", len(raw))
    elif case == "misaligned":
        raw = _mutate_u(raw, first_offset_at, "Q", struct.unpack_from("<Q", raw, first_offset_at)[0] + 4)
    elif case == "unknown-type":
        raw = _mutate_u(raw, first_offset_at - 4, "I", 999)
    elif case == "renamed":  # a well-formed file that lacks a tensor llama needs
        at = raw.index(b"blk.0.ffn_up")
        raw = raw[:at] + b"blk.0.ffn_uq" + raw[at + 12:]
    elif case == "bool":  # GGUF booleans are 0 or 1
        key = fields["tokenizer.ggml.add_bos_token"]
        raw = _mutate_u(raw, key + 8 + struct.unpack_from("<Q", raw, key)[0] + 4, "B", 2)
    elif case == "truncated":
        raw = raw[:data_start - 3]
    elif case == "rank":
        raw = _mutate_u(raw, first + 8 + name_len, "I", 9)
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    monkeypatch.setenv("MOEFY_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli("inspect", path)
    assert code == 2, err
    assert str(path) in " ".join(err.split()) and "Traceback" not in err and "internal error" not in err


def test_the_valid_tiny_gguf_converts_and_keeps_its_weights(valid, tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(valid.raw)
    state = _materialized(path, tmp_path / "cache", monkeypatch)
    assert state is not None and len(state) == 2 + 2 * 9
    embed = _reader_tensors(path)["token_embd.weight"]
    assert torch.equal(state["model.embed_tokens.weight"].reshape(-1),
                       torch.frombuffer(bytearray(embed[2]), dtype=torch.float32))
    code, _, err = run_cli("convert", path, "-r", "mlpmoe", "-o", tmp_path / "out")
    assert code == 0, err


PERMUTED = ("self_attn.q_proj", "self_attn.k_proj")  # un-permuted by transformers with the file's head counts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_gguf_headers_give_the_model_the_file_describes_or_exit_2(valid, tmp_path_factory, monkeypatch,
                                                                          data):
    """A mutated header is refused (BadInput), or read with every tensor's bytes exactly where gguf's reader
    finds them: the same tensor table as the valid file and the same weights (q/k may be permuted differently
    when a head count changed — that is what such a file says)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    fields, infos, data_start = valid.fields, valid.infos, valid.data_start
    raw = bytearray(valid.raw)
    kind = data.draw(st.sampled_from(["byte", "u64", "u32", "cut"]))
    if kind == "byte":  # anywhere in the header
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, data_start - 1))] = data.draw(st.integers(0, 255))
    elif kind in ("u64", "u32"):  # a count, length, dimension, type or offset field replaced whole
        starts = sorted({*fields.values(), *infos, 8, 16})
        at = data.draw(st.sampled_from(starts)) + data.draw(st.integers(0, 40))
        code = "Q" if kind == "u64" else "I"
        value = data.draw(st.one_of(st.integers(0, 64), st.integers(0, 2**(64 if kind == "u64" else 32) - 1)))
        raw = bytearray(_mutate_u(bytes(raw), min(at, data_start - 8), code, value))
    else:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    path = tmp / "fuzz.gguf"
    path.write_bytes(bytes(raw))
    ours = _materialized(path, tmp / "cache", monkeypatch)
    event("refused" if ours is None else "read")
    if ours is None:
        return
    original = tmp / "original.gguf"
    original.write_bytes(valid.raw)
    assert _reader_tensors(path) == _reader_tensors(original), "moefy read a file whose tensor table changed"
    reference = _materialized(original, tmp / "cache", monkeypatch)
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        assert tensor.shape == reference[name].shape, name
        if not any(p in name for p in PERMUTED):
            assert torch.equal(tensor, reference[name]), name
