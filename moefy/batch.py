"""`moefy batch MANIFEST.yaml`: many conversions (and evaluations, and gates) unattended, for CI.

The manifest is validated whole before anything starts: every job is planned as `convert
--dry-run` would plan it, and every problem in every job is reported at once.  Each job then runs
in its own process (a crash or an out-of-memory kill fails that job only), at most `--jobs` at a
time and only while the estimated peak memory of the running jobs fits in the available memory.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moefy.errors import BadInput, MoefyError
from moefy.io.output import Inputs, check_report_path, overlap
from moefy.io.yaml_file import load_yaml
from moefy.progress import log
from moefy.resources import available_memory

GIB = 2**30


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GateSpec(_Strict):
    max_delta_ppl_pct: float | None = Field(None, description="fail the job when Δppl % exceeds this")


class EvalSpec(_Strict):
    dataset: str = Field(description="evaluation text (.txt/.raw/.jsonl/hf:...)")
    max_windows: int | None = Field(40, ge=1, description="first N windows (null: all)")
    seq_len: int = Field(512, ge=2)
    gates: GateSpec = GateSpec()


class Job(_Strict):
    name: str | None = Field(None, description="label in logs and the summary (default: OUT's name)")
    source: str
    recipe: str
    out: str
    set: dict[str, Any] = Field(default_factory=dict, description="recipe overrides, as `--set KEY=VALUE`")
    calib: str | None = None
    format: str | None = None
    dtype: str | None = None
    seed: int = 0
    allow_inexact: bool = False
    force: bool = Field(False, description="replace an existing OUT that --resume would not skip")
    skip_load_check: bool = Field(False, description="as `convert --skip-load-check`")
    eval: EvalSpec | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.out).name

    def overrides(self) -> list[str]:
        return [f"{key}={json.dumps(value)}" for key, value in self.set.items()]


def load_manifest(path: Path, resume: bool, reports: tuple[Path | None, ...] = ()) -> list[Job]:
    """Every job of the manifest, defaults applied and each planned; all problems raised together (BadInput).
    `reports` are files the batch writes at the end (`--json`)."""
    data = load_yaml(Path(path), "manifest")
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise BadInput(f"manifest {path} must be a mapping with a non-empty `jobs:` list (and optional `defaults:`).")
    unknown = sorted(set(data) - {"defaults", "jobs"})
    defaults = data.get("defaults") or {}
    problems = [f"unknown top-level key(s) {', '.join(unknown)} (valid: defaults, jobs)"] if unknown else []
    if not isinstance(defaults, dict):
        problems.append("`defaults` must be a mapping of job keys")
        defaults = {}
    jobs, planned = [], []
    for i, entry in enumerate(data["jobs"]):
        if not isinstance(entry, dict):
            problems.append(f"jobs.{i}: must be a mapping with source, recipe and out")
            continue
        try:
            job = Job.model_validate(_merge(defaults, entry))
        except ValidationError as exc:
            problems.append(f"jobs.{i}: " + "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in exc.errors()))
            continue
        where = f"jobs.{i} ({job.label})"
        job_problems, job_inputs = _plan_problems(job, resume)
        problems += [f"{where}: {p}" for p in job_problems]
        planned.append((where, job, job_inputs))
        jobs.append(job)
    problems += _write_problems(Path(path), planned, reports)
    if problems:
        raise BadInput(f"manifest {path} has {len(problems)} problem(s); nothing was started:\n  - "
                       + "\n  - ".join(problems))
    return jobs


def _merge(defaults: dict, job: dict) -> dict:
    """A job's keys over the defaults; `set` and `eval` merge key by key."""
    merged = {**defaults, **job}
    for key in ("set", "eval"):
        if isinstance(defaults.get(key), dict) and isinstance(job.get(key), dict):
            merged[key] = {**defaults[key], **job[key]}
    return merged


