from moefy.export.base import StandardMoeFormat


class Qwen3MoeFormat(StandardMoeFormat):
    name = "qwen3_moe"
    summary = "Qwen3MoeForCausalLM: Qwen3 sources, routed experts, softmax top-k (renormalised or not)"
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    block_class = "Qwen3MoeSparseMoeBlock"
    block_attr = "mlp"
    expert_names = ("gate_proj", "up_proj", "down_proj")
    num_experts_key = "num_local_experts"
    width_key = "moe_intermediate_size"
    families = ("qwen3",)
    can_skip_layers = True
    renormalize_key = "norm_topk_prob"

    def _attention_unsupported(self, config):
        return None  # Qwen3MoE keeps Qwen3's attention (biases flag, q/k norms) as is

    def _extra_config(self, source, blocks):
        return {**super()._extra_config(source, blocks),
                "attention_bias": bool(source.config.get("attention_bias", False))}
