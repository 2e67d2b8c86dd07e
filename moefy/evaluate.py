"""`moefy eval`: perplexity over non-overlapping windows of one token stream (DESIGN.md protocol)."""

from __future__ import annotations

import math
import time

import torch

from moefy.arch import check_window
from moefy.errors import BadInput, CheckFailed
from moefy.io.data import load_text, token_windows
from moefy.io.checkpoint import open_source
from moefy.loading import checked_backend, load_model, load_tokenizer
from moefy.progress import log, progress
from moefy.summary import summarize


def _check_ids(windows: torch.Tensor, ckpt, name: str) -> None:
    vocab = ckpt.config.get("vocab_size")
    if isinstance(vocab, int) and int(windows.max()) >= vocab:
        raise BadInput(f"the tokenizer of {name} produces token id {int(windows.max())}, but its model has only "
                       f"{vocab} embeddings (vocab_size in config.json). Its tokenizer files do not belong to it.")


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int, label: str = "eval") -> dict:
    nll, count, elapsed = 0.0, 0, 0.0
    device = next(model.parameters()).device
    with progress(f"{label}: windows", windows.shape[0]) as advance:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(device)
            t0 = time.perf_counter()
            logits = model(input_ids=batch).logits
            elapsed += time.perf_counter() - t0
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:],
                                                       reduction="none").sum(-1)
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                raise CheckFailed(f"{label}: the loss of window {start + int(bad[0])} is not a finite number "
                                  f"({float(losses[bad[0]])}): the model computes NaN or Inf on it. Check its "
                                  f"weights (`moefy validate`) and dtype.")
            nll += float(losses.sum())
            count += batch[:, 1:].numel()
            advance(batch.shape[0])
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": int(windows.numel()),
            "tokens_per_s": windows.numel() / elapsed if elapsed else None}


def evaluate(model_spec: str, *, baseline: str | None, dataset: str, seq_len: int = 512,
             max_windows: int | None = None, batch_size: int = 4, backend: str = "auto") -> dict:
    if seq_len < 2:
        raise BadInput(f"--seq-len {seq_len} is too small; use at least 2 tokens per window.")
    if batch_size < 1:
        raise BadInput(f"--batch-size {batch_size} must be at least 1.")
    backend = checked_backend(backend)
    data = load_text(dataset)
    report = {"model": str(model_spec), "baseline": baseline, "dataset": data.name, "dataset_sha256": data.sha256,
              "seq_len": seq_len, "backend": backend}
    ckpt = open_source(model_spec)  # opened once for tokenizer, weights and parameter accounting
    check_window(ckpt.config, seq_len, "--seq-len", f"MODEL {ckpt.origin}")
    windows = token_windows(load_tokenizer(ckpt), data, seq_len, max_windows)
    _check_ids(windows, ckpt, model_spec)
    log(f"evaluating {model_spec} on {windows.shape[0]} windows × {seq_len} tokens")
    result = perplexity(load_model(ckpt, backend=backend), windows, batch_size, label="model")
    summary = summarize(ckpt)
    report.update({"windows": windows.shape[0], "tokens": result["tokens"], "ppl": result["ppl"],
                   "tokens_per_s": result["tokens_per_s"], "params_total": summary["params_total"],
                   "params_active_per_token": summary["params_active_per_token"],
                   "mlp_active_fraction": summary["mlp_active_fraction"], "format": summary["format"],
                   "baseline_ppl": None, "delta_pct": None, "baseline_tokens_per_s": None, "tokenizers_agree": None})
    if baseline is not None:
        base_ckpt = open_source(baseline)
        check_window(base_ckpt.config, seq_len, "--seq-len", f"--baseline {base_ckpt.origin}")
        vocab, base_vocab = ckpt.config.get("vocab_size"), base_ckpt.config.get("vocab_size")
        if vocab != base_vocab:
            raise BadInput(f"--baseline {baseline} has a vocabulary of {base_vocab} tokens and {model_spec} one of "
                           f"{vocab}: their perplexities are not comparable. Pass the source the model was "
                           f"converted from.")
        base_windows = token_windows(load_tokenizer(base_ckpt), data, seq_len, max_windows)
        report["tokenizers_agree"] = torch.equal(base_windows, windows)
        if not report["tokenizers_agree"]:  # e.g. transformers picks a family tokenizer class by model_type
            log(f"the tokenizers of {model_spec} and {baseline} split the text differently; both are scored on "
                f"{model_spec}'s tokens so the perplexities compare")
        base = perplexity(load_model(base_ckpt), windows, batch_size, label="baseline")
        report.update({"baseline_ppl": base["ppl"], "baseline_tokens_per_s": base["tokens_per_s"],
                       "delta_pct": 100.0 * (result["ppl"] / base["ppl"] - 1.0)})
    return report