def _write_problems(manifest: Path, planned: list[tuple[str, Job, Inputs]], reports: tuple[Path | None, ...]
                    ) -> list[str]:
    """Every job's writes (OUT, its log and result file) and the batch's reports against every job's inputs and
    the manifest, and OUTs against each other: no job writes over, into or around what another reads or writes.
    (A job's OUT against its own inputs is its dry run's check.)"""
    def inputs_of(skip: int | None) -> Inputs:
        inputs = Inputs()
        inputs.add(manifest, "the manifest")
        for i, (where, _, job_inputs) in enumerate(planned):
            if i != skip:
                inputs.paths += [(p, f"{what} of {where}") for p, what in job_inputs.paths]
        return inputs

    problems, outs, everything = [], {}, inputs_of(None)
    for i, (where, job, _) in enumerate(planned):
        out = Path(job.out).resolve()
        for target, what, inputs in ((job.out, "out", inputs_of(i)), (_log_path(job), "log", everything),
                                     (_result_path(job), "result file", everything)):
            try:
                inputs.check_target(target, what)
            except BadInput as exc:
                problems.append(f"{where}: {exc}")
        for other, other_where in outs.items():
            relation = overlap(out, other)
            if relation:
                problems.append(f"{where}: out {job.out} {'is also' if relation == 'is' else relation} "
                                f"{other_where}'s out")
        outs[out] = where
    for report in reports:
        try:
            check_report_path(report, everything)
        except BadInput as exc:
            problems.append(str(exc))
    return problems


def _plan_problems(job: Job, resume: bool) -> tuple[list[str], Inputs]:
    """What would stop this job, found without converting anything (the checks of `convert --dry-run`), and
    the paths it reads."""
    from moefy.convert import convert
    from moefy.io.data import load_text
    from moefy.recipe import load_recipe

    problems, inputs = [], Inputs()  # what the job names directly, even when its plan fails below
    for spec, what in ((job.source, "the source"), (job.recipe, "the recipe"), (job.calib, "the calibration data"),
                       (job.eval.dataset if job.eval else None, "the evaluation data")):
        inputs.add(spec, what)
    out = Path(job.out)
    if out.exists() and not job.force and not resume:
        problems.append(f"out {job.out} already exists: run with --resume to skip finished jobs, or set "
                        f"`force: true` on the job to replace it (only a previous moefy output is replaced)")
    try:
        recipe = load_recipe(job.recipe, job.overrides())
        plan = convert(job.source, recipe, out, fmt=job.format, dtype=job.dtype, seed=job.seed, force=True,
                       dry_run=True, allow_inexact=job.allow_inexact, calib=job.calib,
                       eval_dataset=job.eval.dataset if job.eval else None,
                       eval_seq_len=job.eval.seq_len if job.eval else None)
        inputs.extend(Inputs.from_json(plan["inputs"]))
    except MoefyError as exc:
        problems.append(str(exc))
    for spec, what in ((job.calib, "calib"), (job.eval.dataset if job.eval else None, "eval.dataset")):
        if spec is not None:
            try:
                load_text(spec)
            except MoefyError as exc:
                problems.append(f"{what}: {exc}")
    return problems, inputs


# -- running ---------------------------------------------------------------------------------------

