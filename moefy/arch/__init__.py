"""Registry of architecture adapters keyed by `model_type`: add a family with one module + one line."""

from __future__ import annotations

from moefy.arch import gemma, gemma2, gemma3, gpt2, gpt_neox, granite, llama, mistral, olmo2, phi3, qwen2, qwen3
from moefy.arch.base import ArchAdapter
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


def adapter_for(config: dict, where: str = "the source") -> ArchAdapter:
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        raise BadInput(f"{where} has model_type {model_type!r}, which moefy does not support yet. Supported: "
                       f"{', '.join(sorted(ADAPTERS))}. MoE checkpoints cannot be converted again.")
    return ADAPTERS[model_type]
