from moefy.arch.base import ArchAdapter

# extra pre/post-FFN norms, soft-capping and sliding layers live outside the MLP: the base model keeps them
ADAPTER = ArchAdapter("gemma2", activation_key="hidden_activation")
