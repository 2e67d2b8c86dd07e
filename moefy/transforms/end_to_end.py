"""End-to-end distillation: the written MoE model learns the dense source's next-token distributions.

Unlike the layer-by-layer stages this holds both models in memory (teacher in inference mode,
student training, optionally with activation checkpointing), so it is for models that fit. Loss:
KL(teacher ‖ student) per token on the calibration samples (the first `holdout_samples` are kept out to
measure it before and after); a `minutes` budget covers the whole stage, loading and evaluations
included. MoE blocks train on moefy's `torch` experts backend (grouped matmuls over the selected experts
only, differentiable); the routing they compute is the one they run. The trained weights replace the
written ones only if the held-out KL improved; they are saved with transformers' own `save_pretrained`
(the checkpoint layout every loader reads), in the output dtype, and only the weight files are taken
from it.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moefy.errors import BadInput
from moefy.io.checkpoint import WEIGHT_INDEXES
from moefy.progress import log, progress


def train_adam(groups: list[tuple[list[torch.Tensor], float]], loss_fn, steps: int | None, seconds: float | None,
               on_step=None, on_backward=None, agree=None) -> tuple[int, list[float], float]:
    """Adam on `groups` of (tensors, step relative to each tensor's RMS) until `steps` are done or the next
    step, at the pace so far, would end after `seconds`; loss_fn(step) gives each step's loss. The step size
    decays on a cosine over the steps — or over the seconds when there is no step limit or the pace says
    the clock will stop the run first, so a run the clock ends still ends with small steps (and only such
    a run depends on the machine's speed). Data-parallel: `on_backward()` averages the gradients, and
    `agree([stop, schedule])` gives every rank the same clock decisions. Returns (steps done, their losses,
    seconds)."""
    optimizer = torch.optim.Adam([{"params": [t], "lr": lr * _rms(t)} for ts, lr in groups for t in ts])
    base = [group["lr"] for group in optimizer.param_groups]
    start, done, losses = time.perf_counter(), 0, []
    while steps is None or done < steps:
        elapsed = time.perf_counter() - start
        stop = seconds is not None and (elapsed >= seconds or done and elapsed * (done + 1) / done > seconds)
        clock_binds = seconds is not None and (steps is None or done and elapsed / done * steps > seconds)
        used = 1.0 if stop else elapsed / seconds if clock_binds else done / steps
        if agree is not None:
            stop, used = agree([float(stop), used])
        if stop:
            break
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, used)))
        tick = time.perf_counter()
        loss = loss_fn(done)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if on_backward is not None:
            on_backward()
        optimizer.step()
        losses.append(loss.item())
        done += 1
        if on_step is not None:
            on_step(time.perf_counter() - tick)
    return done, losses, time.perf_counter() - start


def improved(before: float, after: float) -> bool:
    """A real gain on held-out data, not rounding noise on an already-exact model."""
    return after < before - max(1e-3 * before, 1e-7)


def _kl(student, teacher, ids: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) of a batch of sequences [B, L]."""
    with torch.no_grad():
        target = teacher(input_ids=ids).logits.float().log_softmax(-1)
    logits = student(input_ids=ids).logits.float().log_softmax(-1)
    return F.kl_div(logits.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")


def _trainable(model, what: str) -> list[torch.Tensor]:
    """The parameters `train` names — all, every MoE block's, or only what routes (each block's format, or
    the native block, says which of its submodules route) — set to require gradients, the others not."""
    from moefy.loading import format_of, moe_blocks

    if what == "all":
        names = {n for n, _ in model.named_parameters()}
    else:
        names = set()
        for block, module in moe_blocks(model):
            routing = (format_of(module) or module).routing_modules()
            names |= {f"{block}.{n}" for n, _ in module.named_parameters()
                      if what == "moe" or n.split(".")[0] in routing}
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            params.append(param)
    return params


def distill_end_to_end(out_dir: Path, source, tokens: torch.Tensor, options, seed: int, dtype: str,
                       shard_size: str, device: str = "cpu") -> dict:
    """Train the model written to `out_dir` against `source` on `device` (the calibration device: teacher
    and student both resident there, fp32). Under torchrun each step's `batch` sequences are split over the
    ranks (`moefy.distributed`)."""
    from moefy import distributed
    from moefy.loading import load_model, runs_on_moefy

    ranks, me = distributed.world_size(), distributed.rank()  # Distill.plan checked that the batch splits
    distributed.join(device)
    local = options.batch // ranks
    stage_start = time.perf_counter()
    tokens = tokens.to(device)
    held, train = tokens[: options.holdout_samples], tokens[options.holdout_samples:]  # convert checked: train ≥ 1
    teacher = load_model(source, device=device)
    tick = time.perf_counter()
    student = load_model(out_dir, backend="torch", device=device)  # torch: differentiable experts
    load_seconds = time.perf_counter() - tick
    params = _trainable(student, options.train)
    if not params:
        raise BadInput(f"distill.end_to_end.train={options.train!r} finds no parameters in {out_dir.name}.")
    tick = time.perf_counter()
    with torch.no_grad():
        before = float(_kl(student, teacher, held))
    eval_seconds = time.perf_counter() - tick
    if student._can_set_experts_implementation() and not runs_on_moefy(student):
        student.set_experts_implementation("eager")  # a layout moefy does not compute: transformers' own loop
    student.train()
    if options.checkpointing:
        # transformers ≥ 5.x renamed gradient_checkpointing_enable (deprecated, still there)
        getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
    budget, seq_len = options.budget, train.shape[1]
    steps = None if budget.tokens is None else max(1, budget.tokens // (seq_len * options.batch))
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed)).tolist()
    # the minutes cover the whole stage: what ran so far, training, the held-out evaluation after it (as long
    # as the one before) and writing the weights (as long as reading them)
    seconds = None if budget.minutes is None else max(
        0.0, 60 * budget.minutes - (time.perf_counter() - stage_start) - eval_seconds - load_seconds)
    total = steps or max(1, int(seconds))  # progress ticks: steps, or seconds
    with progress("distill end to end", total) as advance:
        def loss(step: int) -> torch.Tensor:  # this rank's share of the step's batch
            first = step * options.batch + me * local
            return _kl(student, teacher, train[[order[(first + j) % len(order)] for j in range(local)]])

        done, losses, seconds = train_adam(
            [(params, options.lr)], loss, steps, seconds,
            on_step=lambda took: advance(1 if steps is not None else max(0, round(took))),
            on_backward=lambda: distributed.average_gradients(params),
            agree=distributed.rank0_values if ranks > 1 else None)
    student.eval()
    with torch.no_grad():
        after = float(_kl(student, teacher, held)) if done else before
    kept = distributed.rank0_decides(improved(before, after))
    log(f"distill end to end: held-out KL {before:.4f} → {after:.4f}{'' if kept else ' (kept the original)'} in "
        f"{done} steps ({done * seq_len * options.batch:,} tokens), {seconds:.0f}s")
    if kept and me == 0:  # the other ranks' copies are discarded (and transformers saves on rank 0 only)
        _save_weights(student, Path(out_dir), getattr(torch, dtype), shard_size)
    return {"holdout_kl_before": round(before, 6), "holdout_kl_after": round(after, 6), "kept": kept,
            "train": options.train, "device": device, "steps": done, "tokens": done * seq_len * options.batch,
            "batch": options.batch, "processes": ranks,
            "seconds": round(seconds, 2),
            # what ended training: the token budget (reproducible), or the clock (depends on the machine's speed)
            "stopped_by": "tokens" if steps is not None and done >= steps else "clock",
            "train_kl_first_last": [round(losses[0], 6), round(losses[-1], 6)] if losses else None}


def _rms(t: torch.Tensor) -> float:
    """The scale Adam steps are relative to; 1 for an all-zero tensor (a new bias: absolute steps)."""
    value = float(t.detach().float().pow(2).mean().sqrt())
    return value if value > 0 else 1.0


def _save_weights(model, out_dir: Path, dtype: torch.dtype, shard_size: str) -> None:
    """Replace the weight files of `out_dir` with the model's (config and everything else stay)."""
    model.to(dtype)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".moefy-e2e-") as scratch:
        model.save_pretrained(scratch, max_shard_size=shard_size)
        for old in list(out_dir.glob("*.safetensors")) + [out_dir / n for n in WEIGHT_INDEXES]:
            old.unlink(missing_ok=True)
        for new in Path(scratch).iterdir():
            if new.suffix == ".safetensors" or new.name in WEIGHT_INDEXES:
                shutil.move(str(new), out_dir / new.name)
