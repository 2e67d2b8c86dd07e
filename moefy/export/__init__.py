"""Registry of export formats and the `--format auto` choice."""

from __future__ import annotations

from dataclasses import dataclass

from moefy.errors import BadInput
from moefy.export.base import ExportFormat
from moefy.export.granitemoe import GraniteMoeFormat, GraniteMoeSharedFormat
from moefy.export.mixtral import MixtralFormat
from moefy.export.native import NativeFormat
from moefy.export.qwen2_moe import Qwen2MoeFormat
from moefy.export.qwen3_moe import Qwen3MoeFormat
from moefy.plan import LayerPlan, SourceInfo

# in `--format auto`'s order of preference: formats that run in more engines first (GraniteMoeShared before
# Qwen2-MoE, whose export llama.cpp does not load, and whose gated shared expert and norm_topk_prob it does
# not reproduce: each format's `engines`)
FORMATS: dict[str, ExportFormat] = {f.name: f for f in (MixtralFormat(), GraniteMoeFormat(), GraniteMoeSharedFormat(),
                                                         Qwen2MoeFormat(), Qwen3MoeFormat(), NativeFormat())}


@dataclass(frozen=True)
class FormatChoice:
    format: ExportFormat
    reason: str
    exact: bool = True


def choose_format(name: str, source: SourceInfo, plan: LayerPlan, allow_inexact: bool) -> FormatChoice:
    """`auto`: the first standard format (registry order) for the family that holds the model exactly, else
    native."""
    if name == "auto":
        reasons = []
        for fmt in FORMATS.values():
            if source.adapter.model_type not in fmt.families:
                continue
            reason = fmt.unsupported(source, plan) or fmt.inexact(plan)
            if reason is None:
                skipped = "".join(f" (skipped: {r})" for r in reasons)
                return FormatChoice(fmt, f"exact standard format for {source.adapter.model_type}{skipped}")
            reasons.append(reason)
        why = "; ".join(reasons) if reasons else f"no standard MoE format for {source.adapter.model_type}"
        return FormatChoice(FORMATS["native"], f"no exact standard format ({why})")
    if name not in FORMATS:
        raise BadInput(f"--format {name!r} is unknown. Formats: auto, {', '.join(FORMATS)}.")
    fmt = FORMATS[name]
    reason = fmt.unsupported(source, plan)
    if reason:
        raise BadInput(f"--format {name} cannot hold this model: {reason}. Use --format auto or native.")
    reason = fmt.inexact(plan)
    if reason and not allow_inexact:
        raise BadInput(f"--format {name} would change the model's function: {reason}. Pass --allow-inexact to "
                       f"write it anyway (the measured gap is recorded), or use --format native.")
    return FormatChoice(fmt, reason or "exact, as requested", exact=reason is None)
