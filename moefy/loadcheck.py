"""The last step of `convert`: load the output the way a user will and compare it with the source.

A written checkpoint can load differently from what moefy meant: a tensor renamed by a newer transformers,
a head the loading class expects under another name, a config field read another way. transformers then
initialises the weight afresh and the model runs, wrong. So before OUT is published, `check_as_loaded`
loads it — native outputs as `moefy.load` does, standard exports with the stock class and
`trust_remote_code` off — and fails (exit 1, OUT not published, the tensor named) when any weight is missing,
unexpected or of another shape; then it runs the source and the output on fixed random token sequences in
fp32. An exact pipeline must match within the fp32 tolerance; a lossy one gets its logit gap recorded.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from pathlib import Path

import torch

from moefy.errors import CheckFailed
from moefy.progress import log, transformers_log
from moefy.resources import available_memory

PROMPTS, PROMPT_TOKENS = 2, 32
MEMORY_SHARE = 0.4  # logits are compared when one fp32 copy of the model fits in this share of free memory


def tolerance(reference: torch.Tensor) -> float:
    """fp32 logits of an exact pipeline (sums regrouped, so rounded differently): 1e-5 per unit of logit scale."""
    return 1e-5 * max(1.0, float(reference.abs().max()))


def check_as_loaded(out_dir: Path, source_dir: Path, native: bool, exact: bool, vocab_size: int, seed: int) -> dict:
    """Load OUT as a user will, refuse missing/unexpected/re-initialised weights, compare logits with the source.

    Returns the record for moefy.json (`load_check`)."""
    started = time.perf_counter()
    fits = _fp32_bytes(out_dir) <= MEMORY_SHARE * available_memory()
    model, info = _load(out_dir, native, meta=not fits)
    how = "moefy.load (native modeling code)" if native else "AutoModelForCausalLM, trust_remote_code off"
    problems = [(kind, sorted(map(str, info.get(key) or ()))) for kind, key in (
        ("missing (would be initialised afresh)", "missing_keys"), ("unexpected", "unexpected_keys"),
        ("of another shape than the model expects", "mismatched_keys"))]
    problems = [(kind, names) for kind, names in problems if names]
    if problems or info.get("error_msgs"):
        detail = "; ".join(f"{len(names)} tensor(s) {kind}: {', '.join(names[:3])}" for kind, names in problems)
        raise CheckFailed(f"{out_dir.name} does not load as written ({how}, {type(model).__name__}): "
                          f"{detail or '; '.join(map(str, info['error_msgs']))}. OUT was not published. This is a "
                          f"moefy bug for this family or transformers version: please report it.")
    record = {"loaded_as": type(model).__name__, "loader": how, "weights": "all present, none unexpected",
              "exact_expected": exact}
    if not fits:
        del model
        log("load check: keys only (one fp32 copy of the model does not fit the memory share for logits)")
        return {**record, "logits": "not compared (model too large for the check's memory share)",
                "seconds": round(time.perf_counter() - started, 3)}
    ids = torch.randint(0, vocab_size, (PROMPTS, PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed))
    written = _logits(model, ids)
    del model
    gc.collect()
    source, _ = _load(source_dir, native=False, meta=False)
    reference = _logits(source, ids)
    del source
    diff = (written - reference).abs()
    record.update(prompts=f"{PROMPTS} random × {PROMPT_TOKENS} tokens (seed {seed})",
                  max_abs_logit_diff=float(diff.max()), mean_abs_logit_diff=float(diff.mean()),
                  tolerance=tolerance(reference), seconds=round(time.perf_counter() - started, 3))
    if exact and record["max_abs_logit_diff"] > record["tolerance"]:
        raise CheckFailed(f"the written model's fp32 logits differ from the source's by up to "
                          f"{record['max_abs_logit_diff']:.3g} (tolerance {record['tolerance']:.3g}) though every "
                          f"step of this recipe is exact ({how}). OUT was not published. This is a moefy bug: "
                          f"please report it.")
    log(f"load check: loads as {record['loaded_as']}, max |Δlogit| vs source {record['max_abs_logit_diff']:.3g}"
        f"{' (exact)' if exact else ''}")
    return record


def _load(path: Path, native: bool, meta: bool):
    """(model, loading info); a load transformers gives up on is CheckFailed quoting its report."""
    from transformers import AutoModelForCausalLM

    from moefy.moe.modeling_moefy import MoefyForCausalLM

    cls = MoefyForCausalLM if native else AutoModelForCausalLM
    kwargs = {"device_map": "meta"} if meta else {}
    with transformers_log() as report, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model, info = cls.from_pretrained(path, dtype=torch.float32, trust_remote_code=False,
                                              output_loading_info=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - transformers refuses a load in many ways; each is the check failing
            lines = [" ".join(line.split()) for line in report if "|" in line and "Status" not in line]
            raise CheckFailed(f"{path.name} does not load as written ({cls.__name__}): {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]} Report: {'; '.join(lines[:3]) or 'none'}. "
                              f"OUT was not published. This is a moefy bug for this family or transformers "
                              f"version: please report it.") from None
    return model.eval(), info


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _fp32_bytes(out_dir: Path) -> int:
    """4 bytes per stored parameter (headers only)."""
    from moefy.io.checkpoint import Checkpoint

    ckpt = Checkpoint(out_dir)
    return 4 * sum(math.prod(ckpt.shape(name)) for name in ckpt.tensor_names)
