from moefy.arch.base import ArchAdapter

ADAPTER = ArchAdapter("olmo2")  # post-attention/post-FFN norms and q/k norms sit outside the MLP
