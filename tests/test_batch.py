"""`moefy batch`: manifest validation up front, parallel jobs in their own processes, gates, --resume, summary."""

import json

import pytest
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import read_json, run_cli


def write_manifest(path, jobs, defaults=None):
    path.write_text(yaml.safe_dump({"defaults": defaults or {}, "jobs": jobs}))
    return path


@pytest.fixture
def two_jobs(tiny, tmp_path, text_file):
    """A Llama and a Qwen2 job: an exact slice (gate 0.001 %) and an upcycle whose gate cannot pass."""
    llama, qwen = tiny("llama"), tiny("qwen2")
    jobs = [{"source": str(llama), "recipe": "mlpmoe", "out": str(tmp_path / "out" / "slice"),
             "eval": {"gates": {"max_delta_ppl_pct": 0.001}}},
            {"name": "upcycle-qwen", "source": str(qwen), "recipe": "upcycle-8x2", "out": str(tmp_path / "out" / "up"),
             "set": {"transforms.0.upcycle.experts": 4},
             "eval": {"gates": {"max_delta_ppl_pct": -100.0}}}]  # ppl > 0: a gate never met
    defaults = {"eval": {"dataset": str(text_file), "max_windows": 2, "seq_len": 64}}
    return write_manifest(tmp_path / "manifest.yaml", jobs, defaults)


def test_batch_runs_jobs_in_parallel_gates_and_summary(two_jobs, tmp_path):
    summary_path = tmp_path / "summary.json"
    code, stdout, err = run_cli("batch", two_jobs, "--jobs", "2", "--json", summary_path)
    assert code == 1, err  # the second job's gate is missed: the batch fails, the first job is still done
    summary = read_json(summary_path)
    first, second = summary["jobs"]
    assert first["status"] == "done" and first["gate"]["passed"] and abs(first["eval"]["delta_pct"]) < 1e-3
    assert second["name"] == "upcycle-qwen" and second["status"] == "failed" and "gate missed" in second["reason"]
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 1} and summary["passed"] is False
    for job in summary["jobs"]:
        record = read_json(tmp_path / "out" / job["out"].split("/")[-1] / "moefy.json")
        assert record["eval"]["ppl"] == job["eval"]["ppl"]  # the evaluation is recorded in the output too
        assert (tmp_path / "out" / (job["out"].split("/")[-1] + ".log")).is_file()
    assert read_json(tmp_path / "out" / "up" / "moefy.json")["summary"]["num_experts"] == 4  # `set` applied


def test_resume_skips_finished_jobs_and_redoes_changed_ones(two_jobs, tmp_path):
    assert run_cli("batch", two_jobs, "--jobs", "2")[0] == 1
    weights = tmp_path / "out" / "slice" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    summary_path = tmp_path / "again.json"
    assert run_cli("batch", two_jobs, "--resume", "--json", summary_path)[0] == 1  # the missed gate stays missed
    summary = read_json(summary_path)
    assert [j["status"] for j in summary["jobs"]] == ["skipped", "failed"]
    assert summary["jobs"][0]["eval"]["ppl"] > 0 and weights.stat().st_mtime_ns == stamp
    manifest = yaml.safe_load(two_jobs.read_text())
    manifest["jobs"][0]["set"] = {"transforms.0.slice.experts": 8}  # a different resolved recipe: convert again
    two_jobs.write_text(yaml.safe_dump(manifest))
    assert run_cli("batch", two_jobs, "--resume", "--json", summary_path)[0] == 1
    assert read_json(summary_path)["jobs"][0]["status"] == "done"
    assert read_json(tmp_path / "out" / "slice" / "moefy.json")["summary"]["num_experts"] == 8


def test_existing_out_needs_resume_or_force(two_jobs, tmp_path):
    (tmp_path / "out" / "slice").mkdir(parents=True)
    (tmp_path / "out" / "slice" / "notes.txt").write_text("a user's file")
    code, _, err = run_cli("batch", two_jobs)
    assert code == 2 and "already exists" in err and "--resume" in err
    code, _, err = run_cli("batch", two_jobs, "--resume")
    assert code == 2 and "not a moefy output" in err
    assert (tmp_path / "out" / "slice" / "notes.txt").read_text() == "a user's file"


