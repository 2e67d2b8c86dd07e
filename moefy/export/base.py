"""Export formats: how a pipeline's MoE layers are named, shaped and configured on disk."""

from __future__ import annotations

import dataclasses
import types
from typing import Callable, ClassVar

import torch

from moefy.arch.base import ACTIVATION_NAMES
from moefy.moe.layer import DenseMLP, MoeLayer
from moefy.plan import LayerPlan, SourceInfo
from moefy_kernels import cpu_decode
from moefy_kernels.torch_ops import GATHER_MAX_TOKENS, fused_decode, fused_fits

# Config fields whose value changes the function: carried over and checked after the target
# config class has parsed them (a class that drops or recomputes one cannot hold the model).
SEMANTIC_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size",
                 "rms_norm_eps", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
                 "sliding_window", "layer_types", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id",
                 "embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def _same(key: str, a, b) -> bool:
    if key == "sliding_window":  # None and 0 both mean "no window"
        return (a or None) == (b or None)
    return a == b


def head_dim(config) -> int:
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return get("head_dim", None) or get("hidden_size") // get("num_attention_heads")


class ExportFormat:
    name: ClassVar[str]
    summary: ClassVar[str]
    model_type: ClassVar[str]  # config.json `model_type` of checkpoints in this format
    block_class: ClassVar[str | None] = None  # the class name of its MoE block once transformers loads it
    families: ClassVar[tuple[str, ...]] = ()  # the dense families `--format auto` considers it for
    # what inference engines other than transformers make of this format as moefy writes it, as measured
    # (README "Export formats and engines"); an engine not named was not checked
    engines: ClassVar[dict[str, str]] = {}
    gguf_arch: ClassVar[str | None] = None  # llama.cpp's architecture `moefy export-gguf` writes (None: none)

    def engine_notes(self) -> str:
        """`engines` as one line, for `moefy recipes` and `moefy inspect --recipe`."""
        return "; ".join(f"{engine}: {verdict}" for engine, verdict in self.engines.items())

    def gguf_layer(self, checkpoint, layer: str, config: dict) -> dict[str, tuple[tuple[int, ...], Callable]]:
        """The MoE tensors of decoder layer `layer` (its name prefix) of a checkpoint written in this format,
        under llama.cpp's names without `blk.N.` and `.weight`: {name: (shape, read() → tensor)}."""
        raise NotImplementedError

    def gguf_metadata(self, writer, config: dict) -> None:
        """The llama.cpp keys of `gguf_arch` beyond the Llama family's and the expert counts."""

    def fast_decode(self, block, config, layer) -> None:
        """Let a loaded MoE block of this format (in decoder `layer`) decode faster on CPU, computing the same
        function. Nothing by default (native blocks decode through `moe_forward`, which fuses on its own)."""

    def unsupported(self, source: SourceInfo, plan: LayerPlan) -> str | None:
        """Why this format cannot hold the model at all (None when it can)."""
        return None

    def inexact(self, plan: LayerPlan) -> str | None:
        """Why this format would change the model's function (None when exact)."""
        return None

    def layer_tensors(self, layer: int, block: MoeLayer, source: SourceInfo) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_tensors(self, layer: int, source: SourceInfo, has) -> dict[str, torch.Tensor]:
        """Tensors the target architecture needs that the source lacks (e.g. zero biases)."""
        return {}

    def config(self, source: SourceInfo, blocks: dict[int, dict], dtype: str) -> dict:
        raise NotImplementedError

    def write_files(self, out_dir) -> None:
        """Extra files (e.g. modeling code) written into OUT."""

    def block_specs(self, config: dict) -> dict[int, dict]:
        """{layer: native block spec} for the MoE layers of a checkpoint written in this format."""
        raise NotImplementedError


def dense_tensors(prefix: str, mlp: DenseMLP, names: tuple[str | None, str, str]) -> dict[str, torch.Tensor]:
    gate_name, up_name, down_name = names
    tensors = {f"{prefix}.{up_name}.weight": mlp.up, f"{prefix}.{down_name}.weight": mlp.down}
    if mlp.gate is not None:
        tensors[f"{prefix}.{gate_name}.weight"] = mlp.gate
    return tensors


