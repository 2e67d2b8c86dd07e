"""Read and sanity-check a safetensors header without touching tensor data."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from moefy.errors import BadInput

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: Path) -> dict[str, dict]:
    """Return {name: {"dtype", "shape", "data_offsets"}}; a truncated or corrupt file is BadInput."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadInput(f"{path} is not a safetensors file (only {size} bytes). Re-download or re-save it.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise BadInput(f"{path} is truncated or corrupt: its header claims {header_len} bytes but the file "
                           f"has {size}. Re-download or re-save the checkpoint.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInput(f"{path} has a corrupt safetensors header ({exc}). Re-download or re-save it.") from None
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    for name, info in header.items():
        start, end = info["data_offsets"]
        if end > data_len:
            raise BadInput(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data section but only "
                           f"{data_len} bytes are present. Re-download or re-save the checkpoint.")
    return header
