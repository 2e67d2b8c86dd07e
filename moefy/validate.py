"""`moefy validate`: every MoE block of a converted model, and the whole model, against the plain reference.

Block by block: the inputs each MoE block sees on random prompts are captured, then the block is run
by the implementations under test and by `moefy_kernels`' reference loop. Native blocks: the chosen
moefy backend. Standard formats: transformers' own experts, transformers' block with its experts on the
chosen backend (the hook `moefy eval` uses), the format's own decode where it installed one, and the moefy
backend's routing and experts on its weights. Each runs the whole batch, then 1 and 4 of its tokens: the
decode paths (the fused kernel, the gathered experts) only run on a few tokens.
End to end: the model as `moefy eval` runs it against the same model with every MoE block swapped for
the reference.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from moefy.arch.base import ACTIVATION_NAMES
from moefy.errors import BadInput
from moefy.loading import checked_backend, experts_implementation, format_of, load_model, moe_blocks
from moefy.moe.modeling_moefy import MoeBlock
from moefy_kernels import moe_forward

# fp32, one block: |Δ| ≤ atol + rtol · max |ref| of the token's row. Rounding in a dot product scales with
# its terms, not its result, and real models carry a few huge hidden dimensions (|x| ~ 1e4 in SmolLM2),
# so an element-wise rtol would fail near-zero outputs of those rows on summation order alone.
BLOCK_ATOL, BLOCK_RTOL = 1e-4, 1e-4
LOGIT_ATOL = 1e-3  # fp32 noise accumulates over depth (see docs/BENCHMARKS.md)
DECODE_TOKENS = 4  # besides the whole batch, each block is checked on 1 and on this many tokens (decode paths)


def _standard_forward(block, activation: str, backend: str):
    """A transformers MoE block computed by moefy_kernels from its own weights."""
    router = getattr(block, format_of(block).router_attr)
    combine = "renormalize" if getattr(router, "norm_topk_prob", True) else "prob"

    def run(hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        y = moe_forward(x, F.linear(x, router.weight), block.experts.gate_up_proj, block.experts.down_proj,
                        router.top_k, combine=combine, activation=activation, backend=backend)
        if getattr(block, "shared_expert", None) is not None:
            y = y + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        return y.reshape(hidden.shape)

    return run


def _transformers_experts(model, block):
    """The block's own forward with transformers' default experts implementation instead of the moefy hook."""
    def run(x):
        chosen = model.config._experts_implementation
        model.set_experts_implementation("grouped_mm")
        try:
            return type(block).forward(block, x)
        finally:
            model.set_experts_implementation(chosen)

    return run


def _blocks(model, backend: str) -> list[tuple[str, torch.nn.Module, dict]]:
    """(name, module, {implementation: fn}) with a "reference" entry for every MoE block."""
    activation = ACTIVATION_NAMES.get(getattr(model.config, "hidden_act", "silu"), "silu")
    found = []
    for name, module in moe_blocks(model):
        if isinstance(module, MoeBlock):
            def run(x, module=module, chosen=backend):
                with _backend(module, chosen):  # the class forward: module.forward may be swapped below
                    return MoeBlock.forward(module, x)
            found.append((name, module, {f"moefy:{backend}": run,
                                         "reference": lambda x, run=run: run(x, chosen="reference")}))
        else:
            fns = {"transformers": _transformers_experts(model, module),
                   f"transformers+{experts_implementation(backend)}":
                       lambda x, module=module: type(module).forward(module, x),
                   f"moefy:{backend}": _standard_forward(module, activation, backend),
                   "reference": _standard_forward(module, activation, "reference")}
            if "forward" in vars(module):  # the format's own decode (`ExportFormat.fast_decode`)
                fns["moefy:fused-decode"] = module.forward
            found.append((name, module, fns))
    return found


@contextmanager
def _backend(block: MoeBlock, backend: str):
    before, block.backend = block.backend, backend
    try:
        yield
    finally:
        block.backend = before


@contextmanager
def _reference_everywhere(blocks):
    """Swap every MoE block's forward for its reference implementation."""
    saved = []
    for _, module, fns in blocks:
        saved.append((module, module.forward))
        module.forward = fns["reference"]
    try:
        yield
    finally:
        for module, forward in saved:
            module.forward = forward


def _diff(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |Δ|, max |Δ| relative to the output's scale max |ref|): element-wise ratios explode near 0."""
    max_abs = float((got.float() - ref.float()).abs().max())
    return max_abs, max_abs / max(float(ref.float().abs().max()), 1e-12)


def _within_tolerance(out: torch.Tensor, ref: torch.Tensor) -> bool:
    ref = ref.float().reshape(-1, ref.shape[-1])
    row_scale = ref.abs().amax(dim=-1, keepdim=True)
    return bool(((out.float().reshape(ref.shape) - ref).abs() <= BLOCK_ATOL + BLOCK_RTOL * row_scale).all())


@torch.inference_mode()
def validate(model_spec: str, *, source: str | None = None, backend: str = "auto", device: str = "cpu",
             batch: int = 2, seq_len: int = 32, seed: int = 0) -> dict:
    backend = checked_backend(backend, device)
    model = load_model(model_spec, backend=backend, device=device)
    blocks = _blocks(model, backend)
    if not blocks:
        raise BadInput(f"{model_spec} has no MoE blocks to validate (a dense model?). Pass a moefy output.")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
             for name, module, _ in blocks]
    logits = model(input_ids=ids).logits
    for hook in hooks:
        hook.remove()
    rows, passed = [], True
    for name, _, fns in blocks:
        captured = inputs[name]
        flat = captured.reshape(-1, captured.shape[-1])
        # the whole batch (prefill paths), then 1 and 4 of its tokens (decode paths: fused kernel, gathered)
        for hidden in (captured, flat[:1][None], flat[:DECODE_TOKENS][None]):
            ref = fns["reference"](hidden)
            for implementation, fn in fns.items():
                if implementation == "reference":
                    continue
                out = fn(hidden)
                max_abs, max_rel = _diff(out, ref)
                ok = _within_tolerance(out, ref)
                passed &= ok
                rows.append({"block": name, "implementation": implementation, "tokens": hidden.shape[:-1].numel(),
                             "max_abs_diff": max_abs, "max_rel_diff": max_rel, "passed": ok})
    with _reference_everywhere(blocks):
        reference_logits = model(input_ids=ids).logits
    e2e_abs, e2e_rel = _diff(logits, reference_logits)
    e2e_ok = e2e_abs <= LOGIT_ATOL
    passed &= e2e_ok
    report = {"backend": backend, "device": device, "max_abs_diff": max(r["max_abs_diff"] for r in rows),
              "max_rel_diff": max(r["max_rel_diff"] for r in rows), "tokens": int(ids.numel()), "passed": passed,
              "tolerance": {"block_atol": BLOCK_ATOL, "block_rtol": BLOCK_RTOL, "logit_atol": LOGIT_ATOL},
              "end_to_end": {"max_abs_logit_diff": e2e_abs, "max_rel_logit_diff": e2e_rel,
                             "passed": e2e_ok}, "blocks": rows,
              "source": None}
    if source is not None:
        source_logits = load_model(source, device=device)(input_ids=ids).logits
        report["source"] = {"model": source, "max_abs_logit_diff": _diff(logits, source_logits)[0],
                            "note": "informational: transforms other than identities change the function"}
    return report
