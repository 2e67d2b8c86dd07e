from moefy.arch.base import ArchAdapter

ADAPTER = ArchAdapter("qwen2", exports=("qwen2_moe",))
