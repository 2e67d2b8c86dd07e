from moefy.arch.base import ArchAdapter

ADAPTER = ArchAdapter("granite")  # embedding/residual/attention/logit multipliers sit outside the MLP
