"""Load any model moefy reads or writes (dense source, standard MoE export, native) for inference."""

from __future__ import annotations

import warnings

import torch

from moefy.errors import BadInput
from moefy.io.checkpoint import open_source
from moefy.moe.modeling_moefy import MoefyConfig, MoefyForCausalLM

_registered = False


def _register_native() -> None:
    global _registered
    if not _registered:
        from transformers import AutoConfig, AutoModelForCausalLM

        AutoConfig.register(MoefyConfig.model_type, MoefyConfig, exist_ok=True)
        AutoModelForCausalLM.register(MoefyConfig, MoefyForCausalLM, exist_ok=True)
        _registered = True


def load_model(spec, *, dtype=None, backend: str = "auto", device: str = "cpu"):
    """`spec` is anything `convert` accepts as SOURCE, a moefy output directory, or an open Checkpoint."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # moefy prints its own progress
    ckpt = open_source(spec)
    dtype = dtype or torch.float32
    kwargs = {"dtype": dtype}
    if ckpt.config.get("model_type") == MoefyConfig.model_type:
        _register_native()
        cls = MoefyForCausalLM
    else:
        cls = AutoModelForCausalLM
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(ckpt.path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise BadInput(f"{ckpt.path} could not be loaded as a causal LM ({exc}).") from None
    model.to(device).eval()
    if isinstance(model, MoefyForCausalLM):
        model.set_backend(backend)
    return model


def load_tokenizer(spec):
    from transformers import AutoTokenizer

    ckpt = open_source(spec)
    _register_native()  # AutoTokenizer reads config.json; the native model type must be known, not remote code
    try:
        return AutoTokenizer.from_pretrained(ckpt.path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise BadInput(f"{ckpt.path} has no usable tokenizer ({exc}); copy the source's tokenizer files "
                       f"into it.") from None
