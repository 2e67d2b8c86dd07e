from moefy.arch.base import ArchAdapter

ADAPTER = ArchAdapter("qwen3")
