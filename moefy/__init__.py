"""moefy: dense Hugging Face causal LMs → Mixture-of-Experts checkpoints, through YAML recipes."""

__version__ = "0.1.0"


def load(path, *, dtype=None, backend: str = "auto", device: str = "cpu"):
    """Load a moefy output (standard MoE format or native) as a causal LM in eval mode."""
    from moefy.loading import load_model

    return load_model(path, dtype=dtype, backend=backend, device=device)
