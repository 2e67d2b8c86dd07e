"""Does a checkpoint hold the tensors its config describes?  Checked up front, from headers only.

A missing tensor or a wrong shape would otherwise surface deep inside a transform, or not at all
(a tensor the output silently lacks); the model's own class, built on the meta device, says what
the checkpoint must contain.
"""

from __future__ import annotations

import re
import warnings

import torch

from moefy.errors import BadInput
from moefy.io.checkpoint import Checkpoint


def meta_model(config: dict, attn_implementation: str | None = None):
    """The causal-LM class of `config`, on the meta device (no memory, no init), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            hf_config = AutoConfig.for_model(**fields)
            if attn_implementation is not None:
                hf_config._attn_implementation = attn_implementation
            hf_config.use_cache = False
            return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001 - from the config alone: every refusal is the config's (strict fields)
        raise BadInput(config_error(config, exc)) from None


def config_error(config: dict, exc: Exception) -> str:
    """One paragraph for a config transformers refuses (strict field validation, a value its code cannot use),
    naming the config key the error names."""
    import transformers

    text = " ".join(str(exc).split())
    named = [key for key in config if re.search(rf"\b{re.escape(key)}\b", text)]
    where = f"`{named[0]}`" if named else "a field"
    return (f"config.json ({config.get('model_type')}): {where} is not what transformers {transformers.__version__} "
            f"accepts ({type(exc).__name__}: {text[:300]}). Fix that field of config.json.")


def check_layout(ckpt: Checkpoint, tied_head: str) -> None:
    """BadInput naming the first missing tensor or wrong shape (the tied head may be absent)."""
    model = meta_model(ckpt.config)
    renames, pure = _renamings(model)
    in_model = {_rename(name, renames): name for name in ckpt.tensor_names}  # model name → checkpoint name
    expected = {in_model.get(name, name): tuple(t.shape) for name, t in model.state_dict().items()}
    if ckpt.config.get("tie_word_embeddings", False):
        for name in (tied_head, _rename(tied_head, renames)):
            expected.pop(name, None)
    missing = sorted(n for n in expected if not ckpt.has(n))
    if missing and pure:  # with merging/splitting conversions, names alone do not say what is missing
        raise BadInput(f"{ckpt.path} lacks tensor {missing[0]!r} (and {len(missing) - 1} more) that its config.json "
                       f"({ckpt.config.get('model_type')}) calls for. The checkpoint is incomplete, or its index "
                       f"leaves tensors out; re-download it.")
    for name, shape in expected.items():
        if not ckpt.has(name):
            continue
        found = ckpt.shape(name)
        if found != shape:
            raise BadInput(f"tensor {name!r} in {ckpt.location(name)} has shape {list(found)} but config.json "
                           f"implies {list(shape)}. The weights and the config disagree; re-download the checkpoint "
                           f"or fix config.json.")


def _renamings(model) -> tuple[list[tuple[re.Pattern, str]], bool]:
    """transformers' checkpoint → model renames for a model class (e.g. GPT-NeoX `embed_out` → `lm_head`), and
    whether renames are all its conversions are."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    rules = get_model_conversion_mapping(model)
    renames = []
    for rule in rules:
        if type(rule) is WeightRenaming:
            sources, targets = ([p] if isinstance(p, str) else list(p) for p in (rule.source_patterns,
                                                                                rule.target_patterns))
            renames += [(re.compile(s), t) for s, t in zip(sources, targets * len(sources))]
    return renames, all(type(rule) is WeightRenaming for rule in rules)


def _rename(name: str, renames: list[tuple[re.Pattern, str]]) -> str:
    for pattern, target in renames:
        name = pattern.sub(target, name)
    return name
