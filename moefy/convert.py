"""`moefy convert`: stream a dense checkpoint through a recipe's transforms into an MoE checkpoint.

Tensors are read one at a time in shard order; a layer's MLP weights are buffered only until
that layer is complete, transformed, written and dropped, so memory is bounded by one layer and
one output shard, whatever the model's size.  Output goes to a temp dir renamed at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import moefy
from moefy import distributed
from moefy.arch import adapter_for, check_window
from moefy.calib import Calibration, load_calibration, text_runner
from moefy.errors import BadInput, CheckFailed
from moefy.export import FORMATS, choose_format
from moefy.io.checkpoint import Checkpoint, open_source
from moefy.io.layout import check_layout
from moefy.io.overlap import prefetch
from moefy.io.output import Inputs, atomic_output, check_output_path, check_report_path, nearest_existing
from moefy.io.writer import ShardedWriter, parse_size
from moefy.moe.layer import DenseMLP, MoeLayer
from moefy.progress import log, progress
from moefy.recipe import Recipe
from moefy.resources import available_memory
from moefy.summary import summarize
from moefy.plan import LayerPlan, SourceInfo
from moefy.transforms.base import LayerData, Preview, checked, mlp_from_tensors, read_mlp

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_dtype(ckpt: Checkpoint) -> str:
    name = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    if isinstance(name, str) and name in TORCH_DTYPES:  # else (absent, or not a name): what the weights are
        return name
    first = ckpt.get(ckpt.tensor_names[0]).dtype
    return {v: k for k, v in TORCH_DTYPES.items()}.get(first, "float32")


def plan_pipeline(transforms, source: SourceInfo) -> LayerPlan:
    """Each transform checked, planned and set up in recipe order (transforms/base.py: the lifecycle)."""
    plan = None
    for transform in transforms:
        transform.check(source)
        previous, plan = plan, transform.plan(plan, source)
        transform.setup(source, previous)
    return plan


def plan_conversion(ckpt: Checkpoint, recipe: Recipe, fmt: str | None = None, allow_inexact: bool = False,
                    seed: int = 0):
    """(transforms, source info, layer plan, format choice) of a conversion, from config and recipe only."""
    transforms = recipe.build_transforms(seed)
    adapter = adapter_for(ckpt.config, where=str(ckpt.path))
    ckpt.add_prefix(adapter.base_prefix)
    check_layout(ckpt, adapter.lm_head)
    info = SourceInfo(adapter, ckpt.config)
    plan = plan_pipeline(transforms, info)
    return transforms, info, plan, choose_format(fmt or recipe.output.format, info, plan, allow_inexact)


def run_inputs(ckpt: Checkpoint, recipe: Recipe, transforms, calib: str | None,
               eval_dataset: str | None = None) -> Inputs:
    """Every path a conversion reads: what it must never write over, into or around."""
    inputs = Inputs()
    ckpt.add_inputs(inputs)
    inputs.add(recipe.path, "the recipe")
    inputs.add(calib or recipe.calibration.dataset, "the calibration data")
    inputs.add(eval_dataset or (recipe.gates.dataset if recipe.gates else None), "the evaluation data")
    for transform in transforms:
        for option, path in transform.input_paths().items():
            inputs.add(path, f"{option} of the recipe")
    return inputs


def convert(source: str, recipe: Recipe, out: Path, *, fmt: str | None = None, dtype: str | None = None,
            seed: int = 0, force: bool = False, dry_run: bool = False, allow_inexact: bool = False,
            calib: str | None = None, device: str = "auto", eval_dataset: str | None = None,
            eval_seq_len: int | None = None, inputs: Inputs | None = None, reports: tuple[Path | None, ...] = (),
            load_check: bool = True) -> dict:
    """Run the recipe on SOURCE and write OUT; returns the provenance record (moefy.json).

    `eval_dataset` / `eval_seq_len` describe the evaluation the caller runs afterwards (checked up front);
    `inputs` adds paths read by the caller (a batch's other jobs) to those OUT must keep clear of; `reports` are
    files the caller will write afterwards (`--json`), checked against the inputs before any work.  `load_check`
    loads the written model as a user will before OUT is published (`moefy.loadcheck`)."""
    started = time.perf_counter()
    ckpt = open_source(source)
    transforms, info, plan, choice = plan_conversion(ckpt, recipe, fmt, allow_inexact, seed)
    reads = run_inputs(ckpt, recipe, transforms, calib, eval_dataset)
    if inputs is not None:
        reads.extend(inputs)
    check_output_path(out, force, reads)
    for report in reports:
        check_report_path(report, reads)
    if eval_seq_len is not None:
        check_window(ckpt.config, eval_seq_len, "the seq_len of the evaluation after converting (gate or job)",
                     ckpt.origin)
    adapter = info.adapter
    out_dtype = dtype if dtype and dtype != "auto" else recipe.output.dtype
    out_dtype = source_dtype(ckpt) if out_dtype == "auto" else out_dtype
    log(f"source {ckpt.origin} ({adapter.model_type}, {adapter.num_layers(ckpt.config)} layers) → "
        f"{choice.format.name} [{choice.reason}], {out_dtype}")
    _check_room(ckpt, info, plan, out_dtype, out)
    calibration = _calibration(ckpt, info, transforms, recipe, calib, device, dry_run)
    if dry_run:
        return {"dry_run": True, "format": choice.format.name, "format_reason": choice.reason, "plan": vars(plan),
                "inputs": reads.as_json()}
    shard_bytes = parse_size(recipe.output.shard_size)
    # under torchrun every rank converts (identically) and trains its share; only rank 0 publishes OUT
    writing = atomic_output(out, force, reads) if distributed.rank() == 0 else _rank_scratch()
    with writing as tmp:
        with _exact_reference(tmp, choice.exact) as reference:
            layer_stats = _write_model(ckpt, info, transforms, choice.format, tmp, out_dtype, shard_bytes, seed,
                                       calibration, reference)
            gap = None if reference is None else _measure_gap(info, tmp, reference, seed)
        finalized = {t.name: stats for t in transforms
                     if (stats := t.finalize(tmp, ckpt, calibration, out_dtype, recipe.output.shard_size))}
        if distributed.rank():  # its share of the training done; rank 0 checks and publishes OUT
            return {"rank": distributed.rank(), "finalize": finalized or None}
        record = {
            "moefy_version": moefy.__version__,
            "recipe": recipe.model_dump(mode="json"),
            "seed": seed,
            "source": {"origin": ckpt.origin, "path": str(ckpt.path), "model_type": adapter.model_type,
                       "weights_sha256": ckpt.weights_sha256},
            "calibration": calibration.record if calibration else None,
            "format": {"name": choice.format.name, "reason": choice.reason, "exact": choice.exact},
            "dtype": out_dtype,
            "layers": layer_stats,
            "finalize": finalized or None,  # model-wide passes after the layers (end-to-end distillation)
        }
        if gap is not None:
            record["format"]["gap"] = gap
            log(f"inexact {choice.format.name} export: max |Δlogit| vs the exact native model "
                f"{record['format']['gap']['max_abs_logit_diff']:.4g} on random prompts")
        record["load_check"] = _load_check(tmp, ckpt, info, transforms, choice, out_dtype, seed) if load_check \
            else {"skipped": True}
        record["output_sha256"] = Checkpoint(tmp).weights_sha256  # `batch --resume` trusts only these bytes
        record["summary"] = {k: v for k, v in summarize(tmp).items() if k != "provenance"}
        record["timing"] = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "convert_seconds": round(time.perf_counter() - started, 3), **_pop_timings(record)}
        write_record(tmp, record)
    log(f"wrote {out} in {record['timing']['convert_seconds']:.1f}s")
    return record


@contextlib.contextmanager
def _rank_scratch():
    """Where a rank other than 0 writes its copy of the conversion: a private temp dir, removed after."""
    with tempfile.TemporaryDirectory(prefix=f"moefy-rank{distributed.rank()}-") as scratch:
        yield Path(scratch)


def planned_bytes(ckpt: Checkpoint, info: SourceInfo, plan: LayerPlan, dtype: str) -> tuple[int, int]:
    """(bytes OUT will take, bytes of one MoE layer in fp32), from the headers and the plan alone."""
    adapter, config = info.adapter, info.config
    mlp_names = {name for layer in range(adapter.num_layers(config))
                 for name in adapter.mlp_weight_names(layer, config).values()}
    other = sum(math.prod(ckpt.shape(n)) for n in ckpt.tensor_names if n not in mlp_names)
    rows = 3 if adapter.gated else 2
    neurons = plan.num_experts * plan.expert_width if plan.expert_width else info.mlp_width
    moe = neurons * rows * info.hidden_size + plan.num_experts * info.hidden_size  # experts + router
    moe += info.mlp_width * rows * info.hidden_size if plan.shared else 0  # a shared expert: at most the MLP
    dense = info.mlp_width * rows * info.hidden_size
    layers = adapter.num_layers(config)
    moe_layers = layers - len([i for i in plan.dense_layers if 0 <= i < layers])
    size = TORCH_DTYPES[dtype].itemsize
    return size * (other + moe_layers * moe + (layers - moe_layers) * dense), 4 * moe


def _check_room(ckpt: Checkpoint, info: SourceInfo, plan: LayerPlan, dtype: str, out: Path) -> None:
    """Refuse up front a plan whose output cannot fit on OUT's disk, or one of whose layers cannot fit in memory."""
    total, layer = planned_bytes(ckpt, info, plan, dtype)
    existing = nearest_existing(Path(out).resolve().parent)
    free = shutil.disk_usage(existing).free
    if total > free:
        raise BadInput(f"this plan ({plan.num_experts:,} experts per MoE layer) writes about {total / 1e9:,.1f} GB, "
                       f"but {existing} has {free / 1e9:,.1f} GB free. Free space, write OUT elsewhere, or plan "
                       f"fewer or narrower experts.")
    memory = available_memory()
    if 2 * layer > memory:  # a layer's MoE is built from the dense MLP and copied once on its way out
        raise BadInput(f"one MoE layer of this plan ({plan.num_experts:,} experts) takes about {layer / 2**30:,.1f} "
                       f"GiB in float32, twice that while it is built, and this machine has "
                       f"{memory / 2**30:,.1f} GiB available. Plan fewer or narrower experts.")


def _load_check(out_dir: Path, ckpt: Checkpoint, info: SourceInfo, transforms, choice, dtype: str, seed: int) -> dict:
    """`moefy.loadcheck` on the written model; exact when every transform and the format are, and the output
    dtype rounds nothing the source stored."""
    from moefy.loadcheck import check_as_loaded

    lossless = dtype in ("float32", source_dtype(ckpt))
    exact = choice.exact and lossless and all(t.exact for t in transforms)
    return check_as_loaded(out_dir, ckpt.path, choice.format.name == "native", exact,
                           int(info.adapter.setting(info.config, "vocab_size")), seed)


def _pop_timings(node: dict, path: str = "") -> dict[str, float]:
    """Remove every wall-clock figure (keys ending in `seconds`) from the record, by dotted path: with them in
    the one `timing` field, the rest of moefy.json is a function of source, recipe and seed alone."""
    found = {}
    for key in list(node):
        if key.endswith("seconds"):
            found[path + key] = node.pop(key)
        elif isinstance(node[key], dict):
            found.update(_pop_timings(node[key], f"{path}{key}."))
    return found


def _calibration(ckpt: Checkpoint, info: SourceInfo, transforms, recipe: Recipe, calib: str | None, device: str,
                 dry_run: bool) -> Calibration | None:
    """Calibration tokens when a transform needs them (tokenized and checked on a dry run too, then dropped)."""
    users = [t.name for t in transforms if t.needs_calibration]
    spec = calib or recipe.calibration.dataset
    if not users:
        if calib:
            log(f"--calib {calib} is not used: no transform of this recipe calibrates")
        return None
    if spec is None:
        raise BadInput(f"{', '.join(users)} needs calibration data: pass --calib FILE (.txt/.raw/.jsonl/hf:...) or "
                       f"set calibration.dataset in the recipe.")
    c = recipe.calibration
    check_window(ckpt.config, c.seq_len, "calibration.seq_len", ckpt.origin)
    for transform in transforms:
        need = transform.min_calibration_tokens(info)
        if c.samples * c.seq_len < need:
            raise BadInput(f"{transform.name} needs at least {need:,} calibration tokens here, the recipe gives "
                           f"{c.samples * c.seq_len:,} (calibration.samples {c.samples} × seq_len {c.seq_len}). "
                           f"Raise calibration.samples.")
        if c.samples < transform.min_calibration_samples():
            raise BadInput(f"{transform.name} needs at least {transform.min_calibration_samples()} calibration "
                           f"samples, the recipe gives {c.samples}. Raise calibration.samples.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    calibration = load_calibration(ckpt, spec, c.samples, c.seq_len, mode=c.mode, batch_size=c.batch_size,
                                   device=device)  # tokenizing only: a dry run checks the data as a run does
    if dry_run:
        return None
    log(f"calibration: {c.samples} × {c.seq_len} tokens of {calibration.record['dataset']} ({c.mode}, {device})")
    return calibration


def _write_model(ckpt: Checkpoint, info: SourceInfo, transforms, fmt, directory: Path, dtype: str,
                 shard_bytes: int, seed: int, calibration: Calibration | None,
                 reference: Path | None = None) -> dict[str, dict]:
    """Weights, config, side files and format files of one output; returns per-layer stats. With `reference`,
    the same blocks are also written there in the native format in fp32 (exact), in the same pass."""
    torch.manual_seed(seed)
    targets = [(fmt, directory, dtype)]
    if reference is not None:
        targets.append((FORMATS["native"], reference, "float32"))
    blocks, layer_stats = _write_weights(ckpt, info, transforms, targets, shard_bytes, calibration)
    for target_fmt, target_dir, target_dtype in targets:
        config = target_fmt.config(info, blocks, target_dtype)
        (target_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for side in ckpt.side_files:
            shutil.copyfile(side, target_dir / side.name)
        target_fmt.write_files(target_dir)
    return layer_stats


@contextlib.contextmanager
def _exact_reference(tmp: Path, exact: bool):
    """A scratch directory beside the output for the exact native copy an inexact export is measured against
    (None when the format is exact); removed afterwards."""
    if exact:
        yield None
        return
    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".moefy-gap-") as scratch:
        yield Path(scratch)


def _measure_gap(info: SourceInfo, out_dir: Path, reference: Path, seed: int) -> dict:
    """Logit gap of an inexact export vs the same blocks written exactly (native, fp32), on random prompts;
    measured before any model-wide pass (`finalize`), so it is the format's error alone."""
    from moefy.loading import load_model

    ids = torch.randint(0, int(info.config["vocab_size"]), (4, 64), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        exact = load_model(reference)(input_ids=ids).logits.float()
        written = load_model(out_dir)(input_ids=ids).logits.float()
    diff = (written - exact).abs()
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "prompts": "4 random × 64 tokens",
            "reference": "the same blocks in the native format, float32, written in the same pass"}


def write_record(directory: Path, record: dict) -> None:
    """moefy.json and the model card, both regenerated from the record (each replaced atomically)."""
    for name, text in (("moefy.json", json.dumps(record, indent=2, sort_keys=True) + "\n"),
                       ("README.md", model_card(record))):
        partial = Path(directory) / f".{name}.partial"
        partial.write_text(text)
        os.replace(partial, Path(directory) / name)


def _write_weights(ckpt: Checkpoint, info: SourceInfo, transforms, targets: list, shard_bytes: int,
                   calibration: Calibration | None) -> tuple[dict[int, dict], dict[str, dict]]:
    """Every source tensor once; a layer's MLP weights are held until the layer is complete, then transformed
    and written to each of `targets` ((format, directory, dtype name): the output, and an exact reference when the
    output's format is not exact). Weight-only pipelines read the checkpoint in on-disk order (one sequential
    pass, which also hashes it); calibrating ones read the MLPs in layer order, as the layer-by-layer forward needs."""
    adapter = info.adapter
    num_layers = adapter.num_layers(info.config)
    owner = {name: (layer, role) for layer in range(num_layers)
             for role, name in adapter.mlp_weight_names(layer, info.config).items()}
    missing = [n for n in owner if not ckpt.has(n)]
    if missing:
        raise BadInput(f"{ckpt.path} lacks MLP weight {missing[0]!r} (and {len(missing) - 1} more) that a "
                       f"{adapter.model_type} model must have. The checkpoint is incomplete or not "
                       f"{adapter.model_type}.")
    for transform in transforms:
        request = transform.preview_request()
        if request is not None:
            _preview(ckpt, info, calibration, transform, request)
    runner = calibration.runner(ckpt, adapter) if calibration else None
    # a .bin stores a tied head twice; the embeddings are the one copy
    skip = {adapter.lm_head} if info.config.get("tie_word_embeddings", False) else set()
    reads = ckpt.stream() if runner is None else prefetch(_layer_order(ckpt, owner))
    roles = Counter(layer for layer, _ in owner.values())  # MLP tensors per layer
    as_stored = runner is None and all(t.only_rearranges for t in transforms)
    pending: dict[int, dict[str, torch.Tensor]] = {}
    blocks, stats = {}, {}
    with contextlib.ExitStack() as stack:
        writers = [(fmt, stack.enter_context(ShardedWriter(directory, shard_bytes)), TORCH_DTYPES[dtype])
                   for fmt, directory, dtype in targets]
        advance = stack.enter_context(progress("convert layers", num_layers))
        for name, tensor in reads:
            tensor = checked(name, tensor, ckpt.path)
            if name not in owner:
                if name not in skip:
                    for _, writer, dtype in writers:
                        writer.add(name, tensor.to(dtype))
                continue
            layer, role = owner[name]
            pending.setdefault(layer, {})[role] = tensor
            if len(pending[layer]) < roles[layer]:
                continue
            dense = mlp_from_tensors(info, pending.pop(layer), upcast=not as_stored)
            block = _transform_layer(layer, dense, transforms, runner, calibration)
            for fmt, writer, dtype in writers:
                for out_name, out_tensor in {**fmt.layer_tensors(layer, block, info),
                                             **fmt.extra_tensors(layer, info, ckpt.has)}.items():
                    writer.add(out_name, out_tensor.to(dtype))
            if isinstance(block, MoeLayer):
                blocks[layer] = block.block_spec()
                stats[str(layer)] = {**blocks[layer], "scales": [round(float(s), 6) for s in block.scales],
                                     **block.stats}
            advance()
        for _, writer, _ in writers:
            writer.close()
    ckpt.release()
    return blocks, stats


def _layer_order(ckpt: Checkpoint, owner: dict[str, tuple[int, str]]):
    """MLP weights layer by layer, then every other tensor in shard order."""
    for name in sorted(owner, key=lambda n: owner[n][0]):
        yield name, ckpt.get(name)
    for name in ckpt.tensor_names:
        if name not in owner:
            yield name, ckpt.get(name)


def _transform_layer(layer: int, dense: DenseMLP, transforms, runner, calibration: Calibration | None):
    """One layer through every transform (with its calibration inputs when the pipeline calibrates)."""
    inputs = runner.mlp_inputs(layer) if runner else None
    if inputs is not None and not torch.isfinite(inputs).all():
        raise CheckFailed(f"the MLP inputs of layer {layer} on the calibration data contain NaN or Inf; "
                          f"check the checkpoint's layers up to {layer} and the calibration text.")
    data = LayerData(inputs, dense) if inputs is not None else None
    block = dense
    for transform in transforms:
        block = transform.apply(layer, block, data)
    if runner:
        runner.advance(block.forward if calibration.sequential else dense.forward)
    return block


def _preview(ckpt: Checkpoint, info: SourceInfo, calibration: Calibration | None,
             transform, request: Preview) -> None:
    """A dense pass over calibration samples or texts, showing the transform every layer before it rewrites any."""
    if request.texts:
        runner = text_runner(ckpt, info.adapter, list(request.texts), calibration.device if calibration else "cpu")
    elif calibration is not None:
        runner = calibration.runner(ckpt, info.adapter, request.samples)
    else:
        return  # dry run: nothing to preview
    layers = info.adapter.num_layers(info.config)
    with progress(f"{transform.name}: preview layers", layers) as advance:
        for layer in range(layers):
            mlp = read_mlp(ckpt, info, layer)
            inputs = runner.mlp_inputs(layer)
            transform.preview(layer, mlp, list(inputs.split(runner.lengths)))
            runner.advance(mlp.forward)
            advance()


def model_card(record: dict) -> str:
    recipe, source, summary = record["recipe"], record["source"], record.get("summary", {})
    lines = [
        "---",
        f"base_model: {source['origin']}",
        "library_name: transformers",
        "tags: [moe, moefy]",
        "---",
        f"# {recipe['name']} of {source['origin']}",
        "",
        f"Converted by moefy {record['moefy_version']} with recipe `{recipe['name']}`"
        f"{': ' + recipe['description'] if recipe.get('description') else ''}.",
        "",
        f"- Format: `{record['format']['name']}` ({record['format']['reason']})",
        f"- Experts per MoE layer: {summary.get('num_experts')}, top-k {summary.get('top_k')}, "
        f"shared {summary.get('shared_experts')}",
        f"- Parameters: {summary.get('params_total', 0):,} total, {summary.get('params_active_per_token', 0):,} "
        f"active per token (MLP active fraction {summary.get('mlp_active_fraction', 0):.3f})",
        f"- dtype: {record['dtype']}, seed {record['seed']}",
    ]
    evaluation = record.get("eval")
    if evaluation:
        lines.append(f"- Perplexity on {evaluation['dataset']} ({evaluation['windows']}×{evaluation['seq_len']} "
                     f"tokens): {evaluation['ppl']:.4f} vs source {evaluation['baseline_ppl']:.4f} "
                     f"(Δ {evaluation['delta_pct']:+.4f}%)")
    else:
        lines.append("- Perplexity: not measured at conversion time (run `moefy eval OUT --baseline SOURCE`).")
    lines += ["", "Load with `moefy.load(path)`" + (" or `AutoModelForCausalLM.from_pretrained(path, "
              "trust_remote_code=True)`." if record["format"]["name"] == "native"
              else " or plain `AutoModelForCausalLM.from_pretrained(path)`."), ""]
    return "\n".join(lines)


def check_gates(out: Path, source: str, recipe: Recipe, eval_dataset: str | None) -> dict | None:
    """Evaluate OUT against SOURCE when the recipe has gates; record the result in moefy.json.

    Returns the eval report with `gate_passed` for a checked gate, None when there is no gate or no
    dataset to check it on.
    """
    gates = recipe.gates
    if gates is None or gates.max_delta_ppl_pct is None:
        return None
    dataset = eval_dataset or gates.dataset
    if dataset is None:
        log("gate max_delta_ppl_pct not checked: no dataset (pass --eval-dataset or set gates.dataset)")
        record = json.loads((Path(out) / "moefy.json").read_text())
        record["gates"] = {"checked": False, "reason": "no evaluation dataset given"}
        write_record(out, record)
        return None
    return evaluate_output(out, source, dataset, gates.seq_len, gates.max_windows, gates.max_delta_ppl_pct)


def evaluate_output(out: Path, source: str, dataset: str, seq_len: int, max_windows: int | None,
                    max_delta_ppl_pct: float | None) -> dict:
    """Perplexity of OUT against SOURCE, recorded in OUT's moefy.json (`eval`, and `gates` when a gate is given).

    Returns the eval report, with `gate_passed` (None without a gate)."""
    from moefy.evaluate import evaluate  # the model stack loads only when something is evaluated

    report = evaluate(str(out), baseline=source, dataset=dataset, seq_len=seq_len, max_windows=max_windows)
    record = json.loads((Path(out) / "moefy.json").read_text())
    record["eval"] = report
    passed = None
    if max_delta_ppl_pct is not None:
        passed = report["delta_pct"] <= max_delta_ppl_pct
        record["gates"] = {"checked": True, "max_delta_ppl_pct": max_delta_ppl_pct,
                           "delta_pct": report["delta_pct"], "passed": passed}
        log(f"gate Δppl ≤ {max_delta_ppl_pct}%: {report['delta_pct']:+.4f}% → {'pass' if passed else 'MISSED'}")
    write_record(out, record)
    return {**report, "gate_passed": passed}