def run_batch(jobs: list[Job], *, parallel: int, resume: bool) -> list[dict]:
    """Run the jobs (each in a fresh process); returns one result per job, in manifest order.

    Available memory is read once, before any job starts; running jobs count by their estimates."""
    memory = available_memory()
    threads = max(1, (os.cpu_count() or 1) // parallel)
    context = multiprocessing.get_context("spawn")
    waiting = list(enumerate(jobs))
    running: dict[int, tuple[multiprocessing.Process, Path, float, float]] = {}
    results: dict[int, dict] = {}
    estimates = {i: estimate_peak_bytes(job) for i, job in waiting}
    try:
        while waiting or running:
            while waiting and len(running) < parallel and (
                    not running or sum(r[3] for r in running.values()) + estimates[waiting[0][0]] <= memory):
                i, job = waiting.pop(0)
                _log_path(job).parent.mkdir(parents=True, exist_ok=True)
                result_path = _result_path(job)
                result_path.unlink(missing_ok=True)
                process = context.Process(target=_job_main, args=(job.model_dump(), resume, threads, str(result_path)),
                                          name=f"moefy-batch-{job.label}")
                process.start()
                running[i] = (process, result_path, time.perf_counter(), estimates[i])
                log(f"[{i}] {job.label}: started (pid {process.pid}, ~{estimates[i] / GIB:.1f} GiB, log "
                    f"{_log_path(job)})")
            time.sleep(0.2)
            for i, (process, result_path, started, _) in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                del running[i]
                results[i] = _collect(jobs[i], process.exitcode, result_path, time.perf_counter() - started)
                r = results[i]
                log(f"[{i}] {jobs[i].label}: {r['status']}" + (f" — {r['reason']}" if r.get("reason") else ""))
    except KeyboardInterrupt:
        for process, *_ in running.values():
            process.terminate()  # the child turns SIGTERM into KeyboardInterrupt: its temp dir is removed
        for process, *_ in running.values():
            process.join()
        raise
    return [results[i] for i in range(len(jobs))]


def estimate_peak_bytes(job: Job) -> int:
    """A job's peak memory, from the shapes alone, fitted to measurements (docs/BENCHMARKS.md "Big checkpoints"):
    2.5 GiB for Python + torch + transformers, the read-ahead, two fp32 copies of one decoder layer; and when the
    recipe calibrates, the fp32 embeddings of the layer-by-layer runner, the calibration activations
    (tokens × hidden × 16 bytes) and three fp64 width × width matrices (least-squares fits over the MLP's
    neurons).  README "Sizing --jobs" explains it."""
    from moefy.arch import adapter_for
    from moefy.io.checkpoint import READ_AHEAD, open_source
    from moefy.recipe import load_recipe

    ckpt = open_source(job.source)
    recipe = load_recipe(job.recipe, job.overrides())
    adapter = adapter_for(ckpt.config, where=str(ckpt.path))
    numels = {name: math.prod(ckpt.shape(name)) for name in ckpt.tensor_names}
    largest = max(numels.values())
    per_layer = (sum(numels.values()) - 2 * largest) / max(1, adapter.num_layers(ckpt.config))
    stored = sum(p.stat().st_size for p in ckpt.weight_files)
    estimate = 2.5 * GIB + min(READ_AHEAD, stored) + 2 * 4 * per_layer
    if any(t.needs_calibration for t in recipe.build_transforms(0)):
        tokens = recipe.calibration.samples * recipe.calibration.seq_len
        width = adapter.mlp_width(ckpt.config)
        estimate += 4 * largest + tokens * adapter.hidden_size(ckpt.config) * 16 + 3 * width * width * 8
    return int(estimate)


def _log_path(job: Job) -> Path:
    out = Path(job.out).resolve()
    return out.with_name(out.name + ".log")


def _result_path(job: Job) -> Path:
    return _log_path(job).with_suffix(".result.json")


def _collect(job: Job, exitcode: int | None, result_path: Path, seconds: float) -> dict:
    try:
        result = json.loads(result_path.read_text())
        result_path.unlink()
    except (OSError, json.JSONDecodeError):
        why = (f"killed by signal {-exitcode}" + (" (out of memory?)" if exitcode == -signal.SIGKILL else "")
               if exitcode is not None and exitcode < 0 else f"exited with code {exitcode} without a result")
        result = {"status": "failed", "reason": f"the job's process {why}; see {_log_path(job)}"}
    return {"name": job.label, "source": job.source, "recipe": job.recipe, "out": job.out,
            "log": str(_log_path(job)), "seconds": round(seconds, 2), "reason": None, "eval": None, "gate": None,
            **result}


def _job_main(job_data: dict, resume: bool, threads: int, result_path: str) -> None:
    """Child process: run one job with its output in its log file; write the result JSON last."""
    job = Job.model_validate(job_data)
    log_file = open(_log_path(job), "w", buffering=1)  # noqa: SIM115 - the process's stdout/stderr until exit
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    sys.stdout = sys.stderr = log_file
    signal.signal(signal.SIGTERM, _interrupt)
    import torch

    torch.set_num_threads(threads)
    try:
        result = run_job(job, resume)
    except MoefyError as exc:
        result = {"status": "failed", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any failure fails this job only; the traceback is in its log
        import traceback

        traceback.print_exc()
        result = {"status": "failed", "reason": f"internal error: {type(exc).__name__}: {exc}"}
    Path(result_path).write_text(json.dumps(result))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_job(job: Job, resume: bool) -> dict:
    """Convert (unless --resume finds it done), then evaluate and gate (unless already recorded)."""
    from moefy.convert import convert, evaluate_output
    from moefy.recipe import load_recipe

    recipe = load_recipe(job.recipe, job.overrides())
    out = Path(job.out)
    record = _finished_record(job, recipe) if resume else None
    status = "skipped" if record is not None else "done"
    if record is None:
        record = convert(job.source, recipe, out, fmt=job.format, dtype=job.dtype, seed=job.seed, force=True,
                         allow_inexact=job.allow_inexact, calib=job.calib, load_check=not job.skip_load_check)
    gate_limit = job.eval.gates.max_delta_ppl_pct if job.eval else None
    if gate_limit is None and recipe.gates is not None:
        gate_limit = recipe.gates.max_delta_ppl_pct
    report = None
    if job.eval is not None:
        report = _recorded_eval(record, job.eval)
        if report is None:
            report = evaluate_output(out, job.source, job.eval.dataset, job.eval.seq_len, job.eval.max_windows,
                                     gate_limit)
            status = "done"
        elif gate_limit is not None:
            report["gate_passed"] = report["delta_pct"] <= gate_limit
    result = {"status": status, "eval": report and {k: report[k] for k in (
        "dataset", "dataset_sha256", "windows", "seq_len", "ppl", "baseline_ppl", "delta_pct",
        "params_total", "params_active_per_token", "mlp_active_fraction")}}
    if report is not None and gate_limit is not None:
        passed = report["gate_passed"]
        result["gate"] = {"max_delta_ppl_pct": gate_limit, "delta_pct": report["delta_pct"], "passed": passed}
        if not passed:
            result.update(status="failed", reason=f"quality gate missed: Δppl {report['delta_pct']:+.4f}% > "
                                                  f"{gate_limit}%")
    return result


def _finished_record(job: Job, recipe) -> dict | None:
    """OUT's moefy.json when OUT is a finished conversion of this source with this resolved recipe and seed."""
    from moefy.io.checkpoint import open_source

    try:
        record = json.loads((Path(job.out) / "moefy.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not _files_match(Path(job.out), record):
        log(f"{job.out}'s weight files are missing or differ from those its moefy.json records: converting again")
        return None
    same = (record.get("recipe") == recipe.model_dump(mode="json") and record.get("seed") == job.seed
            and (job.format in (None, "auto") or record.get("format", {}).get("name") == job.format)
            and (job.dtype in (None, "auto") or record.get("dtype") == job.dtype)
            and record.get("source", {}).get("weights_sha256") == open_source(job.source).weights_sha256)
    if not same:
        log(f"{job.out} holds a different conversion (source, recipe or seed changed): converting again")
        return None
    log(f"{job.out} is already this conversion (same source hash, recipe and seed): skipped")
    return record


def _files_match(out: Path, record: dict) -> bool:
    """OUT's weight files exist and hash to the `output_sha256` its record holds (an older record has none)."""
    from moefy.io.checkpoint import Checkpoint

    recorded = record.get("output_sha256")
    try:
        return isinstance(recorded, dict) and Checkpoint(out).weights_sha256 == recorded
    except MoefyError:
        return False


def _recorded_eval(record: dict, spec: EvalSpec) -> dict | None:
    """The evaluation already in moefy.json when it is on the same data, windows and length."""
    from moefy.io.data import load_text

    recorded = record.get("eval")
    if (recorded and recorded.get("dataset_sha256") == load_text(spec.dataset).sha256
            and recorded.get("seq_len") == spec.seq_len
            and (spec.max_windows is None or recorded.get("windows") == spec.max_windows)):
        return dict(recorded)
    return None


def summary(manifest: Path, results: list[dict], seconds: float) -> dict:
    counts = {status: sum(r["status"] == status for r in results) for status in ("done", "skipped", "failed")}
    return {"manifest": str(manifest), "seconds": round(seconds, 2), "counts": counts, "passed": not counts["failed"],
            "jobs": results}
