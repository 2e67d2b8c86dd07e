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
    engines = {"llama.cpp": "exact (mlpmoe: perplexity 22.4997 against the dense GGUF's 22.4998)",
               "vLLM": "exact (perplexity equal, CPU build 0.32)"}
