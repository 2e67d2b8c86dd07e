"""Text datasets for evaluation and calibration: .txt/.raw, .jsonl with `text`, or hf:NAME[:CONFIG[:SPLIT]]."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moefy.errors import BadInput


@dataclass(frozen=True)
class TextData:
    name: str
    text: str
    sha256: str  # of the file's bytes (of the joined text for hf: datasets)


def load_text(spec: str) -> TextData:
    if spec.startswith("hf:"):
        return _load_hf(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BadInput(f"dataset {spec} does not exist (or is not a file). Pass a .txt/.raw file, a .jsonl file "
                       f"with a `text` field, or hf:NAME[:CONFIG[:SPLIT]].")
    data = path.read_bytes()
    try:  # universal newlines, as text-mode reading gives (WikiText-2 raw ships CRLF)
        raw = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError:
        raise BadInput(f"dataset {path} is not UTF-8 text. Convert it to UTF-8.") from None
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadInput(f"dataset {path} line {number} is not a JSON object with a `text` field.") from None
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise BadInput(f"dataset {path} is empty. Pass a file with text in it.")
    return TextData(str(path), raw, hashlib.sha256(data).hexdigest())


def _load_hf(spec: str) -> TextData:
    parts = spec[3:].split(":")
    name, config, split = parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "test"
    try:
        import datasets
    except ImportError:
        raise BadInput(f"dataset {spec} needs the `datasets` package: `pip install datasets`.") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline hub, unknown name, bad split
        raise BadInput(f"dataset {spec} could not be loaded ({type(exc).__name__}: {exc}).") from None
    if "text" not in ds.column_names:
        raise BadInput(f"dataset {spec} has no `text` column (columns: {', '.join(ds.column_names)}).")
    text = "\n\n".join(ds["text"])
    return TextData(spec, text, hashlib.sha256(text.encode()).hexdigest())


def token_windows(tokenizer, data: TextData, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """The first `max_windows` (None: all) non-overlapping windows of `seq_len` tokens of the text tokenized
    as one stream, without special tokens [N, seq_len]: the evaluation protocol and calibration alike."""
    ids = tokenizer(data.text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    available = len(ids) // seq_len
    if available == 0:
        raise BadInput(f"dataset {data.name} has {len(ids)} tokens, fewer than one window of {seq_len}. Use a "
                       f"longer text or a smaller --seq-len.")
    windows = available if max_windows is None else min(available, max_windows)
    return torch.tensor(ids[: windows * seq_len]).view(windows, seq_len)
