"""Corrupt or inconsistent input is never converted: safetensors validated as strictly as the `safetensors` library
(fuzzed against it), index entries stay inside the model directory, NaN/Inf found in every float dtype, files
that change while read, perplexities that are not numbers, windows longer than the model, resumed outputs
whose files changed."""

import json
import os
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moefy.errors import BadInput, CheckFailed
from moefy.io.safetensors_file import SafetensorsFile
from tests.conftest import make_tiny, run_cli

TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
           "c": torch.tensor([1, 2, 3], dtype=torch.int64), "e": torch.zeros(0, 3)}


def _valid_file(path):
    save_file(TENSORS, str(path), metadata={"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data: bytes, header_len: int | None = None):
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)


def _library(path):
    """What the safetensors library reads from the file (None: it refuses it)."""
    try:
        with safe_open(str(path), "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError):
        return None


def _moefy(path):
    """What moefy reads (None: BadInput). Any other exception fails the test."""
    try:
        file = SafetensorsFile(path)
        try:
            return {name: file.read(name).clone() for name in file.header}
        finally:
            file.close()
    except BadInput:
        return None


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.reshape(-1).view(torch.uint8),
                                                                  y.reshape(-1).view(torch.uint8))
        for x, y in ((a[k], b[k]) for k in a))


def _agree(path):
    theirs, ours = _library(path), _moefy(path)
    if theirs is None:
        assert ours is None, "moefy read a file the safetensors library refuses"
    else:
        assert ours is not None and _same(theirs, ours), "moefy refused or misread a file the library reads"


@pytest.mark.parametrize("case", ["overlap", "gap", "outside", "negative", "trailing", "short",
                                  "bool-shape", "float-offset", "metadata", "header-too-long", "not-object"])
def test_corrupt_safetensors_are_refused_like_the_library_refuses_them(tmp_path, case):
    path = tmp_path / "x.safetensors"
    header, data = _valid_file(path)
    a_end = header["a"]["data_offsets"][1]
    if case == "overlap":
        header["b"]["data_offsets"] = [a_end - 8, a_end]
        header["b"]["shape"] = [4]
    elif case == "gap":
        data += b"\0" * 4
        for name in ("b", "c"):
            header[name]["data_offsets"] = [o + 4 for o in header[name]["data_offsets"]]
    elif case == "outside":
        header["c"]["data_offsets"] = [o + 1000 for o in header["c"]["data_offsets"]]
    elif case == "negative":
        header["a"]["data_offsets"] = [-24, 0]
    elif case == "trailing":
        data += b"extra"
    elif case == "short":
        data = data[:-3]
    elif case == "bool-shape":
        header["a"]["shape"] = [True, 3 * 2]
    elif case == "float-offset":
        header["a"]["data_offsets"] = [0.0, float(a_end)]
    elif case == "metadata":
        header["__metadata__"] = {"format": 1}
    elif case == "header-too-long":
        _write(path, header, data, header_len=10**12)
    elif case == "not-object":
        _write(path, b"[1, 2]", data)
    if case not in ("header-too-long", "not-object"):
        _write(path, header, data)
    assert _library(path) is None  # the oracle refuses each of these
    with pytest.raises(BadInput):
        SafetensorsFile(path)


