from moefy.arch.base import ArchAdapter

ADAPTER = ArchAdapter("mistral", exports=("mixtral", "qwen2_moe"))
