"""What the machine has to spare, read where a plan must fit it (batch --jobs, convert's room check, the load
check), and the devices and cores a run may use."""

from __future__ import annotations

import os
from pathlib import Path

from moefy.errors import BadInput


def available_memory() -> int:
    """MemAvailable of /proc/meminfo, in bytes (unknown: practically unlimited)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: memory sets no limit


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), the default thread count of bench and generate."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def checked_device(device: str, allowed: tuple[str, ...] = ("cpu", "cuda")) -> str:
    """`--device` as given, once it is one of `allowed` and, for cuda, torch can use a GPU here."""
    if device not in allowed:
        raise BadInput(f"--device {device!r} is unknown: expected {', '.join(allowed[:-1])} or {allowed[-1]}.")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BadInput("--device cuda: this machine has no CUDA GPU that torch can use (the CPU build of torch, "
                           f"or no driver). Use --device {' or '.join(d for d in allowed if d != 'cuda')}.")
    return device
