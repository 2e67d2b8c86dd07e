"""Write checkpoints: size-bounded safetensors shards with an index (into the temp dir of `io.output`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moefy.io.overlap import SerialWorker
from moefy.io.safetensors_file import StreamingShard

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
    """Stream tensors into size-bounded safetensors shards; a shard closes when the next tensor would
    push it past `max_shard_bytes` (or overflow its reserved header).

    Each tensor goes to disk as it is added (on a background writer, a couple of tensors behind), so
    memory holds no shard.  Shards get their final `-0000i-of-0000N` names in `close()`.  Use as a
    context manager: leaving it by an exception stops the writer without naming anything.
    """

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._worker = SerialWorker(depth=4)
        self._header_bytes = min(1 << 20, max(1 << 12, max_shard_bytes // 256 // 8 * 8))
        self._shard: StreamingShard | None = None
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        shard = self._shard
        if shard is not None and shard.entries and (shard.data_bytes + nbytes > self.max_shard_bytes
                                                    or not shard.fits(name, tensor)):
            self._flush()
        self._open_shard().add(name, tensor)
        self.total_bytes += nbytes

    def _open_shard(self) -> StreamingShard:
        if self._shard is None:
            self._shard = StreamingShard(self.directory / f"shard-{len(self._shards):05d}.tmp", self._worker,
                                         self._header_bytes)
        return self._shard

    def _flush(self) -> None:
        self._open_shard().close()
        self._shards.append((self._shard.path.name, list(self._shard.entries)))
        self._shard = None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._worker.close()

    def close(self) -> list[str]:
        """Write the last shard, name them all, and write the index when there is more than one."""
        if self._shard is not None or not self._shards:
            self._flush()
        self._worker.wait()
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
