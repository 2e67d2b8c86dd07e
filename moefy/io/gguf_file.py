"""The GGUF container, checked before transformers reads it.

transformers reads `.gguf` files with `gguf.GGUFReader`, which trusts every count and offset in the header: an
array length of 2^60 loops for ever, and tensors that overlap, or reach past the end of the file, are read as
whatever bytes lie there.  `check_gguf` walks the header once with bounds on every read (each count is checked
against the bytes left before anything is allocated) and refuses what llama.cpp's own loader refuses, so only a
well-formed file reaches the reader.
"""

from __future__ import annotations

import struct
from pathlib import Path

from moefy.errors import BadInput

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 64  # GGML_MAX_NAME, including the terminating zero llama.cpp stores
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY, BOOL = 8, 9, 7


class _Corrupt(Exception):
    """Raised inside the walk; `check_gguf` turns it into one BadInput naming the file."""


class _Cursor:
    """Sequential reads of a file that never ask for more bytes than the file has left."""

    def __init__(self, f, size: int, order: str):
        self.f, self.size, self.order, self.pos = f, size, order, 0

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise _Corrupt(f"{what} at byte {self.pos} needs {n} bytes, but only {self.size - self.pos} are left")
        self.pos += n
        return self.f.read(n)

    def unpack(self, code: str, what: str):
        return struct.unpack(self.order + code, self.take(struct.calcsize(code), what))[0]

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count of items of at least `min_item_bytes` each: more than the bytes left is corrupt."""
        n = self.unpack("Q", what)
        if n * min_item_bytes > self.size - self.pos:
            raise _Corrupt(f"{what} is {n}, more than the {self.size - self.pos} bytes left can hold")
        return n

    def string(self, what: str) -> str:
        raw = self.take(self.count(f"the length of {what}", 1), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} at byte {self.pos - len(raw)} is not UTF-8") from None


def _value(cur: _Cursor, kind: int, key: str, in_array: bool = False):
    if kind in SCALARS:
        value = cur.unpack(SCALARS[kind], f"the value of {key}")
        if kind == BOOL:  # read as a byte: GGUF stores 0 or 1
            if value not in (0, 1):
                raise _Corrupt(f"the boolean {key} holds {value}")
            return bool(value)
        return value
    if kind == STRING:
        return cur.string(f"the value of {key}")
    if kind == ARRAY and not in_array:  # llama.cpp reads no arrays of arrays
        item = cur.unpack("I", f"the item type of {key}")
        if item not in SCALARS and item != STRING:
            raise _Corrupt(f"the array {key} has item type {item}, which GGUF does not define for arrays")
        n = cur.count(f"the length of {key}", struct.calcsize(SCALARS[item]) if item in SCALARS else 8)
        if item in SCALARS:  # read in one piece: a vocabulary has 10^5 scores
            size = struct.calcsize(SCALARS[item])
            raw = cur.take(n * size, f"the items of {key}")
            values = struct.unpack(f"{cur.order}{n}{SCALARS[item]}", raw) if n else ()
            if item == BOOL:
                if any(v not in (0, 1) for v in raw):
                    raise _Corrupt(f"the boolean array {key} holds a value other than 0 or 1")
                return [bool(v) for v in values]
            return list(values)
        return [_value(cur, item, key, in_array=True) for _ in range(n)]
    raise _Corrupt(f"{key} has value type {kind}, which GGUF does not define")


def check_gguf(path: Path) -> dict:
    """Walk the header of a GGUF file and check every tensor's place in it; return the metadata
    ({key: value}). A file that is not well-formed GGUF is BadInput naming what is wrong."""
    path = Path(path)
    try:
        return _walk(path)
    except _Corrupt as exc:
        raise BadInput(f"{path} is not a well-formed GGUF file: {exc}. Re-download it, or re-export it with "
                       f"llama.cpp's converter.") from None
    except OSError as exc:
        raise BadInput(f"{path} could not be read ({exc.strerror}).") from None


def _walk(path: Path) -> dict:
    import gguf  # its table of block sizes; loading a .gguf needs the package anyway

    size = path.stat().st_size
    with open(path, "rb") as f:
        cur = _Cursor(f, size, "<")
        if size < 4 or cur.take(4, "the magic") != MAGIC:
            raise _Corrupt("it does not start with the GGUF magic")
        version = cur.unpack("I", "the version")
        if version & 0xFFFF == 0:  # written on a big-endian machine
            cur.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in VERSIONS:
            raise _Corrupt(f"its version is {version}; GGUF versions {VERSIONS} are read")
        n_tensors = cur.count("the tensor count", 8 + 4 + 4 + 8)
        n_keys = cur.count("the metadata count", 8 + 4)
        metadata: dict = {}
        for i in range(n_keys):
            key = cur.string(f"metadata key {i}")
            if not key or key in metadata:
                raise _Corrupt(f"metadata key {i} ({key!r}) is empty or repeated")
            kind = cur.unpack("I", f"the value type of {key}")
            metadata[key] = _value(cur, kind, key)
        tensors, names = [], set()
        for i in range(n_tensors):
            name = cur.string(f"tensor name {i}")
            if not name or len(name.encode()) >= MAX_NAME_BYTES or name in names:
                raise _Corrupt(f"tensor name {i} ({name!r}) is empty, repeated or longer than "
                               f"{MAX_NAME_BYTES - 1} bytes")
            n_dims = cur.unpack("I", f"the rank of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise _Corrupt(f"tensor {name} has rank {n_dims}; GGUF tensors have 1 to {MAX_DIMS} dimensions")
            dims = [cur.unpack("Q", f"a dimension of {name}") for _ in range(n_dims)]
            kind = cur.unpack("I", f"the type of {name}")
            offset = cur.unpack("Q", f"the offset of {name}")
            tensors.append((name, dims, kind, offset))
            names.add(name)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment is {alignment!r}, not a power of two")
    start = -(-cur.pos // alignment) * alignment
    data_bytes = size - start
    spans = []
    for name, dims, kind, offset in tensors:
        try:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name} has type {kind}, which this gguf package does not know") from None
        elements = 1
        for d in dims:
            elements *= d
        if dims[0] % block or elements >= 2**63:
            raise _Corrupt(f"tensor {name} has shape {dims}, which type {kind} (blocks of {block}) cannot hold")
        nbytes = elements // block * block_bytes
        if offset % alignment or offset + nbytes > data_bytes:
            raise _Corrupt(f"tensor {name} ({nbytes} bytes at offset {offset}) is misaligned or reaches past the "
                           f"{data_bytes}-byte data section")
        spans.append((offset, offset + nbytes, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise _Corrupt(f"tensors {a} and {b} overlap")
    return metadata
