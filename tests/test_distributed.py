"""Data-parallel distillation under torchrun (gloo, 2 CPU processes): the same recipe, seed and global batch
train the same weights as one process, only rank 0 writes OUT, and a batch the processes cannot share is
refused before any work."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, read_json, run_cli

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no torch.distributed gloo backend")
RECIPE = """name: test-ddp
transforms:
  - carve: {experts: 8, shared: 1, top_k: 2}
  - distill: {end_to_end: {budget: {tokens: 1024}, lr: 1e-3, batch: BATCH}}
calibration: {samples: 24, seq_len: 64}
"""


def _torchrun(*args, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={processes}", "-m", "moefy", "-q", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_train_the_weights_one_process_does(tiny, tmp_path, text_file):
    src = tiny("llama", intermediate_size=256)
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(RECIPE.replace("BATCH", "2"))
    code, _, err = run_cli("convert", src, "-r", recipe, "-o", tmp_path / "one", "--calib", text_file)
    assert code == 0, err
    done = _torchrun("convert", src, "-r", recipe, "-o", tmp_path / "two", "--calib", text_file)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (read_json(tmp_path / name / "moefy.json")["finalize"]["distill"] for name in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2) and one["batch"] == two["batch"] == 2
    assert one["steps"] == two["steps"] == 1024 // (64 * 2) and one["kept"] and two["kept"]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    carved = tmp_path / "carved.yaml"  # the distillation moved the weights, and both runs moved them alike
    carved.write_text(RECIPE.split("  - distill")[0] + "calibration: {samples: 24, seq_len: 64}\n")
    code, _, err = run_cli("convert", src, "-r", carved, "-o", tmp_path / "carved", "--calib", text_file)
    assert code == 0, err
    c = load_file(tmp_path / "carved" / "model.safetensors")
    moved = max((a[k] - c[k]).abs().max().item() for k in a)
    apart = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-5 and apart < 1e-2 * moved, (moved, apart)  # measured: 1.8e-4 moved, 7e-9 apart
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # rank 1 left nothing here


def test_a_batch_the_processes_cannot_share_is_refused_before_any_work(tiny, tmp_path, text_file):
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(RECIPE.replace("BATCH", "3"))
    done = _torchrun("convert", tiny("llama", intermediate_size=256), "-r", recipe, "-o", tmp_path / "out",
                     "--calib", text_file)
    assert done.returncode != 0
    ours = done.stderr[:done.stderr.index("error: ")]  # each rank's one paragraph comes before torchrun's report
    assert "Traceback" not in ours and "multiple of 2" in done.stderr.split("error: ")[1]
    assert not (tmp_path / "out").exists()
