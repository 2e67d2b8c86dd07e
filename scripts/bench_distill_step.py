"""What one end-to-end distillation step costs: KL to the dense source on one calibration sample, backward,
Adam — the step `distill`'s end-to-end stage repeats until its budget ends.

    python scripts/bench_distill_step.py out/demo-carve-25 --backends torch eager --steps 12

For each experts backend in turn (a moefy backend name, or `eager`: transformers' own per-expert loop,
standard exports only) it times --steps steps on the same sample and reports the median of all but the
first two (warm-up). Run it alone on the machine: the figures are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_carve import SHARED

from moefy.calib import load_calibration
from moefy.transforms.end_to_end import _kl, _trainable, train_adam
from moefy.io.checkpoint import open_source
from moefy.loading import experts_implementation, load_model
from moefy.progress import set_quiet


def step_seconds(student, teacher, ids: torch.Tensor, steps: int) -> list[float]:
    """Each step's seconds, through the stage's own training loop (tiny steps: only the time matters)."""
    student.train()
    times = []
    train_adam([(_trainable(student, "moe"), 1e-6)], lambda step: _kl(student, teacher, ids), steps, None,
               on_step=times.append)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a converted checkpoint with a standard MoE export")
    parser.add_argument("--source", default="demo")
    parser.add_argument("--calib", default=str(SHARED / "wikitext-2" / "valid.txt"))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--backends", nargs="+", default=["torch", "eager"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(args.threads)
    ids = load_calibration(open_source(args.source), args.calib, 1, args.seq_len).tokens
    teacher = load_model(args.source)
    with torch.no_grad():
        teacher(input_ids=ids)  # warm-up
        start = time.perf_counter()
        teacher(input_ids=ids)
        teacher_s = time.perf_counter() - start
    report = {"model": args.model, "seq_len": args.seq_len, "threads": args.threads,
              "teacher_forward_s": round(teacher_s, 3), "backends": {}}
    for backend in args.backends:
        student = load_model(args.model)
        student.set_experts_implementation("eager" if backend == "eager" else experts_implementation(backend))
        times = step_seconds(student, teacher, ids, args.steps)
        report["backends"][backend] = {"median_step_s": round(statistics.median(times[2:]), 3),
                                       "steps_s": [round(t, 2) for t in times]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
