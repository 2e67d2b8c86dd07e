from moefy.arch.base import ArchAdapter

# the text-only Gemma 3 (Gemma3ForCausalLM): as Gemma 2, its MLP output normalised before the residual add
ADAPTER = ArchAdapter("gemma3_text", activation_key="hidden_activation",
                      mlp_output=lambda layer, y: layer.post_feedforward_layernorm(y))
