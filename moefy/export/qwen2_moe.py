import torch

from moefy.export.base import EMPTY_SHARED_WIDTH, StandardMoeFormat, head_dim
from moefy_kernels import cpu_decode


class Qwen2MoeFormat(StandardMoeFormat):
    name = "qwen2_moe"
    summary = "Qwen2MoeForCausalLM: shared + routed experts (exact via zero shared gate, doubled down_proj)"
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    block_class = "Qwen2MoeSparseMoeBlock"
    block_attr = "mlp"
    expert_names = ("gate_proj", "up_proj", "down_proj")
    num_experts_key = "num_experts"
    width_key = "moe_intermediate_size"
    families = ("llama", "mistral", "qwen2")
    has_shared = True
    can_skip_layers = True
    renormalize_key = "norm_topk_prob"
    extra_routing = ("shared_expert_gate",)
    engines = {"vLLM": "exact (perplexity equal, CPU build 0.32)",
               "llama.cpp": "wrong: its qwen2moe ignores norm_topk_prob, makes the zero shared-expert gate NaN "
                            "(sigmoid as silu(x)/x) and needs an untied output.weight"}

    def _attention_unsupported(self, config):
        if config.get("attention_bias"):
            return "qwen2_moe has q/k/v biases but no o_proj bias; this model's attention has an o_proj bias"
        if config.get("model_type") == "mistral" and config.get("sliding_window"):
            return "qwen2_moe cannot express Mistral's all-layer sliding window: use mixtral or native"
        return None

    def extra_tensors(self, layer, source, has):
        prefix = f"{source.adapter.layers_prefix}.{layer}.self_attn"
        dim = head_dim(source.config)
        sizes = {"q_proj": source.config["num_attention_heads"] * dim,
                 "k_proj": source.config["num_key_value_heads"] * dim,
                 "v_proj": source.config["num_key_value_heads"] * dim}
        return {f"{prefix}.{p}.bias": torch.zeros(n) for p, n in sizes.items() if not has(f"{prefix}.{p}.bias")}

    def _store_shared(self, block):
        shared = block.shared_expert
        shared.down_proj.weight.data = cpu_decode.rows_layout(shared.down_proj.weight.data)  # same values
        return cpu_decode.shared_applies(*self.decode_shared(block))

    def decode_shared(self, block):
        shared = block.shared_expert
        return (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight,
                block.shared_expert_gate.weight)

    def _extra_config(self, source, blocks):
        shared = next(iter(blocks.values()))["shared_width"] or EMPTY_SHARED_WIDTH
        return {**super()._extra_config(source, blocks), "qkv_bias": True, "shared_expert_intermediate_size": shared}
