from moefy.arch.base import ArchAdapter

# q/k norms sit outside the MLP; its output is normalised before the residual add
ADAPTER = ArchAdapter("olmo2", mlp_output=lambda layer, y: layer.post_feedforward_layernorm(y))
