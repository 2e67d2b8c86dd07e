from moefy.arch.base import ArchAdapter

# the text-only Gemma 3 (Gemma3ForCausalLM); norms, soft-capping, sliding/global layers stay in the base model
ADAPTER = ArchAdapter("gemma3_text", activation_key="hidden_activation")
