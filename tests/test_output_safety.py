"""Nothing a user owns is ever destroyed: outputs keep clear of every input, --force replaces only moefy's own
outputs, one writer per OUT, SIGTERM cleans up like Ctrl-C (README "Reliability")."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from moefy.io.output import output_lock
from tests.conftest import REPO, make_tiny, run_cli


def tree_digest(root):
    """sha256 of every file below root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A user's directory: a source checkpoint beside other files, a second checkpoint, data and a recipe."""
    root = tmp_path_factory.mktemp("world")
    models = root / "models"
    make_tiny(models / "src", "llama")
    make_tiny(models / "other", "llama")
    (models / "notes.txt").write_text("the user's notes")
    data = root / "data"
    data.mkdir()
    (data / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    recipe = root / "recipes" / "upcycle.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({"transforms": [{"upcycle": {"experts": 4, "top_k": 2,
                                                                   "sources": [None, str(models / "other"), None,
                                                                               None]}}]}))
    return root


def _refused(args, *needles):
    code, _, err = run_cli(*args)
    assert code == 2, (code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("dry_run", [False, True])
def test_out_never_is_contains_or_lies_inside_an_input(world, dry_run):
    before = tree_digest(world)
    src, flags = world / "models" / "src", ["--force"] + (["--dry-run"] if dry_run else [])
    recipe = world / "recipes" / "upcycle.yaml"
    cases = [
        (world / "models", "mlpmoe", [], "contains the source"),  # the directory holding SOURCE
        (world, "mlpmoe", [], "contains the source"),
        (src, "mlpmoe", [], "is the source"),
        (src / "sub", "mlpmoe", [], "lies inside the source"),
        (world / "models" / "other", str(recipe), [], "is upcycle.sources.1 of the recipe"),
        (world / "recipes", str(recipe), [], "contains the recipe"),
        (world / "data", "carve-50", ["--calib", world / "data" / "calib.txt"], "contains the calibration data"),
        (world / "data" / "calib.txt", "carve-50", ["--calib", world / "data" / "calib.txt"],
         "is the calibration data"),
        (world / "data", "mlpmoe", ["--eval-dataset", world / "data" / "calib.txt"], "contains the evaluation data"),
    ]
    for out, recipe_name, extra, needle in cases:
        _refused(["convert", src, "-r", recipe_name, "-o", out, *flags, *extra], needle, "choose a path outside")
    assert tree_digest(world) == before


def test_reports_never_land_in_an_input(world, tmp_path):
    before = tree_digest(world)
    src = world / "models" / "src"
    out = tmp_path / "out"
    _refused(["convert", src, "-r", "mlpmoe", "-o", out, "--json", src / "config.json"], "--json file", "the source")
    _refused(["convert", src, "-r", "mlpmoe", "-o", out, "--json", src / "report.json", "--dry-run"], "the source")
    assert not out.exists()
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out)[0] == 0
    _refused(["eval", out, "--baseline", src, "--dataset", world / "data" / "calib.txt", "--json",
              src / "model.safetensors"], "lies inside the baseline")
    _refused(["eval", out, "--dataset", world / "data" / "calib.txt", "--json", world / "data" / "calib.txt"],
             "is the dataset")
    _refused(["validate", out, "--json", out / "moefy.json"], "lies inside the model")
    _refused(["validate", out, "--source", src, "--json", world / "models"], "contains the source")
    _refused(["validate", out, "--json", tmp_path], "contains the model")
    assert tree_digest(world) == before


def test_batch_writes_keep_clear_of_every_jobs_inputs(world, tmp_path):
    before = tree_digest(world)
    src, other = world / "models" / "src", world / "models" / "other"
    jobs = [{"source": str(src), "recipe": "mlpmoe", "out": str(tmp_path / "a")},
            {"source": str(other), "recipe": "mlpmoe", "out": str(world / "models")},  # holds job 0's source
            {"source": str(other), "recipe": "mlpmoe", "out": str(tmp_path / "a" / "nested")},
            {"source": str(other), "recipe": "mlpmoe", "out": str(world / "data" / "calib")},  # its log: an input
            {"source": str(src), "recipe": "carve-50", "calib": str(world / "data" / "calib.log"),
             "out": str(tmp_path / "c"), "set": {"calibration.seq_len": 512}}]  # also fails to plan: too long
    (world / "data" / "calib.log").write_text("The quick brown fox. " * 300)
    try:
        manifest = tmp_path / "m.yaml"
        manifest.write_text(yaml.safe_dump({"jobs": jobs}))
        err = _refused(["batch", manifest, "--json", src / "summary.json"], "nothing was started")
        for needle in ("jobs.1 (models): OUT", "contains the source", "jobs.2 (nested): out", "lies inside jobs.0 (a)",
                       "jobs.3 (calib): log", "is the calibration data of jobs.4", "--json file"):
            assert needle in err, (needle, err)
        assert not (tmp_path / "a").exists()
    finally:
        (world / "data" / "calib.log").unlink()
    assert tree_digest(world) == before


def test_a_second_writer_of_the_same_out_is_refused_naming_the_holder(world, tmp_path):
    src, out = world / "models" / "src", tmp_path / "out"
    with output_lock(out):
        err = _refused(["convert", src, "-r", "mlpmoe", "-o", out], "being written by another moefy process",
                       f"PID {os.getpid()}")
        assert "--force" not in err
    assert not out.exists()
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out)[0] == 0  # released: the next writer goes ahead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock file went with the lock


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("deep") / "llama", "llama", num_hidden_layers=24, hidden_size=128,
                     intermediate_size=512)


def _start(src, out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "moefy", "convert", str(src), "-r", "mlpmoe", "-o", str(out),
                                "--set", "output.shard_size=64KB"], stderr=subprocess.PIPE, cwd=REPO, env=env)
    os.set_blocking(process.stderr.fileno(), False)
    return process


def _wait_for(process, needle, timeout=120):
    log, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        log += (process.stderr.read() or b"").decode(errors="replace")
        if needle in log:
            return log
        time.sleep(0.002)
    raise AssertionError(f"{needle!r} never appeared:\n{log}")


def test_two_conversions_to_one_out_at_once(deep, tmp_path):
    """The second is refused with the first's PID while the first writes; the first finishes untouched."""
    out = tmp_path / "out"
    first = _start(deep, out)
    _wait_for(first, "convert layers:")
    code, _, err = run_cli("convert", deep, "-r", "upcycle-8x2", "-o", out, "--force")
    assert code == 2 and f"PID {first.pid}" in err, err
    assert first.wait(timeout=120) == 0
    assert run_cli("convert", deep, "-r", "upcycle-8x2", "-o", out)[0] == 2  # finished: exists, no --force


def test_sigterm_is_handled_like_ctrl_c(deep, tmp_path):
    before = tree_digest(deep)
    out = tmp_path / "out"
    process = _start(deep, out)
    _wait_for(process, "convert layers:")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    tail = (process.stderr.read() or b"").decode(errors="replace")
    assert process.returncode == 128 + signal.SIGTERM, tail
    assert "interrupted (SIGTERM)" in tail and "Traceback" not in tail
    assert list(tmp_path.iterdir()) == []  # no OUT, no temp dir, no lock file
    assert tree_digest(deep) == before
