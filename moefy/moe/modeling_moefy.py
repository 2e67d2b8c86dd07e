"""moefy's native MoE model: a dense decoder whose chosen MLPs are replaced by `MoeBlock`.

This file is copied verbatim into every native checkpoint so that
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` works without moefy
installed; it therefore imports only torch and transformers (moefy_kernels when present).

Storage is the dense MLP layout with its intermediate dimension partitioned into experts:
`experts.gate_up_proj` [Σ 2·I_e, H] holds expert e's gate rows then up rows as one block,
`experts.down_proj` [H, Σ I_e] its down columns (and `experts.gate_up_bias` [Σ 2·I_e] the input
biases of MLPs that have them; their output bias is the block's `output_bias`, added once).  With
equal widths these are free views of the kernel layout (w13 [E, 2I, H], w2 [E, H, I]); with unequal
widths (pruned branches) no padding is stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

try:  # the fused/grouped backends; the fallback below keeps OUT loadable without moefy
    from moefy_kernels import moe_forward
    from moefy_kernels.cpu_decode import split_shared
    from moefy_kernels.torch_ops import GATHER_MAX_TOKENS, fused_decode
except ImportError:  # pragma: no cover - exercised only where moefy is not installed
    moe_forward = fused_decode = GATHER_MAX_TOKENS = split_shared = None

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
_MOEFY_KEYS = ("base_model_type", "moe_layers", "layers_path", "mlp_attr")


def _expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, act, gated: bool,
                b13: torch.Tensor | None = None) -> torch.Tensor:
    """One expert: w2 · act(gate x) ⊙ (up x) with w13 = [gate; up], or w2 · act(w13 x) when not gated."""
    z = F.linear(x, w13, b13)
    width = w2.shape[-1]
    return F.linear(act(z[..., :width]) * z[..., width:] if gated else act(z), w2)


class MoefyConfig(PretrainedConfig):
    """The source model's config fields, plus where the MoE blocks go and what they compute.

    `moe_layers` maps a layer index (as a string) to a block spec: widths, top_k, scoring
    ("softmax" | "sigmoid" | "none" for a static all-experts MoE), combine ("unit" | "prob" |
    "renormalize"), activation, gated, shared_width, bias (an output bias: the MLP's own down bias and/or
    expected-output compensation), expert_bias (experts carry their slice of the MLP's input biases),
    router_hidden (width of a residual MLP router, 0: linear).
    """

    model_type = "moefy"

    def __init__(self, base_model_type: str = "llama", moe_layers: dict | None = None,
                 layers_path: str = "model.layers", mlp_attr: str = "mlp", **kwargs):
        self.base_model_type = base_model_type
        self.moe_layers = moe_layers or {}
        self.layers_path = layers_path
        self.mlp_attr = mlp_attr
        super().__init__(**kwargs)

    def __getattr__(self, key: str):
        """The base family's attribute aliases (GPT-2's `num_hidden_layers` is its `n_layer`), which generation
        reads (the KV cache's layer count); only names the config does not hold itself get here."""
        base_type = self.__dict__.get("base_model_type")
        real = CONFIG_MAPPING[base_type].attribute_map.get(key) if base_type in CONFIG_MAPPING else None
        if real is None or real == key:
            raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")
        return getattr(self, real)

    def base_config(self) -> PretrainedConfig:
        fields = {k: v for k, v in self.to_dict().items()
                  if k not in _MOEFY_KEYS + ("model_type", "auto_map", "architectures", "transformers_version")}
        return AutoConfig.for_model(self.base_model_type, **fields)


class PackedExperts(nn.Module):
    """Experts of (possibly) unequal widths stored as one partitioned dense MLP."""

    def __init__(self, hidden: int, widths: list[int], gated: bool, bias: bool = False, dtype=None):
        super().__init__()
        self.widths = list(widths)
        self.gated = gated
        rows = (2 if gated else 1) * sum(widths)
        self.gate_up_proj = nn.Parameter(torch.empty(rows, hidden, dtype=dtype))
        self.gate_up_bias = nn.Parameter(torch.empty(rows, dtype=dtype)) if bias else None
        self.down_proj = nn.Parameter(torch.empty(hidden, sum(widths), dtype=dtype))

    @property
    def uniform(self) -> bool:
        return len(set(self.widths)) == 1

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Kernel layout views: w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] or None (equal widths only, no copy)."""
        e, i = len(self.widths), self.widths[0]
        w13 = self.gate_up_proj.view(e, -1, self.gate_up_proj.shape[1])
        w2 = self.down_proj.view(self.down_proj.shape[0], e, i).permute(1, 0, 2)
        b13 = None if self.gate_up_bias is None else self.gate_up_bias.view(e, -1)
        return w13, w2, b13

    def dense_forward(self, x: torch.Tensor, act, column_scale: torch.Tensor | None) -> torch.Tensor:
        """All experts at once: one GEMM in, one GEMM out (the static MoE's fast path)."""
        z = F.linear(x, self.gate_up_proj, self.gate_up_bias)
        if self.gated:
            if self.uniform:
                z = z.view(*z.shape[:-1], len(self.widths), 2, self.widths[0])
                h = act(z[..., 0, :]) * z[..., 1, :]
                h = h.reshape(*x.shape[:-1], -1)
            else:
                gate_idx, up_idx = self._gate_up_index(z.device)
                h = act(z[..., gate_idx]) * z[..., up_idx]
        else:
            h = act(z)
        if column_scale is not None:
            h = h * column_scale
        return F.linear(h, self.down_proj)

    def each_expert(self):
        """Yield (w13_e [2·I_e, H], w2_e [H, I_e], b13_e [2·I_e] or None) views, expert by expert."""
        rows = cols = 0
        factor = 2 if self.gated else 1
        for w in self.widths:
            b13 = None if self.gate_up_bias is None else self.gate_up_bias[rows:rows + factor * w]
            yield self.gate_up_proj[rows:rows + factor * w], self.down_proj[:, cols:cols + w], b13
            rows, cols = rows + factor * w, cols + w

    def _gate_up_index(self, device):
        gate, up, offset = [], [], 0
        for w in self.widths:
            gate.append(torch.arange(offset, offset + w))
            up.append(torch.arange(offset + w, offset + 2 * w))
            offset += 2 * w
        return torch.cat(gate).to(device), torch.cat(up).to(device)


class MoeBlock(nn.Module):
    """Routed experts (+ optional always-on shared expert) with exact, configurable semantics."""

    @staticmethod
    def routing_modules() -> tuple[str, ...]:
        """The submodules and parameters that decide or weight the routing (what `distill train: router` trains)."""
        return "router", "router_in", "router_out", "expert_scales"

    def __init__(self, hidden: int, spec: dict, dtype=None):
        super().__init__()
        self.scoring = spec["scoring"]
        self.top_k = spec["top_k"]
        self.combine = spec["combine"]
        self.activation = spec["activation"]
        self.gated = spec["gated"]
        self.backend = "auto"
        widths = spec["widths"]
        expert_bias = spec.get("expert_bias", False)
        self.experts = PackedExperts(hidden, widths, self.gated, expert_bias, dtype)
        self.expert_scales = nn.Parameter(torch.ones(len(widths), dtype=dtype))
        self.router = nn.Linear(hidden, len(widths), bias=False, dtype=dtype) if self.scoring != "none" else None
        router_hidden = spec.get("router_hidden", 0)  # a residual MLP router: logits += out(silu(in(x)))
        self.router_in = nn.Linear(hidden, router_hidden, bias=False, dtype=dtype) if router_hidden else None
        self.router_out = nn.Linear(router_hidden, len(widths), bias=False, dtype=dtype) if router_hidden else None
        shared = spec.get("shared_width", 0)
        self.shared = PackedExperts(hidden, [shared], self.gated, expert_bias, dtype) if shared else None
        self.output_bias = nn.Parameter(torch.zeros(hidden, dtype=dtype)) if spec.get("bias") else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.router is None and self.backend == "reference":
            y = self._static_reference(x, act)
        elif self.router is None:
            y = self._static_decode(x)
            if y is None:
                column_scale = torch.repeat_interleave(
                    self.expert_scales, torch.tensor(self.experts.widths, device=x.device))
                y = self.experts.dense_forward(x, act, column_scale)
                if self.shared is not None:
                    y = y + self.shared.dense_forward(x, act, None)
        else:
            y = self._routed(x)
        if self.output_bias is not None:
            y = y + self.output_bias
        return y.reshape(shape)

    def _static_reference(self, x: torch.Tensor, act) -> torch.Tensor:
        """The static MoE by its definition: Σ_e α_e · expert_e(x) (+ shared), one expert at a time."""
        parts = [(scale, *expert) for scale, expert in zip(self.expert_scales, self.experts.each_expert())]
        if self.shared is not None:
            parts.append((1.0, *next(self.shared.each_expert())))
        y = torch.zeros_like(x)
        for scale, w13, w2, b13 in parts:
            y = y + scale * _expert_mlp(x, w13, w2, act, self.gated, b13)
        return y

    def _static_decode(self, x: torch.Tensor) -> torch.Tensor | None:
        """A few tokens of the static MoE on the torch backend's fused CPU kernel (every expert weighted by its
        scale, the shared expert in the same call); None where that kernel does not apply."""
        if fused_decode is None or self.backend != "torch" or not self.experts.uniform or \
                x.shape[0] > GATHER_MAX_TOKENS:
            return None
        w13, w2, b13 = self.experts.stacked()
        tokens, num = x.shape[0], w2.shape[0]
        ids = torch.arange(num, device=x.device).expand(tokens, num)
        shared = None
        if self.shared is not None:
            if self.shared.gate_up_bias is not None or not self.gated:
                return None
            shared = split_shared(self.shared.gate_up_proj, self.shared.down_proj)
        return fused_decode(x, self.expert_scales.float().expand(tokens, num), ids, w13, w2, self.activation,
                            self.gated, b13, shared)

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        if self.router_in is not None:
            logits = logits + self.router_out(F.silu(self.router_in(x)))
        w13, w2, b13 = self.experts.stacked()
        shared = None
        if self.shared is not None:
            shared = (self.shared.gate_up_proj, self.shared.down_proj, self.shared.gate_up_bias)
        kwargs = dict(scoring=self.scoring, combine=self.combine, activation=self.activation, gated=self.gated,
                      shared=shared, expert_scales=self.expert_scales, b13=b13)
        if moe_forward is None:
            return _dense_masked_moe(x, logits, w13, w2, self.top_k, **kwargs)
        training = self.training and torch.is_grad_enabled()  # triton has no backward; torch does
        return moe_forward(x, logits, w13, w2, self.top_k, backend="torch" if training else self.backend,
                           check=False, **kwargs)  # the weights' shapes come from this block's validated spec


def _dense_masked_moe(x, logits, w13, w2, top_k, *, scoring, combine, activation, gated, shared, expert_scales,
                      b13=None):
    """Every expert on every token (two dense-MLP-sized GEMMs), masked by the routing weights: the forward
    (and training) path where moefy_kernels is not installed."""
    act = _ACTIVATIONS[activation]
    probs = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
    top_p, top_i = torch.topk(probs, top_k, dim=-1)
    if combine == "unit":
        top_p = torch.ones_like(top_p)
    elif combine == "renormalize":
        top_p = top_p / top_p.sum(-1, keepdim=True)
    dense_w = torch.zeros_like(probs).scatter(-1, top_i, top_p) * expert_scales.float()
    experts, width, dim = w2.shape[0], w2.shape[2], w2.shape[1]
    z = F.linear(x.float(), w13.float().reshape(-1, dim)).view(x.shape[0], experts, -1)
    z = z if b13 is None else z + b13.float()
    h = act(z[..., :width]) * z[..., width:] if gated else act(z)
    h = (h * dense_w[..., None]).reshape(x.shape[0], experts * width)
    y = F.linear(h, w2.float().permute(1, 0, 2).reshape(dim, experts * width))
    if shared is not None:
        shared_b13 = shared[2].float() if len(shared) == 3 and shared[2] is not None else None
        y = y + _expert_mlp(x.float(), shared[0].float(), shared[1].float(), act, gated, shared_b13)
    return y.to(x.dtype)


def _base_renames(config: MoefyConfig) -> dict[str, str]:
    """The renames (regex → replacement) transformers applies when it loads the base family's dense causal LM,
    e.g. GPT-NeoX's `embed_out.` → `lm_head.` from 5.24 on; empty where it has none (or no such registry)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # pragma: no cover - a transformers without load-time conversions renames nothing
        return {}
    dense_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.base_config())]
    for key in (dense_cls.__name__, config.base_model_type):
        renames = {}
        for transform in get_checkpoint_conversion_mapping(key) or []:
            if type(transform).__name__ == "WeightRenaming":
                sources, targets = ([p] if isinstance(p, str) else list(p)
                                    for p in (transform.source_patterns, transform.target_patterns))
                renames.update(zip(sources, targets * len(sources)))
        if renames:
            return renames
    return {}


class MoefyForCausalLM(PreTrainedModel, GenerationMixin):
    """The source architecture's causal LM, built from the stored base config, with MoE MLPs."""

    config_class = MoefyConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: MoefyConfig):
        super().__init__(config)
        base_config = config.base_config()
        dense_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)]
        attention = config._attn_implementation  # sdpa by default, which not every family has (Gemma 2)
        base_config._attn_implementation = "eager" if attention == "sdpa" and not dense_cls._supports_sdpa \
            else attention
        dense = dense_cls(base_config)
        for name, child in dense.named_children():
            setattr(self, name, child)
        self._dense_forward = dense_cls.forward
        self._tied_weights_keys = dict(getattr(dense, "_tied_weights_keys", None) or {})
        dtype = next(dense.parameters()).dtype
        layers = self.get_submodule(config.layers_path)
        for index, spec in config.moe_layers.items():
            setattr(layers[int(index)], config.mlp_attr, MoeBlock(base_config.hidden_size, spec, dtype))
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """Load with the base family's checkpoint renames: the files keep the source's tensor names, which the
        installed transformers may have renamed in its dense class (and maps on load for that class only)."""
        if not isinstance(config, MoefyConfig):
            config = MoefyConfig.from_pretrained(pretrained_model_name_or_path, **{
                k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs})
        renames = _base_renames(config)
        if renames and kwargs.get("key_mapping") is None:
            kwargs["key_mapping"] = renames
        return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    def _init_weights(self, module):
        if isinstance(module, MoeBlock):
            nn.init.ones_(module.expert_scales)
            if module.output_bias is not None:
                nn.init.zeros_(module.output_bias)
        elif isinstance(module, PackedExperts):
            std = getattr(self.config, "initializer_range", 0.02)
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)
            if module.gate_up_bias is not None:
                nn.init.zeros_(module.gate_up_bias)
        else:
            super()._init_weights(module)

    def forward(self, *args, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        """The base family's causal-LM forward. `logits_to_keep` is named so that `generate` sees it in the
        signature and, as for the dense model, scores only the last position of a prompt."""
        return self._dense_forward(self, *args, logits_to_keep=logits_to_keep, **kwargs)

    def set_backend(self, backend: str) -> None:
        for module in self.modules():
            if isinstance(module, MoeBlock):
                module.backend = backend