def _json_values():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                     st.text(max_size=8), st.sampled_from(["F32", "BF16", "I64", "F8_E4M3", "U16", "F4"]))
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6),
                                                                                          inner, max_size=3),
                        max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_safetensors_read_exactly_as_the_library_reads_them(tmp_path, data):
    """Random mutations of a valid file's header, header length and data: moefy reads what the library reads,
    bit for bit, and refuses (BadInput) what it refuses; never another exception, never a different tensor."""
    path = tmp_path / "fuzz.safetensors"
    header, payload = _valid_file(path)
    kind = data.draw(st.sampled_from(["value", "offsets", "bytes", "length", "data"]))
    if kind == "value":  # any field of any entry replaced by any JSON value
        name = data.draw(st.sampled_from(sorted(header)))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]
                                          if name != "__metadata__" else ["format", "other"]))
        header[name][field] = data.draw(_json_values())
        _write(path, header, payload)
    elif kind == "offsets":  # plausible integer offsets and shapes, the likeliest silent misread
        name = data.draw(st.sampled_from(["a", "b", "c", "e"]))
        header[name]["data_offsets"] = data.draw(st.lists(st.integers(-4, 80), min_size=2, max_size=2))
        if data.draw(st.booleans()):
            header[name]["shape"] = data.draw(st.lists(st.integers(0, 6), max_size=3))
        _write(path, header, payload)
    elif kind == "bytes":  # the header's text itself damaged
        text = bytearray(json.dumps(header).encode())
        for _ in range(data.draw(st.integers(1, 4))):
            text[data.draw(st.integers(0, len(text) - 1))] = data.draw(st.integers(0, 255))
        _write(path, bytes(text), payload)
    elif kind == "length":
        text = json.dumps(header).encode()
        _write(path, text, payload, header_len=data.draw(st.integers(0, len(text) + len(payload) + 8)))
    else:  # data cut short or extended
        cut = data.draw(st.integers(-len(payload), 16))
        _write(path, header, payload[:cut] if cut < 0 else payload + b"\x7f" * cut)
    _agree(path)


def test_index_entries_must_stay_inside_the_model_directory(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))
    for target in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        src = make_tiny(tmp_path / f"m{abs(hash(target))}", "llama", shard="20KB")
        index_path = src / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["weight_map"][next(iter(index["weight_map"]))] = target
        index_path.write_text(json.dumps(index))
        code, _, err = run_cli("convert", src, "-r", "mlpmoe", "-o", tmp_path / "out", "--dry-run")
        assert code == 2 and "outside" in err and "index" in err, err


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16,
                                   torch.float64])
def test_nan_and_inf_are_found_in_every_float_dtype(tiny, tmp_path, dtype):
    from safetensors.torch import load_file

    src = tiny("llama")
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"
    broken = tensors[name].to(dtype)
    broken.view(-1)[3] = float("nan")
    tensors[name] = broken
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli("convert", src, "-r", "mlpmoe", "-o", tmp_path / "out")
    assert code == 1 and name in err and "NaN or Inf" in err, err


def test_a_file_that_changes_while_being_read_is_a_clear_error(tmp_path):
    path = tmp_path / "x.safetensors"
    _valid_file(path)
    file = SafetensorsFile(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 8)  # another process shrinks it: a mapping past the end is SIGBUS
    with pytest.raises(CheckFailed, match="changed while moefy was reading it"):
        file.read("c")
    file.close()


def test_a_bin_checkpoint_that_changes_while_being_read_is_a_clear_error(tmp_path):
    """A .bin is read through a lazy map: a tensor is copied out only while the file is as it was mapped."""
    from moefy.io.checkpoint import open_source

    checkpoint = open_source(make_tiny(tmp_path / "m", "llama", safe=False))
    first, second = checkpoint.tensor_names[:2]
    assert checkpoint.get(first).numel() > 0
    with open(checkpoint.path / "pytorch_model.bin", "ab") as f:
        f.write(b"\0" * 64)  # rewritten meanwhile (grown here: a shrunk map would be SIGBUS if touched)
    with pytest.raises(CheckFailed, match="changed while moefy was reading it"):
        checkpoint.get(second)


def test_tensors_already_read_survive_the_file_shrinking(tmp_path):
    """A tensor read before the source shrank stays readable: it is not a memory map of the file, whose
    pages would end the process with SIGBUS when touched (a conversion was killed so, exit 135)."""
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(4096 * 4, dtype=torch.float32)}, str(path))
    file = SafetensorsFile(path)
    tensor = file.read("w")
    with open(path, "r+b") as f:
        f.truncate(64)
    assert float(tensor.sum()) == float(torch.arange(4096 * 4, dtype=torch.float64).sum())
    with pytest.raises(CheckFailed, match="changed while moefy was reading it"):
        file.read("w")
    file.close()


