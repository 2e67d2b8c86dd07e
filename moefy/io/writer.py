"""Write checkpoints: size-bounded safetensors shards with an index, into an atomic output dir."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from moefy.errors import BadInput

SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'2GB' → 2_000_000_000; plain integers are bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * SIZE_UNITS[unit])
    return int(s)


class ShardedWriter:
    """Accumulate tensors and spill a shard whenever the next tensor would exceed `max_shard_bytes`.

    Memory is bounded by one shard.  Shards get their final `-0000i-of-0000N` names in `close()`.
    """

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path.name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name them all, and write the index when there is more than one."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.directory / self._shards[0][0], self.directory / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp_name, tensors) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / tmp_name, self.directory / final)
            weight_map.update({t: final for t in tensors})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def check_output_path(out: Path, force: bool, sources: list[Path] = ()) -> None:
    """Refuse to clobber an existing OUT without --force, or to write inside a source."""
    out = Path(out)
    for src in sources:
        if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
            raise BadInput(f"OUT {out} is inside the source checkpoint {src}. Choose an output path elsewhere.")
    if out.exists() and not force:
        raise BadInput(f"OUT {out} already exists. Pass --force to replace it, or choose another path.")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"the parent directory of OUT ({parent}) cannot be created ({exc.strerror}). Choose "
                       f"another output path.") from None
    if not os.access(parent, os.W_OK):
        raise BadInput(f"the parent directory of OUT ({parent}) is not writable. Choose a writable location.")


@contextmanager
def atomic_output(out: Path):
    """Yield a temp dir beside OUT; rename it to OUT only if the block finishes.

    A failure or interrupt removes the temp dir, so no partial OUT is ever left behind.
    """
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.moefy-tmp-", dir=out.resolve().parent))
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.moefy-old-{os.getpid()}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
