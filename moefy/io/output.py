"""Where a run may write, and how: the rules that keep everything a user owns intact.

- Nothing a run writes (OUT, a `--json` report, a batch log) is, contains, or lies inside any of the run's
  inputs (sources, checkpoints and files named in options, the recipe, datasets).
- `--force` replaces only a previous moefy output (a directory whose moefy.json moefy wrote) or an empty
  directory, never anything else.
- One writer per OUT: a second conversion to an OUT being written is refused, naming the holder's PID.
- OUT is written in a temp dir beside it and renamed at the end (`atomic_output`): an error, Ctrl-C or SIGTERM
  leaves no partial OUT; a process killed outright leaves only `.OUT.moefy-tmp-PID-…`, swept up next time.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from moefy.errors import BadInput

TEMP_MARK = ".moefy-tmp-"
OLD_MARK = ".moefy-old-"
LOCK_SUFFIX = ".moefy-lock"


class Inputs:
    """Every path a run reads, each with what it is (for the message that names it)."""

    def __init__(self):
        self.paths: list[tuple[Path, str]] = []

    def add(self, path: str | Path | None, what: str) -> None:
        """A local path the run reads; `hf:` datasets, hub ids and built-in names are not files and are ignored."""
        if path is None or str(path).startswith("hf:"):
            return
        path = Path(path).expanduser()
        if path.exists():
            self.paths.append((path.resolve(), what))

    def extend(self, other: Inputs) -> None:
        self.paths += other.paths

    def as_json(self) -> list[dict]:
        return [{"path": str(p), "what": what} for p, what in self.paths]

    @classmethod
    def from_json(cls, entries: list[dict]) -> Inputs:
        inputs = cls()
        inputs.paths = [(Path(e["path"]), e["what"]) for e in entries]
        return inputs

    def check_target(self, target: Path, what: str) -> None:
        """Refuse a write target that is, contains or lies inside one of the inputs."""
        resolved = Path(target).expanduser().resolve()
        for path, label in self.paths:
            relation = overlap(resolved, path)
            if relation is None:
                continue
            raise BadInput(f"{what} {target} {relation} {label} {path}, which this run reads. moefy never writes "
                           f"into, over or around its inputs; choose a path outside every input.")


def overlap(target: Path, path: Path) -> str | None:
    """How two resolved paths overlap: "is", "lies inside" (target within path), "contains", or None."""
    if target == path:
        return "is"
    if path in target.parents:
        return "lies inside"
    if target in path.parents:
        return "contains"
    return None


def nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists (where a directory to be created would go)."""
    return next(p for p in (path, *path.parents) if p.exists())


def is_moefy_output(path: Path) -> bool:
    """A directory holding a moefy.json that moefy wrote (a JSON object with `moefy_version`)."""
    try:
        record = json.loads((Path(path) / "moefy.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and "moefy_version" in record


def check_output_path(out: Path, force: bool, inputs: Inputs) -> None:
    """Up-front checks of OUT (a dry run makes them too): not an input, replaceable, its parent writable."""
    out = Path(out)
    inputs.check_target(out, "OUT")
    if out.exists() or out.is_symlink():
        if not force:
            raise BadInput(f"OUT {out} already exists. Pass --force to replace it (only a previous moefy output or "
                           f"an empty directory is ever replaced), or choose another path.")
        if not _replaceable(out):
            raise BadInput(f"OUT {out} exists and is not a moefy output (it has no moefy.json written by moefy), so "
                           f"--force will not replace it: moefy replaces only its own previous outputs and empty "
                           f"directories. Move it away or choose another OUT.")
    parent = out.resolve().parent
    existing = nearest_existing(parent)  # the rest is created when the writing starts
    if not existing.is_dir():
        _uncreatable(out, f"{existing} is not a directory")
    try:  # the one sure test (permissions, read-only mounts, /proc): make a directory there, and remove it
        os.rmdir(tempfile.mkdtemp(prefix=".moefy-probe-", dir=existing))
    except OSError as exc:
        _uncreatable(out, f"{existing}: {exc.strerror}")


def _uncreatable(out: Path, why: str):
    raise BadInput(f"the parent directory of OUT {out} cannot be created or written ({why}). Choose a writable "
                   f"location.") from None


def _replaceable(out: Path) -> bool:
    if not out.is_dir():
        return False
    return is_moefy_output(out) or not any(out.iterdir())


def check_report_path(path: Path | None, inputs: Inputs, what: str = "--json") -> None:
    """Up-front checks of a report file (`--json`, a batch log): not an input, not a directory."""
    if path is None:
        return
    inputs.check_target(path, f"{what} file")
    if Path(path).is_dir():
        raise BadInput(f"{what} {path} is a directory; give the path of a file to write the report to.")


def write_report(path: Path, text: str) -> None:
    """Write a report file atomically (a temp file beside it, renamed), creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def output_lock(out: Path):
    """Hold OUT's lock (`.OUT.moefy-lock` beside it, an flock the kernel drops if the process dies)."""
    out = Path(out)
    lock_path = out.resolve().parent / f".{out.name}{LOCK_SUFFIX}"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise BadInput(f"OUT {out} is being written by another moefy process (PID {holder}). Wait for it to "
                           f"finish, or choose another OUT.") from None
        try:  # the holder before us may have removed the file after we opened it: lock the one on disk
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def atomic_output(out: Path, force: bool, inputs: Inputs):
    """Lock OUT, check it again (another run may have finished meanwhile), yield a temp dir beside it and
    rename that to OUT only if the block finishes; a failure or interrupt removes the temp dir."""
    out = Path(out)
    check_output_path(out, force, inputs)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _uncreatable(out, exc.strerror)
    with output_lock(out):
        check_output_path(out, force, inputs)  # again, now that no other writer can: one may have just finished
        for mark in (TEMP_MARK, OLD_MARK):  # left by killed conversions to this OUT whose process is gone
            for stale in parent.glob(f".{out.name}{mark}*"):
                pid = stale.name.removeprefix(f".{out.name}{mark}").split("-")[0]
                if pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_MARK}{os.getpid()}-", dir=parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 is for its privacy while written: OUT gets mkdir's mode
        try:
            yield tmp
            if out.exists() or out.is_symlink():
                trash = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD_MARK}{os.getpid()}-", dir=parent))
                os.replace(out, trash / "old")
                os.replace(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
