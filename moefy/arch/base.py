"""What moefy needs to know about a dense decoder family: where each layer's MLP lives."""

from __future__ import annotations

from dataclasses import dataclass

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
    activation_key: str = "hidden_act"
    activation_aliases: tuple[tuple[str, str], ...] = ()  # config value → what the family's code really runs
    lm_head: str = "lm_head.weight"  # not written when the config ties it to the embeddings

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def num_layers(self, config: dict) -> int:
        return int(config["num_hidden_layers"])

    def mlp_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}.{layer}.{self.mlp_attr}"

    def mlp_weight_names(self, layer: int) -> dict[str, str]:
        """{"gate"?, "up", "down"} → state-dict names of that layer's MLP weights."""
        prefix = self.mlp_prefix(layer)
        names = {"up": f"{prefix}.{self.up}.weight", "down": f"{prefix}.{self.down}.weight"}
        if self.gate:
            names["gate"] = f"{prefix}.{self.gate}.weight"
        return names

    def activation(self, config: dict) -> str:
        act = dict(self.activation_aliases).get(config.get(self.activation_key, "silu"),
                                                config.get(self.activation_key, "silu"))
        if act not in ACTIVATION_NAMES:
            raise ValueError(f"activation {act!r} of {self.model_type} is not supported")
        return ACTIVATION_NAMES[act]

    def mlp_width(self, config: dict) -> int:
        return int(config["intermediate_size"])
