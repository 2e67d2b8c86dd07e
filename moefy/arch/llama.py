from moefy.arch.base import ArchAdapter

ADAPTER = ArchAdapter("llama", bias="mlp_bias")
