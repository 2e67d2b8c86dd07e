"""moefy command line (contract: DESIGN.md). Exit codes: 0 ok, 1 a check failed, 2 bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import traceback
import typing
from functools import wraps
from pathlib import Path
from typing import Optional

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from moefy.errors import BadInput, CheckFailed, MoefyError
from moefy.resources import checked_device

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert dense Hugging Face causal LMs into Mixture-of-Experts checkpoints.")
out = Console(width=None if sys.stdout.isatty() else 120)  # piped (CI logs): wide enough for the tables
err = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines.")):
    from moefy.progress import set_quiet

    _state["debug"] = debug
    set_quiet(quiet)


def _handled(fn):
    """Turn moefy errors into one clear paragraph and the contract's exit code."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoefyError as exc:
            if _state["debug"]:
                traceback.print_exc()
            label = "check failed" if isinstance(exc, CheckFailed) else "error"
            err.print(f"[bold red]{label}:[/bold red] {exc}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            signum = _state.get("signal", signal.SIGINT)
            err.print(f"[bold red]interrupted[/bold red] ({signal.Signals(signum).name}): no partial output was "
                      f"left behind.")
            raise typer.Exit(128 + signum) from None
        except OSError as exc:  # the file system refused: full, read-only, gone
            if _state["debug"]:
                traceback.print_exc()
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            where = f" ({exc.filename})" if exc.filename else ""
            err.print(f"[bold red]error:[/bold red] {'no space left on the device' if full else exc.strerror or exc}"
                      f"{where}. Nothing partial was left behind; "
                      f"{'free space or write OUT elsewhere' if full else 'check the path and its permissions'}.",
                      highlight=False)
            raise typer.Exit(1 if full else 2) from None
        except Exception as exc:  # noqa: BLE001 - a bug, or a library refusing something moefy did not foresee
            if _state["debug"]:
                traceback.print_exc()
            err.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc}. Nothing partial was left "
                      f"behind. Run again with --debug for the traceback and report it.", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def _write_json(path: Optional[Path], data: dict) -> None:
    if path is not None:
        from moefy.io.output import write_report

        write_report(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _check_json(path: Optional[Path], models: dict[str, Optional[str]], data: Optional[str] = None) -> None:
    """Refuse a `--json` path that is, contains or lies inside one of the command's inputs (models by role, and
    a dataset), before any work."""
    from moefy.io.checkpoint import open_source
    from moefy.io.output import Inputs, check_report_path

    if path is None:
        return
    reads = Inputs()
    for what, spec in models.items():
        if spec is not None:
            open_source(spec).add_inputs(reads, what)
    reads.add(data, "the dataset")
    check_report_path(path, reads)


@app.command()
@_handled
def convert(
    source: str = typer.Argument(..., help="HF model dir, .gguf file, hub id, or `demo`."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe YAML path or built-in name (`moefy recipes`)."),
    output: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist unless --force)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: KEY=VALUE (YAML value)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text (.txt/.raw/.jsonl/hf:...)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="auto, native or a standard MoE format (the registry "
                                                            "`moefy recipes` lists)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto|float32|bfloat16|float16."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed of every random choice (0 … 2³²−1)."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda (for calibration-based transforms)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and plan; write nothing."),
    allow_inexact: bool = typer.Option(False, "--allow-inexact", help="Allow a format that changes the function."),
    eval_dataset: Optional[str] = typer.Option(None, "--eval-dataset", help="Dataset for the recipe's gates."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the provenance record here too."),
    skip_load_check: bool = typer.Option(False, "--skip-load-check",
                                         help="Do not load OUT as a user will and compare its logits with the "
                                              "source's before publishing it."),
):
    """Convert SOURCE with a recipe into an MoE checkpoint at OUT. Under `torchrun --nproc-per-node N -m moefy
    convert ...` the end-to-end distillation is data-parallel; rank 0 writes OUT and reports."""
    from moefy import distributed
    from moefy.convert import convert as run_convert
    from moefy.convert import check_gates
    from moefy.progress import set_quiet
    from moefy.recipe import load_recipe

    if distributed.rank():
        set_quiet(True)

    checked_device(device, ("auto", "cpu", "cuda"))
    if dtype not in (None, "auto", "float32", "bfloat16", "float16"):
        raise BadInput(f"--dtype {dtype!r} is unknown; use auto, float32, bfloat16 or float16.")
    from moefy.io.data import load_text

    parsed = load_recipe(recipe, set_)
    gates = parsed.gates if parsed.gates and parsed.gates.max_delta_ppl_pct is not None else None
    gate_data = (eval_dataset or gates.dataset) if gates else None
    for spec, what in ((calib, "--calib"), (gate_data, "--eval-dataset" if eval_dataset else "gates.dataset")):
        if spec is not None:  # fail fast on a bad path, before any work
            try:
                load_text(spec)
            except BadInput as exc:
                raise BadInput(f"{what}: {exc}") from None
    record = run_convert(source, parsed, output, fmt=fmt, dtype=dtype, seed=seed, force=force, dry_run=dry_run,
                         allow_inexact=allow_inexact, calib=calib, device=device, eval_dataset=gate_data,
                         eval_seq_len=gates.seq_len if gate_data else None,
                         reports=(json_path,), load_check=not skip_load_check)
    if distributed.rank():
        return
    if dry_run:
        out.print_json(json.dumps(record))
        return
    _print_summary(record)
    gate = check_gates(output, source, parsed, eval_dataset)
    if gate is not None:
        print_eval(gate)
    _write_json(json_path, json.loads((output / "moefy.json").read_text()))
    if gate is not None and not gate["gate_passed"]:
        raise CheckFailed(f"quality gate missed for {output}: see the table above and moefy.json `gates`.")


def _print_summary(record: dict) -> None:
    s = record["summary"]
    table = Table(title=f"{record['recipe']['name']} → {record['format']['name']}", show_header=False)
    for key in ("format", "num_experts", "top_k", "shared_experts", "expert_width", "params_total",
                "params_active_per_token", "mlp_active_fraction"):
        value = s[key]
        table.add_row(key, f"{value:,}" if isinstance(value, int) else
                      f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("seconds", f"{record['timing']['convert_seconds']:.1f}")
    out.print(table)


@app.command("eval")
@_handled
def eval_(
    model: str = typer.Argument(..., help="Model dir (moefy output or dense), .gguf, or `demo`."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Source model to compare against."),
    dataset: str = typer.Option(..., "--dataset", help="Evaluation text (.txt/.raw/.jsonl/hf:...)."),
    seq_len: int = typer.Option(512, "--seq-len"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="First N windows (default: all)."),
    batch_size: int = typer.Option(4, "--batch-size"),
    backend: str = typer.Option("auto", "--backend", help="auto|torch|triton|reference: how MoE blocks run."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report (DESIGN.md fields)."),
):
    """Perplexity of MODEL (and --baseline) over non-overlapping windows of DATASET."""
    from moefy.evaluate import evaluate

    if max_windows is not None and max_windows < 1:
        raise BadInput(f"--max-windows {max_windows} must be at least 1.")
    _check_json(json_path, {"the model": model, "the baseline": baseline}, dataset)
    report = evaluate(model, baseline=baseline, dataset=dataset, seq_len=seq_len, max_windows=max_windows,
                      batch_size=batch_size, backend=backend)
    print_eval(report)
    _write_json(json_path, report)


def print_eval(report: dict) -> None:
    table = Table(title=f"perplexity · {Path(report['dataset']).name} · {report['windows']}×{report['seq_len']}")
    for col in ("model", "ppl", "Δ ppl %", "tokens/s", "active params", "MLP active"):
        table.add_column(col, justify="left" if col == "model" else "right")
    delta = report["delta_pct"]
    table.add_row(str(report["model"]), f"{report['ppl']:.4f}",
                  "—" if delta is None else f"{delta:+.4f}" if abs(delta) >= 1e-3 else f"{delta:+.1e}",
                  f"{report['tokens_per_s']:.0f}", f"{report['params_active_per_token']:,}",
                  f"{report['mlp_active_fraction']:.3f}")
    if report["baseline"] is not None:
        table.add_row(str(report["baseline"]), f"{report['baseline_ppl']:.4f}", "0 (baseline)",
                      f"{report['baseline_tokens_per_s']:.0f}", "", "")
    out.print(table)


@app.command()
@_handled
def inspect(model: str = typer.Argument(..., help="Model directory (or `demo`)."),
            recipe: Optional[str] = typer.Option(None, "--recipe", "-r",
                                                 help="For a dense MODEL: the format this recipe would be "
                                                      "written in (`--format auto`), and why."),
            set_: list[str] = typer.Option([], "--set", help="Override a recipe key: KEY=VALUE (YAML value)."),
            as_json: bool = typer.Option(False, "--json", help="Print the JSON report instead of a table.")):
    """Describe a checkpoint: format, experts, routing, parameter counts (and, with --recipe, the export)."""
    from moefy.io.checkpoint import open_source
    from moefy.summary import summarize

    ckpt = open_source(model)
    report = summarize(ckpt)
    if recipe is not None:
        from moefy.convert import plan_conversion
        from moefy.recipe import load_recipe

        if report["format"] != "dense":
            raise BadInput(f"--recipe describes converting a dense model; {model} is already {report['format']}.")
        choice = plan_conversion(ckpt, load_recipe(recipe, set_), allow_inexact=True)[3]
        report["export"] = {"format": choice.format.name, "reason": choice.reason, "exact": choice.exact,
                            "engines": choice.format.engine_notes() or "not checked beyond transformers"}
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
        return
    table = Table(title=str(model), show_header=False)
    provenance = report.pop("provenance") or {}
    export = report.pop("export", None) or {}
    for key, value in [*report.items(), *provenance.items(), *[(f"export {k}", v) for k, v in export.items()]]:
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else
                      f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


@app.command()
@_handled
def validate(
    model: str = typer.Argument(..., help="A moefy output directory."),
    source: Optional[str] = typer.Option(None, "--source", help="Also report the logit gap to this dense model."),
    backend: str = typer.Option("auto", "--backend", help="auto|torch|triton|reference: the moefy backend under test."),
    device: str = typer.Option("cpu", "--device", help="cpu|cuda: where the model and the reference run (fp32)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report (DESIGN.md fields)."),
):
    """Check every MoE block and the whole model against the plain reference; exit 1 on mismatch."""
    from moefy.validate import validate as run_validate

    device = checked_device(device)
    _check_json(json_path, {"the model": model, "the source": source})
    report = run_validate(model, source=source, backend=backend, device=device)
    table = Table(title=f"validate {model} · backend {report['backend']} on {device} · {report['tokens']} tokens")
    for col in ("check", "max |Δ|", "max rel", "ok"):
        table.add_column(col, justify="left" if col == "check" else "right")
    for impl in sorted({r["implementation"] for r in report["blocks"]}):
        rows = [r for r in report["blocks"] if r["implementation"] == impl]
        sizes = "/".join(str(n) for n in sorted({r["tokens"] for r in rows}))
        table.add_row(f"{len({r['block'] for r in rows})} blocks × {sizes} tokens · {impl}",
                      f"{max(r['max_abs_diff'] for r in rows):.2e}", f"{max(r['max_rel_diff'] for r in rows):.2e}",
                      "✓" if all(r["passed"] for r in rows) else "✗")
    e2e = report["end_to_end"]
    table.add_row("end to end (logits)", f"{e2e['max_abs_logit_diff']:.2e}", f"{e2e['max_rel_logit_diff']:.2e}",
                  "✓" if e2e["passed"] else "✗")
    if report["source"]:
        table.add_row(f"vs source {source} (info)", f"{report['source']['max_abs_logit_diff']:.2e}", "", "")
    out.print(table)
    _write_json(json_path, report)
    if not report["passed"]:
        raise CheckFailed(f"{model} does not match the reference within tolerance {report['tolerance']}; "
                          f"see the table above.")


@app.command()
@_handled
def bench(
    model: str = typer.Argument(..., help="Model dir (moefy output or dense), .gguf, or `demo`."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Dense model to compare with (default: the "
                                                                     "source recorded in MODEL's moefy.json; "
                                                                     "`none`: no comparison)."),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="Prompt length: the prefill measured."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Tokens generated per round: the decode measured."),
    batch_size: int = typer.Option(1, "--batch", help="Sequences generated at once."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: every usable core)."),
    backend: str = typer.Option("auto", "--backend", help="auto|torch|triton|reference: how MoE blocks run."),
    device: str = typer.Option("cpu", "--device", help="cpu|cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32|bfloat16|float16: both models run in it "
                                                         "(fp32 on CPU, where half types are slower)."),
    rounds: int = typer.Option(5, "--rounds", help="Interleaved rounds; the report gives medians."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report (README: moefy bench)."),
):
    """Prefill and decode tokens/s of MODEL against its dense baseline, interleaved in one process, with the
    ratio the weight bytes a decoded token reads allow."""
    from moefy.bench import bench as run_bench
    from moefy.bench import default_baseline

    checked_device(device)  # before default_baseline opens anything
    if baseline is None:
        baseline = default_baseline(model)
    elif baseline == "none":
        baseline = None
    _check_json(json_path, {"the model": model, "the baseline": baseline})
    report = run_bench(model, baseline=baseline, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                       batch=batch_size, threads=threads, backend=backend, rounds=rounds, device=device,
                       dtype=dtype)
    print_bench(report)
    _write_json(json_path, report)


BEYOND_BYTES = 1.05  # decode faster than this share of the bytes-ideal ratio is the runtime's, not the sparsity's


def print_bench(report: dict) -> None:
    table = Table(title=f"speed · {report['machine']} · {report['threads']} threads · batch {report['batch']} · "
                        f"{report['prompt_tokens']}-token prompt, {report['new_tokens']} new · "
                        f"median of {report['rounds']} interleaved rounds")
    for col in ("model", "prefill tok/s", "decode tok/s", "weights read / decoded token"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for run in report["runs"].values():
        table.add_row(run["path"], f"{run['prefill_tokens_per_s']:.1f}", f"{run['decode_tokens_per_s']:.2f}",
                      f"{run['decode_weight_bytes'] / 2**20:.1f} MiB")
    if report["baseline"] is not None:
        table.add_row("ratio (model ÷ baseline)", f"{report['prefill_ratio']:.2f}×", f"{report['decode_ratio']:.2f}×",
                      f"ideal {report['bytes_ideal_ratio']:.2f}× (decode at {report['decode_of_ideal']:.0%} of it)")
    out.print(table)
    if report["baseline"] is not None and report["decode_of_ideal"] > BEYOND_BYTES:
        out.print(f"note: decode is {report['decode_of_ideal']:.0%} of what the bytes allow — more than the sparsity "
                  "explains, so part of it is the runtime (on some CPUs moefy's decode kernel reads weights faster "
                  "than torch's). For the sparsity's own share, bench against an exact `mlpmoe` conversion of the "
                  "baseline (--baseline OUT_MLPMOE): the same runtime, the dense bytes.")


@app.command()
@_handled
def generate(
    model: str = typer.Argument(..., help="Model dir (moefy output or dense), .gguf, or `demo`."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue (or, with --chat, the user's turn)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Stop after this many new tokens."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    backend: str = typer.Option("auto", "--backend", help="auto|torch|triton|reference: how MoE blocks run."),
    device: str = typer.Option("cpu", "--device", help="cpu|cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: every usable core)."),
):
    """Greedy text from MODEL, streamed as it is decoded: look at what a conversion writes."""
    from moefy.generate import generate as run_generate

    run_generate(model, prompt, max_new_tokens=max_new_tokens, chat=chat, backend=backend, device=device,
                 threads=threads)


@app.command("export-gguf")
@_handled
def export_gguf(
    model: Path = typer.Argument(..., help="A moefy output in a format with a llama.cpp architecture "
                                           "(mixtral, granitemoe, granitemoeshared)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The .gguf to write (default: MODEL.gguf "
                                                                       "beside MODEL)."),
    dtype: str = typer.Option("f32", "--dtype", help="f32|f16|bf16: the matrices' type (norms and routers stay f32)."),
    tokenizer_from: Optional[Path] = typer.Option(None, "--tokenizer-from", help="A GGUF to carry the tokenizer from "
                                                  "(default: the source's, when it was a .gguf or `demo`)."),
    force: bool = typer.Option(False, "--force", help="Replace --output if it is a GGUF moefy wrote."),
):
    """Write MODEL as one GGUF file llama.cpp loads: its tensors under llama.cpp's names, its hyper-parameters and
    the source GGUF's tokenizer, with no second converter."""
    from moefy.export.to_gguf import export_gguf as write_gguf

    write_gguf(model, output, dtype=dtype, tokenizer_from=tokenizer_from, force=force)


@app.command()
@_handled
def batch(
    manifest: Path = typer.Argument(..., help="YAML: `jobs:` (source, recipe, out, set, calib, eval) + `defaults:`."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Conversions at a time (each its own process; README: "
                                                      "sizing --jobs)."),
    resume: bool = typer.Option(False, "--resume", help="Skip jobs whose OUT already holds this conversion."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the summary (one entry per job)."),
):
    """Run many conversions (with evaluation and gates) from a manifest; exit 1 if any job failed."""
    import time

    from moefy.batch import load_manifest, run_batch, summary

    if jobs < 1:
        raise BadInput(f"--jobs {jobs} must be at least 1.")
    started = time.perf_counter()
    planned = load_manifest(manifest, resume, reports=(json_path,))
    results = run_batch(planned, parallel=jobs, resume=resume)
    report = summary(manifest, results, time.perf_counter() - started)
    table = Table(title=f"batch {manifest} · {len(results)} jobs · {report['seconds']:.0f}s")
    for col in ("job", "status", "Δ ppl %", "gate", "seconds", "reason / out"):
        table.add_column(col, justify="right" if col in ("Δ ppl %", "seconds") else "left")
    for r in results:
        delta = r["eval"]["delta_pct"] if r["eval"] else None
        gate = r["gate"]
        table.add_row(r["name"], r["status"], "—" if delta is None else f"{delta:+.4f}",
                      "—" if gate is None else "pass" if gate["passed"] else "MISSED", f"{r['seconds']:.0f}",
                      r["reason"] or r["out"])
    out.print(table)
    _write_json(json_path, report)
    if not report["passed"]:
        raise CheckFailed(f"{report['counts']['failed']} of {len(results)} jobs failed; see the table above and "
                          f"each job's log.")


@app.command()
@_handled
def recipes():
    """List built-in recipes, transforms with their options, and export formats."""
    import yaml

    from moefy.export import FORMATS
    from moefy.recipe import builtin_recipes
    from moefy.transforms import TRANSFORMS

    table = Table(title="built-in recipes (configs/)")
    table.add_column("name")
    table.add_column("description")
    table.add_column("measured on demo (Δppl · decode × · prefill ×)")
    table.add_column("transforms")
    for name, path in builtin_recipes().items():
        data = yaml.safe_load(path.read_text())
        table.add_row(name, data.get("description", ""), data.get("measured", ""), json.dumps(data.get("transforms")))
    out.print(table)
    for name, cls in TRANSFORMS.items():
        opts = Table(title=f"transform `{name}` — {cls.summary}")
        for col in ("option", "type", "default", "meaning"):
            opts.add_column(col)
        _option_rows(opts, cls.Options, "")
        out.print(opts)
    formats = Table(title="export formats (--format)")
    formats.add_column("name")
    formats.add_column("what")
    formats.add_column("other engines (measured; others not checked)")
    formats.add_column("`export-gguf` as")
    formats.add_row("auto", "the first exact standard format below for the family, else native", "", "")
    for name, fmt in FORMATS.items():
        formats.add_row(name, fmt.summary, fmt.engine_notes(), fmt.gguf_arch or "—")
    out.print(formats)


def _type_name(annotation) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(map(str, args))
    if typing.get_origin(annotation) is list:
        return f"list of {_type_name(args[0])}"
    if args:
        return " | ".join(_type_name(a) for a in args)
    if hasattr(annotation, "model_fields"):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _option_rows(table: Table, model, prefix: str) -> None:
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "(options below)" if isinstance(default, BaseModel) else repr(default)
        table.add_row(prefix + name, _type_name(field.annotation), shown, field.description or "")
        for sub in (a for a in (field.annotation, *typing.get_args(field.annotation)) if hasattr(a, "model_fields")):
            _option_rows(table, sub, f"{prefix}{name}.")


def _terminate(signum, frame):
    """SIGTERM (a CI runner's cancel, `kill`) ends a run the way Ctrl-C does: temp dirs removed, locks released."""
    _state["signal"] = signum
    raise KeyboardInterrupt


def run() -> None:
    """The `moefy` command: process-wide settings belong to the run, not to `import moefy`."""
    # Large CPU tensors on transparent huge pages: streaming a checkpoint allocates a fresh buffer per
    # tensor, and 4 KiB page faults made up a fifth of a 20 GB conversion's time (docs/BENCHMARKS.md).
    # PyTorch reads this once, at its first large allocation (torch is not imported yet); a value the user
    # set wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)


if __name__ == "__main__":
    run()
