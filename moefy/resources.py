"""What the machine has to spare, read where a plan must fit it (batch --jobs, convert's room check, the load check)."""

from __future__ import annotations

from pathlib import Path


def available_memory() -> int:
    """MemAvailable of /proc/meminfo, in bytes (unknown: practically unlimited)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: memory sets no limit
