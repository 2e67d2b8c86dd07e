from moefy.arch.base import ArchAdapter

# GeGLU with tanh GELU; released configs say "gelu", which Gemma's own config class rewrites to the tanh form
ADAPTER = ArchAdapter("gemma", activation_aliases=(("gelu", "gelu_pytorch_tanh"),))
