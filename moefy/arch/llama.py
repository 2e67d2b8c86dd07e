from moefy.arch.base import ArchAdapter

ADAPTER = ArchAdapter("llama", exports=("mixtral", "qwen2_moe"), bias="mlp_bias")