def test_eval_refuses_windows_longer_than_the_model_and_reports_nan_perplexity(tiny, tmp_path, text_file):
    from safetensors.torch import load_file

    src = tiny("llama")  # max_position_embeddings 256
    code, _, err = run_cli("eval", src, "--dataset", text_file, "--seq-len", "300")
    assert code == 2 and "--seq-len 300" in err and "256" in err, err
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"][0] = float("inf")  # finite weights elsewhere; the logits overflow to NaN
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli("eval", src, "--dataset", text_file, "--seq-len", "64", "--max-windows", "3")
    assert code == 1 and "window 0" in err and "not a finite" in err, err


def test_eval_refuses_a_baseline_with_another_vocabulary(tiny, text_file):
    code, _, err = run_cli("eval", tiny("llama"), "--baseline", tiny("llama", vocab_size=64), "--dataset",
                           text_file, "--seq-len", "32", "--max-windows", "1")
    assert code == 2 and "vocab" in err, err


def test_resume_trusts_only_outputs_whose_files_match_their_record(tiny, tmp_path):
    import yaml

    src = tiny("llama")
    out = tmp_path / "out"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"jobs": [{"source": str(src), "recipe": "mlpmoe", "out": str(out)}]}))
    assert run_cli("batch", manifest)[0] == 0
    record = json.loads((out / "moefy.json").read_text())
    assert set(record["output_sha256"]) == {"model.safetensors"}
    weights = out / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-4] + b"\0\0\0\0")  # same size, other bytes
    code, _, _ = run_cli("batch", manifest, "--resume", "--json", tmp_path / "s.json")
    assert code == 0 and json.loads((tmp_path / "s.json").read_text())["jobs"][0]["status"] == "done"
    assert weights.read_bytes() == good  # converted again
    weights.unlink()
    code, _, _ = run_cli("batch", manifest, "--resume", "--json", tmp_path / "s2.json")
    assert code == 0 and json.loads((tmp_path / "s2.json").read_text())["jobs"][0]["status"] == "done"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("sharded") / "src", "llama", shard="20KB")


def _fresh_copy(source, tmp_path):
    """The source as a new copy for each example (the previous one mutated it)."""
    src = tmp_path / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(source, src)
    return src


def _cli_verdict(args):
    code, _, err = run_cli(*args)
    assert code in (0, 2), (code, err)
    assert "internal error" not in err and "Traceback" not in err, err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_configs_are_converted_or_refused_never_an_internal_error(sharded, tmp_path, data):
    src = _fresh_copy(sharded, tmp_path)
    config = json.loads((src / "config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(config) + ["new_field"]))
        if data.draw(st.booleans()):
            config[key] = data.draw(_json_values())
        else:
            config.pop(key, None)
    (src / "config.json").write_text(json.dumps(config))
    _cli_verdict(["convert", src, "-r", "mlpmoe", "-o", tmp_path / "out", "--dry-run"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_indexes_are_converted_or_refused_never_an_internal_error(sharded, tmp_path, data):
    src = _fresh_copy(sharded, tmp_path)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    kind = data.draw(st.sampled_from(["value", "drop", "add", "map", "text"]))
    name = data.draw(st.sampled_from(sorted(weight_map)))
    if kind == "value":
        weight_map[name] = data.draw(st.one_of(st.sampled_from(files + ["../x", "/etc/passwd", "", "."]),
                                               _json_values()))
    elif kind == "drop":
        del weight_map[name]
    elif kind == "add":
        weight_map[data.draw(st.text(max_size=12))] = data.draw(st.sampled_from(files))
    elif kind == "map":
        index["weight_map"] = data.draw(_json_values())
    text = json.dumps(index)
    if kind == "text":
        cut = data.draw(st.integers(0, len(text)))
        text = text[:cut] + data.draw(st.text(max_size=4)) + text[cut:]
    index_path.write_text(text)
    _cli_verdict(["convert", src, "-r", "mlpmoe", "-o", tmp_path / "out", "--dry-run"])
