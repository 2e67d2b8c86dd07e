from moefy.arch.base import ArchAdapter

ADAPTER = ArchAdapter("phi3", gate=None, gate_up="gate_up_proj")  # one fused [gate; up] projection
