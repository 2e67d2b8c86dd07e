import types

import torch

from moefy.arch.base import ACTIVATION_NAMES
from moefy.export.base import StandardMoeFormat, decodes_fused, head_dim
from moefy_kernels import cpu_decode


class GraniteMoeFormat(StandardMoeFormat):
    """Granite's decoder (embedding/attention/residual/logit multipliers) with Mixtral's routing: softmax over
    the top-k logits, i.e. renormalised top-k. Experts are stored stacked, in the hub layout transformers
    reads (`input_linear` [E, 2I, H] = [gate; up], `output_linear` [E, H, I], `router.layer`)."""

    name = "granitemoe"
    summary = "GraniteMoeForCausalLM: Granite sources, routed experts, softmax top-k renormalised"
    model_type = "granitemoe"
    architecture = "GraniteMoeForCausalLM"
    block_class = "GraniteMoeMoE"
    router_attr = "router"
    block_attr = "block_sparse_moe"
    num_experts_key = "num_local_experts"
    width_key = "intermediate_size"
    families = ("granite",)
    gguf_arch = "granitemoe"  # llama.cpp's GraniteMoe graph holds GraniteMoeShared too

    def gguf_layer(self, checkpoint, layer, config):
        """[gate; up] split in two, as llama.cpp reads gate and up separately; the shared MLP's likewise."""

        def read(name: str, half: int | None = None):
            shape = checkpoint.shape(name)
            if half is None:
                return shape, lambda: checkpoint.get(name)
            rows = shape[-2] // 2
            return (*shape[:-2], rows, shape[-1]), lambda: checkpoint.get(name).narrow(-2, half * rows, rows)

        moe, shared = f"{layer}.block_sparse_moe", f"{layer}.shared_mlp"
        tensors = {"ffn_gate_inp": read(f"{moe}.router.layer.weight"),
                   "ffn_gate_exps": read(f"{moe}.input_linear.weight", 0),
                   "ffn_up_exps": read(f"{moe}.input_linear.weight", 1),
                   "ffn_down_exps": read(f"{moe}.output_linear.weight")}
        if config.get("shared_intermediate_size"):
            tensors.update({"ffn_gate_shexp": read(f"{shared}.input_linear.weight", 0),
                            "ffn_up_shexp": read(f"{shared}.input_linear.weight", 1),
                            "ffn_down_shexp": read(f"{shared}.output_linear.weight")})
        return tensors

    def gguf_metadata(self, writer, config):
        writer.add_attention_scale(config["attention_multiplier"])
        writer.add_embedding_scale(config["embedding_multiplier"])
        writer.add_residual_scale(config["residual_multiplier"])
        writer.add_logit_scale(config["logits_scaling"])
        if config.get("shared_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(config["shared_intermediate_size"])

    def _attention_unsupported(self, config):
        if config.get("sliding_window"):
            return f"{self.name} has no sliding-window attention; this model has it: use mixtral or native"
        return super()._attention_unsupported(config)

    def _extra_config(self, source, blocks):
        """Granite's multipliers for a source without them (Llama/Mistral): each 1 — an exact identity in
        floating point — and the attention scale Llama computes, head_dim^-0.5."""
        if source.adapter.model_type == "granite":
            return {}
        return {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
                "attention_multiplier": head_dim(source.config) ** -0.5}

    def layer_tensors(self, layer, block, source):
        prefix = f"{source.adapter.layers_prefix}.{layer}"
        router, factors = self._expert_weights(block)
        experts = [block.expert(e) for e in range(block.num_experts)]
        moe = f"{prefix}.block_sparse_moe"
        tensors = {f"{moe}.router.layer.weight": router,
                   f"{moe}.input_linear.weight": torch.stack([torch.cat([e.gate, e.up]) for e in experts]),
                   f"{moe}.output_linear.weight": torch.stack([e.down * f for e, f in zip(experts, factors)])}
        if self.has_shared and block.shared is not None:  # GraniteMoeShared adds it ungated
            tensors[f"{prefix}.shared_mlp.input_linear.weight"] = torch.cat([block.shared.gate, block.shared.up])
            tensors[f"{prefix}.shared_mlp.output_linear.weight"] = block.shared.down
        return tensors


class GraniteMoeSharedFormat(GraniteMoeFormat):
    """GraniteMoe plus an ungated shared expert: with Granite's multipliers at 1 it is Llama's decoder with a
    shared + routed MoE, exact in transformers; llama.cpp, which does not load or reproduce Qwen2-MoE's
    export (gated shared expert, norm_topk_prob), runs it right (`engines`), so Llama/Mistral carves with a
    shared expert take it."""

    name = "granitemoeshared"
    summary = "GraniteMoeSharedForCausalLM: GraniteMoe plus an always-on shared expert (plain sum)"
    model_type = "granitemoeshared"
    architecture = "GraniteMoeSharedForCausalLM"
    block_class = "GraniteMoeSharedMoE"  # the routed experts; the shared MLP is the decoder layer's
    families = ("granite", "llama", "mistral")
    engines = {"llama.cpp": "runs right (perplexity within 0.5 % of moefy's on the same tokens: carve-50 −0.13 %, "
                            "carve-25 +0.50 %, float order moving tokens at the top-k cut)"}
    has_shared = True
    shared_width_key = "shared_intermediate_size"

    def _extra_config(self, source, blocks):
        return {**super()._extra_config(source, blocks),
                "shared_intermediate_size": next(iter(blocks.values()))["shared_width"]}

    def fast_decode(self, block, config, layer) -> None:
        """The routed block as every standard format's; the shared MLP, which is the decoder layer's (summed
        after the block, as transformers does), on the fused kernel too, in a call of its own."""
        super().fast_decode(block, config, layer)
        mlp = getattr(layer, "shared_mlp", None)
        if mlp is None or ACTIVATION_NAMES.get(config.hidden_act) != "silu" or cpu_decode.kernel() is None \
                or mlp.input_linear.weight.device.type != "cpu":
            return
        mlp.output_linear.weight.data = cpu_decode.rows_layout(mlp.output_linear.weight.data)  # same values
        if cpu_decode.shared_applies(*self.decode_shared_mlp(mlp)):
            mlp.forward = types.MethodType(_fused_shared_forward, mlp)

    @staticmethod
    def decode_shared_mlp(mlp):
        return cpu_decode.split_shared(mlp.input_linear.weight, mlp.output_linear.weight)


def _fused_shared_forward(mlp, hidden_states: torch.Tensor) -> torch.Tensor:
    """GraniteMoeShared's shared MLP: a few fp32 tokens outside autograd on the fused CPU kernel, else as is."""
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if decodes_fused(x, mlp) and x.dtype == torch.float32:
        shared = GraniteMoeSharedFormat.decode_shared_mlp(mlp)
        return cpu_decode.shared_expert(x, shared).view(hidden_states.shape)
    return type(mlp).forward(mlp, hidden_states)
