from moefy.arch.base import ArchAdapter

ADAPTER = ArchAdapter("qwen3", exports=("qwen3_moe",))
