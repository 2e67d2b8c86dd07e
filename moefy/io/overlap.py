"""Overlap file I/O with compute: reads run ahead in one thread, writes trail behind in another.

File reads and writes, and sha256 updates, release the GIL, so on a machine with a couple of cores
a conversion costs about its slowest stage instead of the sum of read + compute + write.  Both
queues are bounded (reads by bytes, writes by count), so memory holds a known amount in flight.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator

_END = object()


def prefetch(items: Iterable, budget: int = 1, size: Callable[[object], int] = lambda item: 1) -> Iterator:
    """Iterate `items` in a background thread, running ahead while the items waiting total at most `budget`
    (by `size`; by default one item); its exceptions re-raise here."""
    ready: deque = deque()
    state = {"waiting": 0, "stop": False}
    changed = threading.Condition()

    def produce() -> None:
        try:
            for item in items:
                with changed:
                    changed.wait_for(lambda: state["stop"] or not ready or state["waiting"] < budget)
                    if state["stop"]:
                        return
                    ready.append((item, None))
                    state["waiting"] += size(item)
                    changed.notify_all()
            result = (_END, None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            result = (None, exc)
        with changed:
            ready.append(result)
            changed.notify_all()

    thread = threading.Thread(target=produce, name="moefy-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            with changed:
                changed.wait_for(lambda: ready)
                item, error = ready.popleft()
                if error is None and item is not _END:
                    state["waiting"] -= size(item)
                changed.notify_all()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        with changed:
            state["stop"] = True
            changed.notify_all()
        thread.join()


class SerialWorker:
    """Run submitted callables one after another in a background thread (up to `depth` queued).

    The first failure is raised by every later `submit` and `wait`; work after it is skipped."""

    def __init__(self, depth: int = 2):
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="moefy-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not _END:
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - re-raised in the submitting thread
                    self._error = exc
            self._jobs.task_done()
        self._jobs.task_done()

    def submit(self, job: Callable[[], object]) -> None:
        self._raise()
        self._jobs.put(job)

    def wait(self) -> None:
        """Block until everything submitted has run; raise the first failure."""
        self._jobs.join()
        self._raise()

    def close(self) -> None:
        self._jobs.put(_END)
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
