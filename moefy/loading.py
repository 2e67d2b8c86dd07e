"""Load any model moefy reads or writes (dense source, standard MoE export, native) for inference."""

from __future__ import annotations

import warnings

import torch

from moefy.arch.base import ACTIVATION_NAMES
from moefy.errors import BadInput
from moefy.io.checkpoint import open_source
from moefy.io.layout import config_error
from moefy.moe.modeling_moefy import MoeBlock, MoefyConfig, MoefyForCausalLM
from moefy_kernels import BACKENDS, decode_layout, resolve_backend
from moefy_kernels.cpu_decode import rows_layout

_registered = False


def _standard_formats() -> dict:
    """{transformers MoE block class name: the standard export format it belongs to}."""
    from moefy.export import FORMATS

    return {fmt.block_class: fmt for fmt in FORMATS.values() if fmt.block_class}


def format_of(block):
    """The standard export format a loaded transformers MoE block belongs to (None for anything else)."""
    return _standard_formats().get(type(block).__name__)


def moe_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every MoE block of a loaded model: native MoeBlocks and standard transformers blocks."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, MoeBlock) or format_of(module) is not None]


def _register_with_transformers() -> None:
    global _registered
    if not _registered:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        AutoConfig.register(MoefyConfig.model_type, MoefyConfig, exist_ok=True)
        AutoModelForCausalLM.register(MoefyConfig, MoefyForCausalLM, exist_ok=True)
        for name in BACKENDS:
            ALL_EXPERTS_FUNCTIONS.register(experts_implementation(name), _hf_experts(name))
        _registered = True


def checked_backend(backend: str, device: str = "cpu") -> str:
    """The concrete moefy backend `backend` means on `device`; bad names are the user's input error."""
    try:
        return resolve_backend(backend, device)
    except ValueError as exc:
        raise BadInput(f"--backend: {exc}") from None


def experts_implementation(backend: str) -> str:
    """The name under which a moefy backend serves transformers' `experts_implementation` hook."""
    return f"moefy_{backend}"


def runs_on_moefy(model) -> bool:
    """Whether every experts module has the layout moefy's backends compute: [gate; up] rows, no bias."""
    experts = [m for m in model.modules() if hasattr(m, "is_concatenated") and hasattr(m, "gate_up_proj")]
    return bool(experts) and all(m.is_concatenated and not m.is_transposed and not m.has_bias
                                 and not getattr(m, "has_post_expert_norm", False) for m in experts)


def _hf_experts(backend: str):
    """transformers' experts forward (routing already done by the model's own router) on a moefy backend."""
    def forward(self, hidden_states, top_k_index, top_k_weights):
        activation = ACTIVATION_NAMES.get(self.config.hidden_act, self.config.hidden_act)
        out = BACKENDS[backend].experts(hidden_states, top_k_weights, top_k_index, self.gate_up_proj,
                                        self.down_proj, activation, self.has_gate)
        return out.to(hidden_states.dtype)

    return forward


def load_model(spec, *, dtype=None, backend: str = "auto", device: str = "cpu"):
    """`spec` is anything `convert` accepts as SOURCE, a moefy output directory, or an open Checkpoint.

    MoE blocks run on `backend`: native blocks directly, standard exports (Mixtral, Qwen-MoE) through
    transformers' experts-implementation hook.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # moefy prints its own progress
    ckpt = open_source(spec)
    dtype = dtype or torch.float32
    kwargs = {"dtype": dtype}
    backend = checked_backend(backend, device)
    _register_with_transformers()
    if ckpt.config.get("model_type") == MoefyConfig.model_type:
        from moefy.export import FORMATS

        FORMATS["native"].block_specs(ckpt.config)  # an edited spec is the user's to fix, named
        cls = MoefyForCausalLM
    else:
        cls = AutoModelForCausalLM
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(ckpt.path, **kwargs)
    except OSError as exc:
        raise BadInput(f"{ckpt.path} could not be loaded as a causal LM ({exc}).") from None
    except Exception as exc:  # noqa: BLE001 - a checkpoint whose layout was checked: what is left is its config
        raise BadInput(f"{ckpt.path}: {config_error(ckpt.config, exc)}") from None
    model.to(device).eval()
    if isinstance(model, MoefyForCausalLM):
        model.set_backend(backend)
    elif model._can_set_experts_implementation() and runs_on_moefy(model):
        model.set_experts_implementation(experts_implementation(backend))
    else:
        return model
    if device == "cpu":
        _store_for_decode(model, backend)
    return model


def _store_for_decode(model, backend: str) -> None:
    """Re-store every MoE block's routed down weights in `decode_layout` (same values and shapes): [E, I, H] in
    memory where the fused CPU kernel is built (it reads each expert's down weights as rows; a gathered copy of
    a selected expert is one block), else [H, E, I] for blocks that select every expert (the dense down matrix,
    one matmul). On the torch backend a native shared expert is stored as rows too ([I_s, H] in memory: the
    kernel reads it in the routed experts' call), and a standard format may install its own faster decode
    (`ExportFormat.fast_decode`). One block at a time."""
    for name, block in moe_blocks(model):
        if isinstance(block, MoeBlock):
            if block.experts.uniform:  # unequal widths: no stacked view, the dense path only
                top_k = block.top_k if block.router is not None else len(block.experts.widths)
                w2 = decode_layout(block.experts.stacked()[1], top_k)
                block.experts.down_proj.data = w2.permute(1, 0, 2).reshape(w2.shape[1], -1)  # [H, Σ I], a view
            if block.shared is not None and backend == "torch":
                block.shared.down_proj.data = rows_layout(block.shared.down_proj.data)
        else:
            w2 = block.experts.down_proj
            w2.data = decode_layout(w2.data, model.config.num_experts_per_tok)
            if backend == "torch":
                format_of(block).fast_decode(block, model.config, model.get_submodule(name.rpartition(".")[0]))


def load_tokenizer(spec):
    from transformers import AutoTokenizer

    ckpt = open_source(spec)
    _register_with_transformers()  # AutoTokenizer reads config.json: the native model type must be known
    try:
        return AutoTokenizer.from_pretrained(ckpt.path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise BadInput(f"{ckpt.path} has no usable tokenizer ({exc}); copy the source's tokenizer files "
                       f"into it.") from None
    except Exception as exc:  # noqa: BLE001 - AutoTokenizer reads config.json: a field transformers refuses
        raise BadInput(f"{ckpt.path}: {config_error(ckpt.config, exc)}") from None
