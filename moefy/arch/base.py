"""What moefy needs to know about a dense decoder family: where each layer's MLP lives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# transformers `hidden_act` names → moefy_kernels activation names
ACTIVATION_NAMES = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


@dataclass(frozen=True)
class ArchAdapter:
    """State-dict layout of one model family's MLPs and the standard MoE formats that can hold it.

    `exports` lists standard MoE formats in preference order; each still checks the concrete
    config (biases, head_dim, ...) before it is chosen.
    """

    model_type: str
    exports: tuple[str, ...] = ()
    layers_prefix: str = "model.layers"
    mlp_attr: str = "mlp"
    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None  # one fused [gate; up] projection (Phi-3) instead of `gate` and `up`
    activation_key: str = "hidden_act"
    activation_aliases: tuple[tuple[str, str], ...] = ()  # config value → what the family's code really runs
    lm_head: str = "lm_head.weight"  # not written when the config ties it to the embeddings
    # what the decoder layer does to the MLP's output before adding it to the residual (a post-FFN norm, a
    # residual multiplier), as (layer module, output) → output; it must map 0 to 0. None: nothing.
    mlp_output: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.gate_up is not None

    def num_layers(self, config: dict) -> int:
        return int(config["num_hidden_layers"])

    def mlp_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}.{layer}.{self.mlp_attr}"

    def mlp_weight_names(self, layer: int) -> dict[str, str]:
        """{"gate"?, "up", "down"} (or {"gate_up", "down"}) → state-dict names of that layer's MLP weights."""
        prefix = self.mlp_prefix(layer)
        if self.gate_up:
            return {"gate_up": f"{prefix}.{self.gate_up}.weight", "down": f"{prefix}.{self.down}.weight"}
        names = {"up": f"{prefix}.{self.up}.weight", "down": f"{prefix}.{self.down}.weight"}
        if self.gate:
            names["gate"] = f"{prefix}.{self.gate}.weight"
        return names

    def mlp_roles(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors named by `mlp_weight_names` as {"gate"?, "up", "down"}."""
        if "gate_up" not in weights:
            return weights
        gate, up = weights["gate_up"].chunk(2, dim=0)
        return {"gate": gate, "up": up, "down": weights["down"]}

    def mlp_tensors(self, layer: int, gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor) -> dict:
        """A dense MLP in this family's own state-dict layout (the inverse of `mlp_roles`)."""
        names = self.mlp_weight_names(layer)
        if self.gate_up:
            return {names["gate_up"]: torch.cat([gate, up]), names["down"]: down}
        return {names[role]: t for role, t in (("gate", gate), ("up", up), ("down", down)) if t is not None}

    def activation(self, config: dict) -> str:
        act = dict(self.activation_aliases).get(config.get(self.activation_key, "silu"),
                                                config.get(self.activation_key, "silu"))
        if act not in ACTIVATION_NAMES:
            raise ValueError(f"activation {act!r} of {self.model_type} is not supported")
        return ACTIVATION_NAMES[act]

    def mlp_width(self, config: dict) -> int:
        return int(config["intermediate_size"])
