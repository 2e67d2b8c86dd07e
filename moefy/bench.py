"""`moefy bench`: what a model costs per generated token, measured against its dense source in one process.

Both models generate from the same fixed random prompt (greedy, KV cache, Hugging Face `generate`), round by
round and interleaved (A B, B A, …) so that drift in machine load hits both alike. One `generate` call
gives both numbers: the time to the first new token is the prefill of the prompt; the steps after it are
decode. The bytes one decoded token reads (the weights it touches: every dense weight once, the routed
experts it selects, routers and shared experts; one row of an untied embedding) give the ideal ratio
that the measured decode ratio is compared with.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from moefy.convert import TORCH_DTYPES
from moefy.errors import BadInput
from moefy.io.checkpoint import open_source
from moefy.progress import log, progress
from moefy.resources import checked_device, usable_cores
from moefy.summary import summarize


def machine() -> str:
    """CPU model, ISA level and core count (or the GPU), as a report's reader needs to judge its numbers."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = next((level for level, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2")) if flag in flags), None)
    return ", ".join(part for part in (name, isa, f"{usable_cores()} usable cores") if part)


def default_baseline(model: str) -> str | None:
    """The dense model a moefy output was converted from (its moefy.json), if it can still be opened."""
    record = open_source(model).path / "moefy.json"
    if not record.is_file():
        return None
    try:
        origin = json.loads(record.read_text())["source"]["origin"]
    except (ValueError, KeyError, TypeError):
        return None
    try:
        open_source(origin)
    except BadInput:
        raise BadInput(f"{model} was converted from {origin}, which cannot be opened here: pass --baseline SOURCE "
                       f"(the dense model to compare with) or --baseline none.") from None
    return origin


def decode_weight_bytes(model, path: str) -> int:
    """Bytes of weights one decoded token reads: every parameter once (tied ones once), less the routed experts
    it does not select (from the checkpoint's accounting) and all but one row of each untied embedding."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    summary = summarize(path)
    element = next(model.parameters()).element_size()
    unselected = (summary["params_total"] - summary["params_active_per_token"]) * element
    head = model.get_output_embeddings()
    head_weight = None if head is None else head.weight
    lookups = sum((m.weight.numel() - m.weight.shape[1]) * m.weight.element_size() for m in model.modules()
                  if isinstance(m, torch.nn.Embedding) and m.weight is not head_weight)
    return total - unselected - lookups


class _StepClock:
    """A stopping criterion that never stops: it records when each new token was chosen."""

    def __init__(self, device: str):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate_once(model, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) of one greedy generation of `new_tokens` tokens."""
    from transformers import StoppingCriteriaList

    clock = _StepClock(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                   stopping_criteria=StoppingCriteriaList([clock]))
    first, last = clock.stamps[0], clock.stamps[-1]
    return first - start, (last - first) / (len(clock.stamps) - 1)


def bench(model_spec: str, *, baseline: str | None, prompt_tokens: int = 512, new_tokens: int = 128,
          batch: int = 1, threads: int | None = None, backend: str = "auto", rounds: int = 5,
          device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict:
    """The `moefy bench --json` report (README: moefy bench)."""
    from moefy.loading import checked_backend, load_model

    for name, value, least in (("--prompt-tokens", prompt_tokens, 1), ("--new-tokens", new_tokens, 2),
                               ("--batch", batch, 1), ("--rounds", rounds, 1)):
        if value < least:
            raise BadInput(f"{name} {value} must be at least {least}.")
    if dtype not in TORCH_DTYPES:
        raise BadInput(f"--dtype {dtype!r} is unknown; use {', '.join(TORCH_DTYPES)}.")
    threads = threads or usable_cores()
    if threads < 1:
        raise BadInput(f"--threads {threads} must be at least 1.")
    device = checked_device(device)
    torch.set_num_threads(threads)
    backend = checked_backend(backend, device)
    specs = {"model": model_spec, **({"baseline": baseline} if baseline is not None else {})}
    models, runs = {}, {}
    for role, spec in specs.items():
        log(f"loading {role} {spec}")
        model = load_model(spec, dtype=TORCH_DTYPES[dtype], backend=backend, device=device)
        models[role] = model
        runs[role] = {"path": str(spec), "decode_weight_bytes": decode_weight_bytes(model, spec),
                      "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "prefill_samples": [], "decode_samples": []}
    vocab = min(m.get_input_embeddings().weight.shape[0] for m in models.values())
    for role, model in models.items():
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and prompt_tokens + new_tokens > positions:
            raise BadInput(f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the {role}'s "
                           f"{positions} positions (max_position_embeddings); ask for fewer tokens.")
    prompt = torch.randint(0, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.to(device)
    order = list(models)
    with torch.inference_mode():
        for model in models.values():  # warm-up: allocations at full size, first-call paths
            _generate_once(model, prompt, 3, device)
        with progress(f"bench ({len(order)} models × {rounds} rounds)", rounds * len(order)) as advance:
            for r in range(rounds):
                for role in order if r % 2 == 0 else order[::-1]:
                    prefill_s, step_s = _generate_once(models[role], prompt, new_tokens, device)
                    runs[role]["prefill_samples"].append(batch * prompt_tokens / prefill_s)
                    runs[role]["decode_samples"].append(batch / step_s)
                    advance()
    for run in runs.values():
        run["prefill_tokens_per_s"] = statistics.median(run["prefill_samples"])
        run["decode_tokens_per_s"] = statistics.median(run["decode_samples"])
    report = {"model": str(model_spec), "baseline": None if baseline is None else str(baseline),
              "machine": machine(), "device": device, "threads": threads, "backend": backend,
              "dtype": str(next(models["model"].parameters()).dtype).removeprefix("torch."),
              "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch": batch, "rounds": rounds,
              "runs": runs, "prefill_ratio": None, "decode_ratio": None, "bytes_ideal_ratio": None,
              "decode_of_ideal": None,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if baseline is not None:
        model, base = runs["model"], runs["baseline"]
        paired = {kind: statistics.median(m / b for m, b in zip(model[f"{kind}_samples"], base[f"{kind}_samples"]))
                  for kind in ("prefill", "decode")}
        ideal = base["decode_weight_bytes"] / model["decode_weight_bytes"]
        report.update(prefill_ratio=paired["prefill"], decode_ratio=paired["decode"], bytes_ideal_ratio=ideal,
                      decode_of_ideal=paired["decode"] / ideal)
    return report