def test_a_failing_job_does_not_stop_the_others(tiny, tmp_path):
    """NaN weights are found only while converting: that job fails (exit 1), naming the tensor; the other finishes."""
    broken = tiny("llama")
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    jobs = [{"source": str(broken), "recipe": "mlpmoe", "out": str(tmp_path / "a")},
            {"source": str(tiny("llama")), "recipe": "mlpmoe", "out": str(tmp_path / "b")}]
    summary_path = tmp_path / "s.json"
    code, _, err = run_cli("batch", write_manifest(tmp_path / "m.yaml", jobs), "--json", summary_path)
    assert code == 1, err
    failed, done = read_json(summary_path)["jobs"]
    assert failed["status"] == "failed" and "o_proj" in failed["reason"] and "NaN" in failed["reason"]
    assert done["status"] == "done" and (tmp_path / "b" / "moefy.json").is_file()
    assert not (tmp_path / "a").exists()


def test_manifest_problems_are_reported_together(tiny, tmp_path, text_file):
    src = tiny("llama")
    jobs = [{"source": str(tmp_path / "nowhere"), "recipe": "mlpmoe", "out": str(tmp_path / "o1")},
            {"source": str(src), "recipe": "no-such-recipe", "out": str(tmp_path / "o2")},
            {"source": str(src), "recipe": "mlpmoe", "out": str(tmp_path / "o1"), "colour": "blue"},
            {"source": str(src), "recipe": "carve-50", "out": str(tmp_path / "o3")},
            {"source": str(src), "recipe": "mlpmoe", "out": str(tmp_path / "o4"),
             "eval": {"dataset": str(tmp_path / "missing.txt")}},
            {"source": str(src), "recipe": "mlpmoe", "out": str(tmp_path / "o1"),
             "set": {"transforms.0.slice.experts": 0}}]
    code, stdout, err = run_cli("batch", write_manifest(tmp_path / "m.yaml", jobs), "--json", tmp_path / "s.json")
    assert code == 2 and "Traceback" not in err
    assert "8 problem(s)" in err, err  # incl. eval windows longer than the model takes
    for needle in ("jobs.0", "does not exist", "no-such-recipe", "jobs.2: colour: unknown key",
                   "calibration data", "missing.txt", "is also jobs.0 (o1)'s out", "experts",
                   "256 positions"):
        assert needle in err, needle
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5)) and not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("content,needle", [
    ("", "non-empty `jobs:` list"),
    ("jobs: []", "non-empty `jobs:` list"),
    ("jobs: [1]\nextra: 2", "unknown top-level key"),
    (":\n  - [", "could not be read as YAML"),
])
def test_malformed_manifest(tmp_path, content, needle):
    path = tmp_path / "m.yaml"
    path.write_text(content)
    code, _, err = run_cli("batch", path)
    assert code == 2 and needle in err and "Traceback" not in err


def test_missing_manifest_and_bad_jobs_count(tmp_path):
    code, _, err = run_cli("batch", tmp_path / "none.yaml")
    assert code == 2 and "does not exist" in err
    path = write_manifest(tmp_path / "m.yaml", [{"source": "x", "recipe": "mlpmoe", "out": "y"}])
    code, _, err = run_cli("batch", path, "--jobs", "0")
    assert code == 2 and "--jobs 0" in err


def test_memory_estimate_scales_with_the_model(tiny, tmp_path):
    from moefy.batch import Job, estimate_peak_bytes

    small = estimate_peak_bytes(Job(source=str(tiny("llama")), recipe="mlpmoe", out=str(tmp_path / "a")))
    big = estimate_peak_bytes(Job(source=str(tiny("llama", hidden_size=256, intermediate_size=1024)),
                                  recipe="mlpmoe", out=str(tmp_path / "b")))
    calibrating = estimate_peak_bytes(Job(source=str(tiny("llama")), recipe="carve-50", out=str(tmp_path / "c")))
    assert small < big and small < calibrating
    assert json.dumps(small)  # a plain int the scheduler compares with MemAvailable
