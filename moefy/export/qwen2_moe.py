import types

import torch

from moefy.arch.base import ACTIVATION_NAMES
from moefy.export.base import StandardMoeFormat, head_dim
from moefy_kernels import cpu_decode
from moefy_kernels.torch_ops import GATHER_MAX_TOKENS, fused_decode, fused_fits


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

    def fast_decode(self, block, config):
        """The routed experts and the gated shared expert in one kernel call at decode, after the block's own
        router (so tokens are routed exactly as in prefill); transformers' block calls ~20 ops and 8 modules
        for the same sum. Installed only where the kernel holds the layout; other calls run the block as is."""
        experts, shared = block.experts, block.shared_expert
        if ACTIVATION_NAMES.get(config.hidden_act, config.hidden_act) != "silu" or \
                not (fused_fits(experts.gate_up_proj, experts.down_proj)
                     and cpu_decode.holds(experts.gate_up_proj, experts.down_proj)):
            return
        shared.down_proj.weight.data = cpu_decode.rows_layout(shared.down_proj.weight.data)  # same values
        if cpu_decode.shared_applies(shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight,
                                     block.shared_expert_gate.weight):
            block.forward = types.MethodType(_qwen2_moe_decode, block)

    def _extra_config(self, source, blocks):
        shared = next(iter(blocks.values()))["shared_width"]
        return {**super()._extra_config(source, blocks), "qkv_bias": True, "shared_expert_intermediate_size": shared}


def _qwen2_moe_decode(block, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen2MoeSparseMoeBlock.forward, a few tokens on the fused CPU kernel outside autograd; anything else as
    transformers runs it."""
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if x.shape[0] <= GATHER_MAX_TOKENS and not torch.is_grad_enabled():
        _, weights, index = block.gate(x)
        experts, shared = block.experts, block.shared_expert
        y = fused_decode(x, weights, index, experts.gate_up_proj, experts.down_proj, "silu", True, None,
                         (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight,
                          block.shared_expert_gate.weight))
        if y is not None:
            return y.view(hidden_states.shape)
    return type(block).forward(block, hidden_states)
