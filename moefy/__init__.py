"""moefy: dense Hugging Face causal LMs → Mixture-of-Experts checkpoints, through YAML recipes."""

import os

__version__ = "0.1.0"

# Large CPU tensors on transparent huge pages: streaming a checkpoint allocates a fresh buffer per
# tensor, and 4 KiB page faults made up a fifth of a 20 GB conversion's time (docs/BENCHMARKS.md).
# PyTorch reads this once, at its first large allocation; a value the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def load(path, *, dtype=None, backend: str = "auto", device: str = "cpu"):
    """Load a moefy output (standard MoE format or native) as a causal LM in eval mode."""
    from moefy.loading import load_model

    return load_model(path, dtype=dtype, backend=backend, device=device)
