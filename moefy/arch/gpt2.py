from moefy.arch.base import ArchAdapter


class GPT2Adapter(ArchAdapter):
    def mlp_width(self, config: dict) -> int:
        return int(config.get("n_inner") or 4 * self.hidden_size(config))  # n_inner null means 4 × hidden


# Conv1D weights ([in, out]), a non-gated MLP with biases, GPT-2's own config names
ADAPTER = GPT2Adapter("gpt2", layers_prefix="transformer.h", gate=None, up="c_fc", down="c_proj", bias=True,
                      conv1d=True, activation_key="activation_function",
                      config_keys=(("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"),
                                   ("intermediate_size", "n_inner")))
