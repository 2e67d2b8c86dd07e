"""Progress and log lines: rich bars on a terminal, plain timestamped lines otherwise (CI)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    if not _quiet:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {escape(message)}", highlight=False, soft_wrap=True)


@contextmanager
def progress(description: str, total: int):
    """Yield `advance(n=1)`; a live bar on a terminal, a line every ~10% when piped."""
    if _quiet:
        yield lambda n=1: None
        return
    if console.is_terminal and sys.stderr.isatty():
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
        return
    done, step, start = 0, max(1, total // 10), time.perf_counter()

    def advance(n: int = 1) -> None:
        nonlocal done
        before, done = done, done + n
        if done // step != before // step or done == total:
            log(f"{description}: {done}/{total} ({time.perf_counter() - start:.1f}s)")

    yield advance


@contextmanager
def transformers_log():
    """Yield the lines transformers logs (its load report: missing keys, new weights), captured instead of
    printed, with its progress bars off: moefy reports in its own words."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logger = logging.getLogger("transformers")
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.extend(record.getMessage().splitlines())
    saved = logger.handlers[:], logger.level
    logger.handlers, logger.level = [handler], logging.WARNING
    try:
        yield lines
    finally:
        logger.handlers, logger.level = saved
