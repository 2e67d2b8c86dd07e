"""Reliability: killed conversions leave nothing, runs are reproducible to the byte, broken numbers are caught,
pickles never run code, remote code is never trusted implicitly, a full disk loses nothing."""

import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import REPO, make_tiny, read_json, run_cli


def digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A checkpoint deep enough (24 layers) that each phase of a conversion lasts long enough to be killed in."""
    return make_tiny(tmp_path_factory.mktemp("deep") / "llama", "llama", num_hidden_layers=24, hidden_size=128,
                     intermediate_size=512)


def _kill_when(src, out, ready, extra=()):
    """Start `moefy convert`, SIGKILL it as soon as `ready(log_line, tmp_dirs)` holds; returns the log so far."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "moefy", "convert", str(src), "-r", "mlpmoe", "-o", str(out),
                                "--set", "output.shard_size=64KB", *extra], stderr=subprocess.PIPE, cwd=REPO,
                               env=env)
    os.set_blocking(process.stderr.fileno(), False)
    log, deadline = "", time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        log += (process.stderr.read() or b"").decode(errors="replace")
        if ready(log, list(out.parent.glob(f".{out.name}.moefy-tmp-*"))):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"finished before the kill point:\n{log}"
    return log


@pytest.mark.parametrize("point", ["load", "transform", "write"])
def test_kill_9_leaves_no_out_and_the_source_untouched(deep, tmp_path, point):
    before = digests(deep)
    out = tmp_path / "out"
    ready = {
        "load": lambda log, tmps: "source " in log,  # checkpoint opened and planned, nothing written yet
        "transform": lambda log, tmps: "convert layers:" in log,  # layers being cut and written
        "write": lambda log, tmps: any(len(list(t.glob("shard-*.tmp"))) >= 3 for t in tmps),  # shards on disk
    }[point]
    _kill_when(deep, out, ready)
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    # only a clearly named temp dir, and the lock file whose flock died with the process
    assert all(name.startswith(".out.moefy-tmp-") or name == ".out.moefy-lock" for name in leftovers), leftovers
    assert digests(deep) == before
    assert run_cli("convert", deep, "-r", "mlpmoe", "-o", out)[0] == 0  # the next run succeeds and sweeps it up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_gets_the_mode_mkdir_would_give(tiny, tmp_path):
    """OUT is written in a private temp dir, but lands with the umask's mode, as any directory the user makes."""
    old = os.umask(0o027)
    try:
        code, _, err = run_cli("convert", tiny("llama"), "-r", "mlpmoe", "-o", tmp_path / "out")
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


def test_same_inputs_give_identical_bytes(tiny, tmp_path, text_file):
    """Calibrated carve + fitted router, and seeded Drop-Upcycling: twice → the same files, bit for bit; only
    moefy.json's `timing` differs."""
    src = tiny("qwen2")
    for recipe, extra in (("carve-50", ["--calib", text_file, "--set", "calibration.samples=4", "--set",
                                        "calibration.seq_len=64", "--set", "transforms.0.carve.experts=16",
                                        "--set", "transforms.0.carve.shared=4", "--set", "transforms.0.carve.top_k=4"]),
                          ("drop-upcycle-8x2", [])):
        runs = []
        for attempt in ("a", "b"):
            out = tmp_path / f"{recipe}-{attempt}"
            code, _, err = run_cli("convert", src, "-r", recipe, "-o", out, "--seed", "7", *extra)
            assert code == 0, err
            record = read_json(out / "moefy.json")
            assert set(record["timing"]) >= {"created_at", "convert_seconds"}
            del record["timing"]
            runs.append(({n: d for n, d in digests(out).items() if n != "moefy.json"}, record))
        assert runs[0] == runs[1], recipe


def test_nan_in_weights_is_named_and_exit_1(tiny, tmp_path):
    src = tiny("llama")
    tensors = load_file(src / "model.safetensors")
    tensors["model.embed_tokens.weight"][3, 5] = float("inf")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("convert", src, "-r", "mlpmoe", "-o", tmp_path / "out")
    assert code == 1 and "model.embed_tokens.weight" in err and "NaN or Inf" in err
    assert not (tmp_path / "out").exists()


def test_nan_in_calibration_activations_is_named_and_exit_1(tiny, tmp_path, text_file):
    """Finite weights whose attention scores overflow fp32: the MLP inputs of layer 0 become NaN."""
    src = tiny("llama")
    tensors = load_file(src / "model.safetensors")
    for proj in ("q_proj", "k_proj"):
        tensors[f"model.layers.0.self_attn.{proj}.weight"] *= 1e25
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("convert", src, "-r", "carve-50", "-o", tmp_path / "out", "--calib", text_file,
                           "--set", "calibration.samples=2", "--set", "calibration.seq_len=32",
                           "--set", "transforms.0.carve.experts=16", "--set", "transforms.0.carve.shared=4",
                           "--set", "transforms.0.carve.top_k=4")
    assert code == 1 and "layer 0" in err and "NaN or Inf" in err, err
    assert not (tmp_path / "out").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_bin_never_runs_code(tiny, tmp_path):
    src = tiny("llama", safe=False)
    marker = tmp_path / "pwned"
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, src / "pytorch_model.bin")
    code, _, err = run_cli("convert", src, "-r", "mlpmoe", "-o", tmp_path / "out")
    assert code == 2 and "weights_only=True" in err and not marker.exists()


def test_remote_code_is_never_trusted_implicitly(tiny, tmp_path, text_file):
    """A source whose config points at its own modeling code: convert, inspect and eval use the stock class."""
    src = tiny("llama")
    marker = tmp_path / "remote-code-ran"
    (src / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                         "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out)[0] == 0
    assert run_cli("inspect", src)[0] == 0
    code, _, err = run_cli("eval", out, "--baseline", src, "--dataset", text_file, "--seq-len", "64",
                           "--max-windows", "2")
    assert code == 0, err
    assert not marker.exists() and not (out / "modeling_evil.py").exists()


def test_disk_full_is_exit_1_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    from moefy.io import safetensors_file

    written = {"bytes": 0}
    real = safetensors_file.StreamingShard.add

    def filling_disk(self, name, tensor):
        written["bytes"] += tensor.numel() * tensor.element_size()
        if written["bytes"] > 100_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, name, tensor)

    monkeypatch.setattr(safetensors_file.StreamingShard, "add", filling_disk)
    code, _, err = run_cli("convert", tiny("llama"), "-r", "mlpmoe", "-o", tmp_path / "out")
    assert code == 1 and "no space left" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))] == []


def test_internal_errors_are_one_paragraph_and_exit_1(tiny, tmp_path, monkeypatch):
    from moefy.export.native import NativeFormat

    def boom(self, out_dir):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(NativeFormat, "write_files", boom)
    code, _, err = run_cli("convert", tiny("llama"), "-r", "mlpmoe", "-o", tmp_path / "out", "--format", "native")
    assert code == 1 and "internal error: RuntimeError: kernel exploded" in err and "--debug" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
