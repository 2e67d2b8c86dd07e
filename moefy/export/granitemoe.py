import torch

from moefy.export.base import StandardMoeFormat


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
    name = "granitemoeshared"
    summary = "GraniteMoeSharedForCausalLM: GraniteMoe plus an always-on shared expert (plain sum)"
    model_type = "granitemoeshared"
    architecture = "GraniteMoeSharedForCausalLM"
    block_class = "GraniteMoeSharedMoE"  # the routed experts; the shared MLP is the decoder layer's
    has_shared = True
    shared_width_key = "shared_intermediate_size"

    def _extra_config(self, source, blocks):
        return {"shared_intermediate_size": next(iter(blocks.values()))["shared_width"]}
