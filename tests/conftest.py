"""Tiny random models built in the test, so the suite runs in seconds without downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter on CPU (read at import time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# config overrides that make each tiny model exercise its family's specifics
FAMILY_CONFIGS = {
    "gemma": dict(head_dim=16),  # GeGLU (tanh GELU), √H embedding scale
    "gemma2": dict(head_dim=16, sliding_window=8),  # pre/post-FFN norms, soft-capping, sliding layers, eager attention
    "gemma3_text": dict(head_dim=16, sliding_window=8),  # sliding/global layers, q/k norms
    "olmo2": {},  # post-norms, q/k norms
    "phi3": dict(pad_token_id=0),  # one fused gate_up_proj
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0, attention_multiplier=0.3),
    "gpt2": dict(n_inner=128),  # Conv1D weights, non-gated GELU MLP with biases, learned positions
    "gpt_neox": {},  # parallel attention + MLP, non-gated with biases, partial rotary
}
STANDARD_FORMATS = {"llama": ("mixtral", "granitemoeshared", "qwen2_moe"), "mistral": ("mixtral",),
                    "qwen2": ("qwen2_moe",), "qwen3": ("qwen3_moe",)}


def char_tokenizer():
    """A character-level fast tokenizer (ASCII printable → ids 1..95), enough for perplexity tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{chr(c): c - 31 for c in range(32, 127)}, "\n": 96}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def make_tiny(path: Path, model_type: str = "llama", *, safe: bool = True, shard: str | None = None,
              **overrides) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True, max_position_embeddings=256)
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and biases (not their 1 / 0 init), so a test sees if one is lost
        for name, p in model.named_parameters():
            if "norm" in name or name.split(".")[-2].startswith("ln_"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    if not safe:  # the legacy pickle format, which transformers 5 no longer writes itself
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    GenerationConfig(bos_token_id=1, eos_token_id=2, temperature=0.7, do_sample=True).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny(tmp_path):
    """Factory: tiny(model_type, **config overrides) → saved model dir."""
    counter = iter(range(1000))

    def build(model_type: str = "llama", **kwargs) -> Path:
        return make_tiny(tmp_path / f"{model_type}-{next(counter)}", model_type, **kwargs)

    return build


@pytest.fixture
def text_file(tmp_path):
    text = ("The quick brown fox jumps over the lazy dog. " * 8 + "\n") * 20
    path = tmp_path / "text.txt"
    path.write_text(text)
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids).logits
    return out if out.dtype == torch.float64 else out.float()


def random_ids(vocab: int = 128, batch: int = 2, length: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_dense(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_matches_dense(out: Path, dense: Path, ids: torch.Tensor | None = None) -> None:
    """moefy.load(OUT) gives the dense model's fp32 logits within 1e-5 (the exactness bar)."""
    import moefy

    ids = random_ids() if ids is None else ids
    torch.testing.assert_close(logits(moefy.load(out), ids), logits(load_dense(dense), ids), atol=1e-5, rtol=0)


def run_cli(*args: str):
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from moefy.cli import app

    result = CliRunner().invoke(app, ["-q", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
