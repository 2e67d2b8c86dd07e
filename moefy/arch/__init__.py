"""Registry of architecture adapters keyed by `model_type`: add a family with one module + one line."""

from __future__ import annotations

from moefy.arch import gemma, gemma2, gemma3, gpt2, gpt_neox, granite, llama, mistral, olmo2, phi3, qwen2, qwen3
from moefy.arch.base import ACTIVATION_NAMES, ArchAdapter
from moefy.errors import BadInput

ADAPTERS: dict[str, ArchAdapter] = {
    "gemma": gemma.ADAPTER,
    "gemma2": gemma2.ADAPTER,
    "gemma3_text": gemma3.ADAPTER,
    "gpt2": gpt2.ADAPTER,
    "gpt_neox": gpt_neox.ADAPTER,
    "granite": granite.ADAPTER,
    "llama": llama.ADAPTER,
    "olmo2": olmo2.ADAPTER,
    "phi3": phi3.ADAPTER,
    "mistral": mistral.ADAPTER,
    "qwen2": qwen2.ADAPTER,
    "qwen3": qwen3.ADAPTER,
}


SIZE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")


def check_config(config: dict, where: str) -> None:
    """The config fields moefy computes with, for any checkpoint it reads (dense, or an output whose
    `base_model_type` names the family): positive integer sizes, a supported activation (BadInput naming the key)."""
    for key in ("model_type", "base_model_type"):
        if key in config and not isinstance(config[key], str):
            raise BadInput(f"{where}: `{key}` is {config[key]!r}; it must be a model type name such as \"llama\". "
                           f"Fix config.json.")
    adapter = ADAPTERS.get(config.get("base_model_type") or config.get("model_type"))
    names = dict(adapter.config_keys) if adapter else {}
    for key in SIZE_KEYS:
        name = names.get(key, key)
        value = config.get(name)
        if name in config and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BadInput(f"{where}: `{name}` is {value!r}; it must be a positive integer. Fix config.json (or "
                           f"re-download the checkpoint).")
    if adapter is not None:
        try:
            adapter.activation(config)
        except ValueError as exc:
            raise BadInput(f"{where}: `{adapter.activation_key}`: {exc}; moefy supports "
                           f"{', '.join(sorted(ACTIVATION_NAMES))}. Fix config.json.") from None


def check_window(config: dict, seq_len: int, what: str, where: str) -> None:
    """BadInput when windows of `seq_len` tokens (`what` names the setting) are longer than the model at `where`
    takes: its position table (max_position_embeddings) would be indexed past its end, or extrapolated silently."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(limit, int) and not isinstance(limit, bool) and seq_len > limit:
        raise BadInput(f"{what} {seq_len} is longer than {where} can take ({limit} positions, max_position_embeddings "
                       f"in its config.json). Set {what} to {limit} or less.")


def adapter_for(config: dict, where: str = "the source") -> ArchAdapter:
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        raise BadInput(f"{where} has model_type {model_type!r}, which moefy does not support yet. Supported: "
                       f"{', '.join(sorted(ADAPTERS))}. MoE checkpoints cannot be converted again.")
    return ADAPTERS[model_type]
