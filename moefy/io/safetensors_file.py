"""The safetensors file format, read tensor by tensor and written as a stream.

Each tensor is read (`pread`) into memory of its own, released with the tensor, so a process's memory
holds the tensors it still uses and nothing else, and a source that shrinks while it is read is an error
moefy reports (a memory map of it would end the process with SIGBUS).  Writing
streams each tensor to disk as it arrives: the header area is reserved up front and filled in
when the shard closes (the format allows a header padded with spaces).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch

from moefy.errors import BadInput, CheckFailed

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16,
          "U32": torch.uint32, "U64": torch.uint64}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def _not_json(constant: str):
    """Python's json reads NaN / Infinity, which JSON (and the safetensors library) does not have."""
    raise ValueError(f"{constant} is not JSON")


def read_header(path: Path) -> dict[str, dict]:
    """Return {name: {"dtype", "shape", "data_offsets"}}; a truncated or corrupt file is BadInput."""
    return _read_header(Path(path))[0]


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def _read_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor entries, byte offset where the data section starts), validated as strictly as the safetensors
    library validates: a known dtype, a shape of non-negative integers, offsets that match it, and tensors that
    tile the data section exactly (no overlap, no gap, nothing outside it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadInput(f"{path} is not a safetensors file (only {size} bytes). Re-download or re-save it.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise BadInput(f"{path} is truncated or corrupt: its header claims {header_len} bytes but the file "
                           f"has {size}. Re-download or re-save the checkpoint.")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BadInput(f"{path} has a corrupt safetensors header ({exc}). Re-download or re-save it.") from None
    if not isinstance(header, dict) or not raw.startswith(b"{"):
        raise BadInput(f"{path} has a corrupt safetensors header (not a JSON object). Re-download or re-save it.")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise BadInput(f"{path} has a corrupt `__metadata__` in its header (it must map strings to strings). "
                       f"Re-download or re-save it.")
    for name, info in header.items():
        _check_entry(path, name, info)
    position = 0
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        start, end = info["data_offsets"]
        if start != position:
            what = "overlaps the tensor before it" if start < position else f"leaves bytes {position}..{start} unused"
            raise BadInput(f"{path} is corrupt: tensor {name!r} (data bytes {start}..{end}) {what}. Re-download or "
                           f"re-save the checkpoint.")
        position = end
    data_len = size - 8 - header_len
    if position != data_len:
        raise BadInput(f"{path} is {'truncated' if position > data_len else 'corrupt'}: its tensors cover "
                       f"{position} bytes of data but the file holds {data_len}. Re-download or re-save the "
                       f"checkpoint.")
    return header, 8 + header_len


def _check_entry(path: Path, name: str, info) -> None:
    def bad(why: str):
        raise BadInput(f"{path} has a corrupt entry for tensor {name!r} in its header ({why}). Re-download or "
                       f"re-save the checkpoint.")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        bad("it must have dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        bad(f"dtype {dtype!r} is not one moefy reads: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        bad(f"data_offsets {offsets!r} is not [start, end] with 0 ≤ start ≤ end")
    expected = DTYPE_BYTES[dtype] * math.prod(shape)
    if offsets[1] - offsets[0] != expected:
        raise BadInput(f"{path} is corrupt: tensor {name!r} ({dtype} {shape}) should take {expected} bytes but "
                       f"its header gives {offsets[1] - offsets[0]}. Re-download or re-save it.")


class SafetensorsFile:
    """One safetensors file: its header, tensors read by byte range, and an in-order pass that hashes it.

    Reads `pread` their own byte range (no shared file position), so threads may read the same file at
    once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._seen = file_identity(os.stat(self.path))
        self.header, self.data_start = _read_header(self.path)
        self._fd: int | None = None

    def read(self, name: str) -> torch.Tensor:
        """The tensor, read (`pread`) into memory of its own. Not a memory map: pages of a map whose file
        shrinks afterwards kill the process with SIGBUS whenever they are touched, however late; a read
        that comes up short is an error moefy can report."""
        info = self.header[name]
        start, end = info["data_offsets"]
        self._unchanged()
        raw = self._read_range(self.data_start + start, end - start)
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])

    def stream(self, on_done=None):
        """Yield (name, tensor) in file order, reading every byte once; `on_done(sha256)` gets the file's digest.

        Hashing a tensor is what reads it from disk (its pages fault in, in order, like a plain `read`),
        so whoever iterates in a background thread also does the disk reads there."""
        digest, position = hashlib.sha256(), 0
        size = self.path.stat().st_size
        for name, info in sorted(self.header.items(), key=lambda item: item[1]["data_offsets"]):
            start = self.data_start + info["data_offsets"][0]
            if start > position:  # the header, and any bytes between tensors, belong to the digest too
                digest.update(self._read_range(position, start - position).numpy())
            tensor = self.read(name)
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
            position = start + tensor.numel() * tensor.element_size()
            yield name, tensor
        if size > position:
            digest.update(self._read_range(position, size - position).numpy())
        if on_done is not None:
            on_done(digest.hexdigest())

    def _unchanged(self) -> None:
        if file_identity(os.fstat(self._fileno())) != self._seen:
            raise changed_while_read(self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def _read_range(self, offset: int, length: int) -> torch.Tensor:
        fd = self._fileno()
        raw = torch.empty(length, dtype=torch.uint8)
        view, done = memoryview(raw.numpy()), 0
        while done < length:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                self._unchanged()
                raise BadInput(f"{self.path} ended early while reading a tensor. Re-download the checkpoint.")
            done += got
        return raw


def file_identity(stat: os.stat_result) -> tuple[int, int, int]:
    """What moves when a file is replaced, truncated or rewritten (inode, size, modification time)."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def changed_while_read(path: Path) -> CheckFailed:
    return CheckFailed(f"{path} changed while moefy was reading it (its size or modification time moved). Let "
                       f"whatever writes it finish, then run again.")


class StreamingShard:
    """A safetensors file written tensor by tensor: data goes out at once, the header last.

    `header_bytes` is reserved at the start; `fits` says when the next entry would overflow it.
    Writes run on `worker` (a SerialWorker), in order, so they overlap the caller's compute.
    """

    def __init__(self, path: Path, worker, header_bytes: int = 1 << 20):
        self.path = Path(path)
        self.header_bytes = header_bytes
        self.entries: dict[str, dict] = {}
        self.data_bytes = 0
        self._header_used = len('{"__metadata__":{"format":"pt"}}')
        self._worker = worker
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close() on the worker
        self._file.seek(8 + header_bytes)

    def fits(self, name: str, tensor: torch.Tensor) -> bool:
        return self._header_used + self._entry_length(name, self._entry(tensor)) <= self.header_bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        entry = self.entries[name] = self._entry(tensor)
        self._header_used += self._entry_length(name, entry)
        if tensor.numel():
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            self._worker.submit(lambda: self._file.write(data))
        self.data_bytes = entry["data_offsets"][1]

    def close(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        head = struct.pack("<Q", self.header_bytes) + header.ljust(self.header_bytes, b" ")

        def finish() -> None:
            self._file.seek(0)
            self._file.write(head)
            self._file.close()

        self._worker.submit(finish)

    def _entry(self, tensor: torch.Tensor) -> dict:
        """The header entry `tensor` gets when it is added next."""
        nbytes = tensor.numel() * tensor.element_size()
        return {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                "data_offsets": [self.data_bytes, self.data_bytes + nbytes]}

    @staticmethod
    def _entry_length(name: str, entry: dict) -> int:
        """Bytes the entry adds to the header (a bound: the comma and the braces of its own object)."""
        return len(json.dumps({name: entry}, separators=(",", ":"))) + 1
