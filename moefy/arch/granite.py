from moefy.arch.base import ArchAdapter

# embedding/attention/logit multipliers sit outside the MLP; its output is scaled before the residual add
ADAPTER = ArchAdapter("granite", bias="mlp_bias",
                      mlp_output=lambda layer, y: y * layer.residual_multiplier)
