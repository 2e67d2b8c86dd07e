"""Calibration: token samples from a dataset and a sequential, layer-by-layer pass over the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moefy.errors import BadInput


@dataclass(frozen=True)
class Calibration:
    """Calibration tokens [N, L] and how to run them (see layerwise.LayerwiseRunner)."""

    tokens: torch.Tensor
    sequential: bool
    batch_size: int
    device: str
    record: dict  # provenance for moefy.json

    def runner(self, ckpt, adapter, samples: int | None = None):
        """A layer-by-layer runner over all samples, or over the first `samples` (spread evenly anyway)."""
        from moefy.calib.layerwise import LayerwiseRunner

        tokens = self.tokens if samples is None else self.tokens[: max(1, samples)]
        return LayerwiseRunner(ckpt, adapter, list(tokens.split(self.batch_size)), device=self.device)


def load_calibration(ckpt, spec: str, samples: int, seq_len: int, *, mode: str = "sequential", batch_size: int = 8,
                     device: str = "cpu") -> Calibration:
    """`samples` windows of `seq_len` tokens spread evenly over DATA, tokenized with the source's tokenizer."""
    from moefy.io.data import load_text, token_windows
    from moefy.loading import load_tokenizer

    data = load_text(spec)
    windows = token_windows(load_tokenizer(ckpt), data, seq_len, None)
    if windows.shape[0] < samples:
        raise BadInput(f"calibration data {data.name} has {windows.shape[0]} windows of {seq_len} tokens, fewer "
                       f"than the {samples} samples the recipe asks for (calibration.samples × calibration.seq_len). "
                       f"Use a longer text or lower calibration.samples / calibration.seq_len.")
    pick = torch.div(torch.arange(samples) * windows.shape[0], samples, rounding_mode="floor")
    record = {"dataset": data.name, "sha256": data.sha256, "samples": samples, "seq_len": seq_len,
              "tokens": samples * seq_len, "mode": mode}
    return Calibration(windows[pick], mode == "sequential", batch_size, device, record)


def text_runner(ckpt, adapter, texts: list[str], device: str = "cpu"):
    """A layer-by-layer runner over short texts (e.g. prompts), one sequence each."""
    from moefy.calib.layerwise import LayerwiseRunner
    from moefy.loading import load_tokenizer

    tokenizer = load_tokenizer(ckpt)
    batches = [torch.tensor([tokenizer(text)["input_ids"]]) for text in texts]
    return LayerwiseRunner(ckpt, adapter, batches, device=device)
