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
    """State-dict layout of one model family's MLPs. (Which standard MoE formats can hold the family is each
    format's own `families`.)"""

    model_type: str
    layers_prefix: str = "model.layers"
    mlp_attr: str = "mlp"
    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None  # one fused [gate; up] projection (Phi-3) instead of `gate` and `up`
    bias: bool | str = False  # MLP projections have biases: always, never, or as a config flag says ("mlp_bias")
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D) rather than nn.Linear's [out, in]
    activation_key: str = "hidden_act"
    activation_aliases: tuple[tuple[str, str], ...] = ()  # config value → what the family's code really runs
    config_keys: tuple[tuple[str, str], ...] = ()  # standard config name → this family's (GPT-2: n_embd, ...)
    lm_head: str = "lm_head.weight"  # not written when the config ties it to the embeddings
    # what the decoder layer does to the MLP's output before adding it to the residual (a post-FFN norm, a
    # residual multiplier), as (layer module, output) → output; it must map 0 to 0. None: nothing.
    mlp_output: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.gate_up is not None

    def setting(self, config: dict, key: str):
        """A config field by its standard name (hidden_size, num_hidden_layers, intermediate_size, ...)."""
        return config.get(dict(self.config_keys).get(key, key))

    def num_layers(self, config: dict) -> int:
        return int(self.setting(config, "num_hidden_layers"))

    def hidden_size(self, config: dict) -> int:
        return int(self.setting(config, "hidden_size"))

    def mlp_width(self, config: dict) -> int:
        return int(self.setting(config, "intermediate_size"))

    def mlp_bias(self, config: dict) -> bool:
        return bool(config.get(self.bias, False)) if isinstance(self.bias, str) else self.bias

    @property
    def base_prefix(self) -> str:
        """The base model's attribute in the causal-LM class ("model", "transformer", "gpt_neox")."""
        return self.layers_prefix.split(".")[0]

    def mlp_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}.{layer}.{self.mlp_attr}"

    def mlp_weight_names(self, layer: int, config: dict) -> dict[str, str]:
        """Role → state-dict name of that layer's MLP tensors. Roles: "gate"?, "up", "down" (or "gate_up",
        "down"), plus "<role>_bias" for each when the MLP has biases."""
        prefix = self.mlp_prefix(layer)
        modules = {"gate_up": self.gate_up} if self.gate_up else {"gate": self.gate, "up": self.up}
        modules["down"] = self.down
        names = {role: f"{prefix}.{module}.weight" for role, module in modules.items() if module}
        if self.mlp_bias(config):
            names.update({f"{role}_bias": f"{prefix}.{module}.bias" for role, module in modules.items() if module})
        return names

    def mlp_roles(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors named by `mlp_weight_names` as DenseMLP fields: [out, in] weights, a fused [gate; up]
        projection split."""
        if self.conv1d:
            tensors = {role: t.T if t.dim() == 2 else t for role, t in tensors.items()}
        if "gate_up" in tensors:
            tensors = dict(tensors)
            tensors["gate"], tensors["up"] = tensors.pop("gate_up").chunk(2, dim=0)
            if "gate_up_bias" in tensors:
                tensors["gate_bias"], tensors["up_bias"] = tensors.pop("gate_up_bias").chunk(2, dim=0)
        return tensors

    def mlp_tensors(self, layer: int, mlp, config: dict) -> dict[str, torch.Tensor]:
        """A dense MLP (moe.layer.DenseMLP) in this family's own state-dict layout: the inverse of `mlp_roles`."""
        fields = {"gate": mlp.gate, "up": mlp.up, "down": mlp.down, "gate_bias": mlp.gate_bias,
                  "up_bias": mlp.up_bias, "down_bias": mlp.down_bias}
        if self.gate_up:
            fields["gate_up"] = torch.cat([fields.pop("gate"), fields.pop("up")])
            if mlp.up_bias is not None:
                fields["gate_up_bias"] = torch.cat([fields.pop("gate_bias"), fields.pop("up_bias")])
        if self.conv1d:
            fields = {role: t.T.contiguous() if t is not None and t.dim() == 2 else t for role, t in fields.items()}
        return {name: fields[role] for role, name in self.mlp_weight_names(layer, config).items()}

    def activation(self, config: dict) -> str:
        act = config.get(self.activation_key, "silu")
        if not isinstance(act, str):
            raise ValueError(f"activation {act!r} of {self.model_type} is not a name")
        act = dict(self.activation_aliases).get(act, act)
        if act not in ACTIVATION_NAMES:
            raise ValueError(f"activation {act!r} of {self.model_type} is not supported")
        return ACTIVATION_NAMES[act]
