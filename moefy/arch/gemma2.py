from moefy.arch.base import ArchAdapter

# soft-capping and sliding layers live outside the MLP; its output is normalised before the residual add
ADAPTER = ArchAdapter("gemma2", activation_key="hidden_activation",
                      mlp_output=lambda layer, y: layer.post_feedforward_layernorm(y))