# A format whose blocks always have a shared expert holds a MoE without one as an all-zero shared expert this
# wide (output exactly 0): zero-width tensors load in transformers but engines that build the shared expert
# only when it has a width (vLLM) refuse them; 8 divides any tensor-parallel split
EMPTY_SHARED_WIDTH = 8


class StandardMoeFormat(ExportFormat):
    """A transformers MoE class with softmax top-k routing and optional sigmoid-gated shared expert."""

    architecture: ClassVar[str]
    block_attr: ClassVar[str]  # the decoder layer's attribute holding the MoE block
    expert_names: ClassVar[tuple[str, str, str]]  # (gate, up, down) inside experts.{e} (per-expert layouts)
    num_experts_key: ClassVar[str]
    width_key: ClassVar[str]
    has_shared: ClassVar[bool] = False
    shared_width_key: ClassVar[str] = "shared_expert_intermediate_size"
    can_skip_layers: ClassVar[bool] = False  # has `mlp_only_layers`
    renormalize_key: ClassVar[str | None] = None  # config flag for renormalised top-k weights
    router_attr: ClassVar[str] = "gate"  # the block's router: x → (logits, top-k weights, top-k expert ids)
    extra_routing: ClassVar[tuple[str, ...]] = ()  # other routing submodules of the block (a shared expert's gate)

    @classmethod
    def routing_modules(cls) -> tuple[str, ...]:
        """The block's submodules that decide or weight the routing (what `distill train: router` trains)."""
        return (cls.router_attr, *cls.extra_routing)

    def fast_decode(self, block, config, layer) -> None:
        """At decode, the block's own router (tokens are routed exactly as in prefill), then its experts — and
        its shared expert — in one call of the fused CPU kernel: transformers' block spends as long in its
        small ops and module calls as in the bytes it reads. Installed only where the kernel holds the
        weights' layout; any other call (prefill, autograd, another device or dtype) runs the block as is."""
        experts = block.experts
        if ACTIVATION_NAMES.get(config.hidden_act, config.hidden_act) != "silu" or \
                not (fused_fits(experts.gate_up_proj, experts.down_proj)
                     and cpu_decode.holds(experts.gate_up_proj, experts.down_proj)) \
                or not self._router_returns_logits_weights_ids(block, config) or not self._store_shared(block):
            return
        block._moefy_format = self
        block.forward = types.MethodType(_fused_decode_forward, block)

    def _router_returns_logits_weights_ids(self, block, config) -> bool:
        """Whether the installed transformers' router returns (logits [T, E], weights [T, k], ids [T, k]): the
        order has changed between versions (GraniteMoe's router returned (ids, weights, logits) in 5.13)."""
        num, top_k = block.experts.gate_up_proj.shape[0], config.num_experts_per_tok
        with torch.no_grad():
            out = getattr(block, self.router_attr)(torch.zeros(1, config.hidden_size,
                                                               dtype=block.experts.gate_up_proj.dtype))
        return (isinstance(out, tuple) and len(out) == 3 and out[0].shape == (1, num) and out[0].is_floating_point()
                and out[1].shape == (1, top_k) and out[1].is_floating_point()
                and out[2].shape == (1, top_k) and out[2].dtype == torch.int64)

    def _store_shared(self, block) -> bool:
        """Re-store the block's shared expert for the kernel (same values); False where it cannot read it."""
        return True

    def decode_shared(self, block):
        """The block's shared expert as the kernel reads it (gate rows, up rows, down as rows, gate or None)."""
        return None

    def unsupported(self, source: SourceInfo, plan: LayerPlan) -> str | None:
        if source.adapter.model_type not in self.families:
            return f"{self.name} holds {', '.join(self.families)} models, not {source.adapter.model_type}"
        if not source.adapter.gated:
            return f"{self.name} experts are gated (SwiGLU); this MLP is not"
        if source.adapter.mlp_bias(source.config):
            return f"{self.name} experts have no biases; this model's MLP has them"
        if plan.dense_layers and not self.can_skip_layers:
            return f"{self.name} has no dense (MLP-only) layers; this MoE keeps some: use native"
        if not plan.uniform:
            return f"{self.name} needs experts of equal width; these differ (pruned branches): use native"
        if plan.expert_width % 8:
            return (f"{self.name} in stock transformers runs experts through grouped_mm, which needs expert widths "
                    f"that are multiples of 8 (16-byte strides); this one is {plan.expert_width}: use native")
        if plan.bias:
            return (f"{self.name} experts have no output bias; this MoE has one (expected-output compensation): "
                    f"use native")
        if plan.router_hidden:
            return f"{self.name} routes with a linear gate; this MoE has an MLP router: use native"
        if not plan.same_top_k:
            return f"{self.name} activates the same number of experts in every layer; this MoE varies it: use native"
        if plan.shared and not self.has_shared:
            return f"{self.name} has no shared expert; this MoE has one"
        return self._attention_unsupported(source.config) or self._config_unsupported(source, plan)

    def _attention_unsupported(self, config: dict) -> str | None:
        if config.get("attention_bias"):
            return f"{self.name} attention has no biases; this model's attention has them"
        return None

    def inexact(self, plan: LayerPlan) -> str | None:
        if plan.scoring == "none":
            return None
        if plan.scoring != "softmax":
            return f"{self.name} routes by softmax, this MoE by {plan.scoring}"
        if plan.combine == "unit":
            return f"{self.name} weights experts by router probability, this MoE with unit weights"
        if plan.combine == "prob" and self.renormalize_key is None:
            return f"{self.name} always renormalises top-k weights; this MoE uses raw probabilities"
        return None

    def _expert_weights(self, block: MoeLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """(router [E, H], per-expert output factor) reproducing the block under softmax top-k."""
        factors = block.scales.float().clone()
        if block.scoring == "none":
            # all-experts static MoE: zero logits → every renormalised weight is 1/E; fold E into down.
            router = torch.zeros(block.num_experts, block.mlp.up.shape[1])
            factors *= block.num_experts
        else:
            router = block.router
            if block.combine == "unit":
                factors *= block.top_k
        return router, factors

    def layer_tensors(self, layer: int, block: MoeLayer, source: SourceInfo) -> dict[str, torch.Tensor]:
        prefix = f"{source.adapter.layers_prefix}.{layer}.{self.block_attr}"
        if isinstance(block, DenseMLP):
            return dense_tensors(prefix, block, ("gate_proj", "up_proj", "down_proj"))
        router, factors = self._expert_weights(block)
        tensors = {f"{prefix}.gate.weight": router}
        for e in range(block.num_experts):
            expert = block.expert(e)
            expert = dataclasses.replace(expert, down=expert.down * factors[e])
            tensors.update(dense_tensors(f"{prefix}.experts.{e}", expert, self.expert_names))
        if self.has_shared:
            hidden = block.mlp.up.shape[1]
            shared = block.shared or DenseMLP(torch.zeros(EMPTY_SHARED_WIDTH, hidden),
                                              torch.zeros(EMPTY_SHARED_WIDTH, hidden),
                                              torch.zeros(hidden, EMPTY_SHARED_WIDTH), block.mlp.activation)
            # sigmoid(0) = 1/2 on a zero gate: double down_proj so the shared expert counts once.
            doubled = dataclasses.replace(shared, down=shared.down * 2)
            tensors.update(dense_tensors(f"{prefix}.shared_expert", doubled, ("gate_proj", "up_proj", "down_proj")))
            tensors[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, hidden)
        return tensors

    def config(self, source: SourceInfo, blocks: dict[int, dict], dtype: str) -> dict:
        from transformers import AutoConfig

        specs = list(blocks.values())
        first = specs[0]
        if any((s["widths"], s["top_k"], s["shared_width"]) != (first["widths"], first["top_k"],
                                                                 first["shared_width"]) for s in specs):
            raise ValueError(f"{self.name} needs the same expert count, width and top_k in every layer")
        fields = {k: v for k, v in source.config.items() if k in SEMANTIC_KEYS or k == "head_dim"}
        fields.update({
            self.num_experts_key: len(first["widths"]),
            self.width_key: first["widths"][0],
            "num_experts_per_tok": first["top_k"],
            "dtype": dtype,
        })
        if self.renormalize_key:
            fields[self.renormalize_key] = first["scoring"] == "none" or first["combine"] == "renormalize"
        fields.update(self._extra_config(source, blocks))
        target = AutoConfig.for_model(self.model_type, **fields)
        for key in SEMANTIC_KEYS:
            if key in source.config and not _same(key, getattr(target, key, None), source.config[key]):
                raise ValueError(f"{self.name} config would change {key}: {source.config[key]!r} → "
                                 f"{getattr(target, key, None)!r}")
        if head_dim(target) != head_dim(source.config):
            raise ValueError(f"{self.name} cannot express head_dim {head_dim(source.config)}")
        target.architectures = [self.architecture]
        return target.to_dict()

    def _config_unsupported(self, source: SourceInfo, plan: LayerPlan) -> str | None:
        """Build the target config for the planned layers now, so a mismatch fails before any writing."""
        spec = {"widths": [plan.expert_width] * plan.num_experts, "top_k": plan.top_k, "scoring": plan.scoring,
                "combine": plan.combine, "shared_width": 8 if plan.shared else 0}
        layers = range(source.adapter.num_layers(source.config))
        try:
            self.config(source, {i: spec for i in layers if i not in plan.dense_layers}, "float32")
        except (ValueError, TypeError, KeyError) as exc:
            return str(exc)
        return None

    def _extra_config(self, source: SourceInfo, blocks: dict[int, dict]) -> dict:
        """Fields beyond the MoE sizes: dense (MLP-only) layers and sliding-window layout where supported."""
        if not self.can_skip_layers:
            return {}
        dense = [i for i in range(source.adapter.num_layers(source.config)) if i not in blocks]
        extra = {"intermediate_size": source.mlp_width, "mlp_only_layers": dense, "decoder_sparse_step": 1}
        for key in ("use_sliding_window", "max_window_layers"):
            if key in source.config:
                extra[key] = source.config[key]
        return extra

    def block_specs(self, config: dict) -> dict[int, dict]:
        num_experts = config.get(self.num_experts_key) or config["num_experts"]
        dense = set(config.get("mlp_only_layers") or [])
        renormalize = config.get(self.renormalize_key, True) if self.renormalize_key else True
        spec = {"widths": [config[self.width_key]] * num_experts, "top_k": config["num_experts_per_tok"],
                "scoring": "softmax", "combine": "renormalize" if renormalize else "prob",
                "activation": config.get("hidden_act", "silu"), "gated": True,
                "shared_width": config.get(self.shared_width_key, 0) if self.has_shared else 0,
                "bias": False}
        return {i: dict(spec) for i in range(config["num_hidden_layers"]) if i not in dense}


def decodes_fused(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether an installed fast decode takes this call: a few tokens [T, H], outside autograd and training."""
    return x.shape[0] <= GATHER_MAX_TOKENS and not (torch.is_grad_enabled() or module.training)


def _fused_decode_forward(block, hidden_states: torch.Tensor) -> torch.Tensor:
    """A standard MoE block's forward (`StandardMoeFormat.fast_decode`): a few tokens outside autograd on the
    fused CPU kernel; anything else as transformers runs it."""
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if decodes_fused(x, block):
        fmt = block._moefy_format
        _, weights, index = getattr(block, fmt.router_attr)(x)
        y = fused_decode(x, weights, index, block.experts.gate_up_proj, block.experts.down_proj, "silu", True, None,
                         fmt.decode_shared(block))
        if y is not None:
            return y.view(hidden_states.shape)
    return type(block).forward(block, hidden_states)
