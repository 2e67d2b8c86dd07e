from moefy.export.base import StandardMoeFormat


class MixtralFormat(StandardMoeFormat):
    name = "mixtral"
    summary = "MixtralForCausalLM: Llama/Mistral, routed experts, softmax top-k renormalised"
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    block_class = "MixtralSparseMoeBlock"
    block_attr = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")
    num_experts_key = "num_local_experts"
    width_key = "intermediate_size"
    families = ("llama", "mistral")
