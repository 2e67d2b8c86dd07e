import torch

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
    gguf_arch = "llama"  # llama.cpp runs Mixtral as Llama with experts

    def gguf_layer(self, checkpoint, layer, config):
        moe, n = f"{layer}.{self.block_attr}", config[self.num_experts_key]

        def stacked(which: str):
            names = [f"{moe}.experts.{e}.{which}.weight" for e in range(n)]
            return (n, *checkpoint.shape(names[0])), lambda: torch.stack([checkpoint.get(x) for x in names])

        gate, up, down = self.expert_names
        router = f"{moe}.gate.weight"
        return {"ffn_gate_inp": (checkpoint.shape(router), lambda: checkpoint.get(router)),
                "ffn_gate_exps": stacked(gate), "ffn_up_exps": stacked(up), "ffn_down_exps": stacked(down)}
