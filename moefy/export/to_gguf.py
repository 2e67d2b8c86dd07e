"""`moefy export-gguf`: a moefy output written as one GGUF file that llama.cpp loads, with no second converter.

The decoder (embeddings, attention, norms) is the Llama family's in every architecture written here, so it is
mapped once below; what is specific to a format — llama.cpp's architecture name, its MoE tensors, its extra
keys — the format declares (`ExportFormat.gguf_arch`, `gguf_layer`, `gguf_metadata`). Tokenizer metadata is
carried verbatim from a GGUF of the same tokenizer: the source itself when it was a `.gguf` (or `demo`), else
`--tokenizer-from`. Tensors are written one at a time (peak memory: one layer's experts), to a `.partial` file
beside the target that is renamed only when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from moefy.errors import BadInput
from moefy.io.checkpoint import Checkpoint, demo_gguf_path
from moefy.io.gguf_file import check_gguf
from moefy.io.output import Inputs, is_moefy_output
from moefy.progress import log, progress

DTYPES = ("f32", "f16", "bf16")
MARK_KEY = "moefy.recipe"  # written into every GGUF moefy exports: only such a file is replaced with --force
# (HF name inside a decoder layer, llama.cpp name): the Llama family's attention and norms
DECODER_TENSORS = (("input_layernorm.weight", "attn_norm.weight"), ("self_attn.q_proj.weight", "attn_q.weight"),
                   ("self_attn.k_proj.weight", "attn_k.weight"), ("self_attn.v_proj.weight", "attn_v.weight"),
                   ("self_attn.o_proj.weight", "attn_output.weight"),
                   ("post_attention_layernorm.weight", "ffn_norm.weight"))


def rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' rotate-half order into the interleaved order llama.cpp's rope reads (the
    permutation llama.cpp's converter applies; transformers undoes it when it reads a GGUF)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def default_target(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".gguf")


def export_gguf(out: Path, target: Path | None = None, *, dtype: str = "f32", tokenizer_from: Path | None = None,
                force: bool = False) -> Path:
    """Write the moefy output OUT as a GGUF file (default: OUT.gguf beside it); return its path."""
    try:
        import gguf  # noqa: F401 - checked first, so a missing package is one clear message
    except ImportError:
        raise BadInput("writing GGUF needs the `gguf` package: pip install gguf (or moefy[gguf]).") from None
    out = Path(out)
    target = Path(target) if target is not None else default_target(out)
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype!r} is not one GGUF is written in here; choose one of {', '.join(DTYPES)}.")
    if not is_moefy_output(out):
        raise BadInput(f"{out} is not a moefy output (no moefy.json written by moefy). Convert a model first: "
                       f"`moefy convert SOURCE -r RECIPE -o {out}`.")
    record = json.loads((out / "moefy.json").read_text())
    fmt = _format(record, out)
    checkpoint = Checkpoint(out)
    config = checkpoint.config
    _check_decoder(config, out)
    vocab_gguf = _tokenizer_source(record, tokenizer_from)
    inputs = Inputs()
    inputs.add(out, "the moefy output")
    inputs.add(vocab_gguf, "the tokenizer's GGUF")
    inputs.check_target(target, "--output")
    _check_replaceable(target, force)
    tokenizer = _tokenizer_fields(vocab_gguf, config["vocab_size"])

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        _write(partial, fmt, checkpoint, config, record, dtype, tokenizer)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    log(f"wrote {target} ({fmt.gguf_arch}, {dtype}, {target.stat().st_size / 2**20:.1f} MiB)")
    return target


def _format(record: dict, out: Path):
    from moefy.export import FORMATS

    name = (record.get("format") or {}).get("name")
    fmt = FORMATS.get(name)
    if fmt is None or fmt.gguf_arch is None:
        writable = ", ".join(f.name for f in FORMATS.values() if f.gguf_arch)
        raise BadInput(f"{out} is in the {name} format, which has no llama.cpp architecture moefy writes. GGUF is "
                       f"written from {writable} outputs: convert with `--format` one of them (`moefy inspect "
                       f"SOURCE --recipe R` lists which hold the model).")
    return fmt


def _check_decoder(config: dict, out: Path) -> None:
    """The decoder features llama.cpp's Llama-family graphs read from the keys written here."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise BadInput(f"{out}/config.json uses {rope['rope_type']} RoPE scaling, which `moefy export-gguf` does "
                       f"not write yet; convert OUT with llama.cpp's convert_hf_to_gguf.py instead.")
    if config.get("sliding_window") and config["sliding_window"] < config.get("max_position_embeddings", 0):
        raise BadInput(f"{out}/config.json has sliding-window attention ({config['sliding_window']}), which "
                       f"llama.cpp's Llama graph does not apply; export-gguf would change the model.")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise BadInput(f"{out}/config.json has biases llama.cpp's Llama graph does not read.")


def _tokenizer_source(record: dict, tokenizer_from: Path | None) -> Path:
    if tokenizer_from is not None:
        path = Path(tokenizer_from)
        if not path.is_file() or path.suffix != ".gguf":
            raise BadInput(f"--tokenizer-from {path} is not a .gguf file. Give a GGUF of the source model (e.g. "
                           f"one written by llama.cpp's converter) to carry its tokenizer from.")
        return path
    origin = record["source"]["origin"]
    if origin == "demo":
        return demo_gguf_path()
    if origin.endswith(".gguf") and Path(origin).is_file():
        return Path(origin)
    raise BadInput(f"the source of this output ({origin}) is not a GGUF file, so there is no llama.cpp tokenizer "
                   f"to carry over. Pass --tokenizer-from FILE.gguf (any GGUF of the same tokenizer, e.g. the dense "
                   f"model converted by llama.cpp's convert_hf_to_gguf.py).")


def _check_replaceable(target: Path, force: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise BadInput(f"--output {target} already exists. Pass --force to replace it (only a GGUF moefy wrote is "
                       f"ever replaced), or choose another path.")
    try:
        ours = target.is_file() and MARK_KEY in check_gguf(target)
    except BadInput:
        ours = False
    if not ours:
        raise BadInput(f"--output {target} exists and is not a GGUF moefy wrote, so --force will not replace it. "
                       f"Move it away or choose another path.")


def _tokenizer_fields(path: Path, vocab_size: int) -> list[tuple[str, object, object, object]]:
    """(key, value, type, item type) of every `tokenizer.*` key of the GGUF at `path`."""
    from gguf import GGUFReader, GGUFValueType

    check_gguf(path)
    fields = []
    for name, field in GGUFReader(str(path)).fields.items():
        if name.startswith("tokenizer."):
            array = field.types[0] == GGUFValueType.ARRAY
            fields.append((name, field.contents(), field.types[0], field.types[-1] if array else None))
    tokens = next((value for name, value, _, _ in fields if name == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise BadInput(f"{path} has no tokenizer (tokenizer.ggml.tokens); give a GGUF that holds one with "
                       f"--tokenizer-from.")
    if len(tokens) != vocab_size:
        raise BadInput(f"{path}'s tokenizer has {len(tokens)} tokens, but the model's vocabulary is {vocab_size}: "
                       f"it is not this model's tokenizer. Give the source model's GGUF with --tokenizer-from.")
    return fields


def _tensor_plan(fmt, checkpoint: Checkpoint, config: dict) -> list[tuple[str, tuple[int, ...], object]]:
    """[(llama.cpp name, shape, read() → tensor)] in file order: the header needs every shape before any data,
    so reads are deferred and each tensor is read once, when its bytes are written."""
    heads = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}
    get, shape = checkpoint.get, checkpoint.shape
    names = [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight")]
    if not config.get("tie_word_embeddings") and checkpoint.has("lm_head.weight"):
        names.append(("output.weight", "lm_head.weight"))
    plan = [(name, shape(hf), lambda hf=hf: get(hf)) for name, hf in names]
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        for hf, name in DECODER_TENSORS:
            plan.append((f"blk.{i}.{name}", shape(f"{layer}.{hf}"),
                         lambda hf=f"{layer}.{hf}", p=heads.get(name): rope_permute(get(hf), p) if p else get(hf)))
        plan += [(f"blk.{i}.{name}.weight", size, read)
                 for name, (size, read) in fmt.gguf_layer(checkpoint, layer, config).items()]
    return plan


def _metadata(writer, fmt, config: dict, record: dict, dtype: str) -> None:
    import gguf

    rope = config.get("rope_parameters") or {}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_name(f"{record['recipe']['name']} of {Path(record['source']['origin']).name}")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_feed_forward_length(config[fmt.width_key])
    writer.add_expert_count(config[fmt.num_experts_key])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    fmt.gguf_metadata(writer, config)
    writer.add_string(MARK_KEY, record["recipe"]["name"])


def _write(path: Path, fmt, checkpoint: Checkpoint, config: dict, record: dict, dtype: str, tokenizer) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), fmt.gguf_arch)
    _metadata(writer, fmt, config, record, dtype)
    for key, value, kind, item in tokenizer:
        writer.add_key_value(key, value, kind, sub_type=item)
    plan = _tensor_plan(fmt, checkpoint, config)
    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}
    for name, shape, _ in plan:
        kind = _stored_kind(name, shape, dtype)
        writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * (4 if kind == "f32" else 2),
                               raw_dtype=types[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with progress(f"writing {len(plan)} tensors", len(plan)) as advance:
        for name, shape, read in plan:
            tensor = read()
            if tuple(tensor.shape) != tuple(shape):
                raise BadInput(f"{name} read as {tuple(tensor.shape)}, not the {tuple(shape)} its header says: "
                               f"the output changed while it was exported. Export it again.")
            writer.write_tensor_data(_stored(tensor, _stored_kind(name, shape, dtype)))
            advance()
    writer.close()


def _stored_kind(name: str, shape: tuple[int, ...], dtype: str) -> str:
    """Norms and routers stay f32 in every file type, as llama.cpp's converter keeps them."""
    return "f32" if len(shape) == 1 or name.endswith("ffn_gate_inp.weight") else dtype


def _stored(tensor: torch.Tensor, kind: str) -> np.ndarray:
    tensor = tensor.detach().contiguous()
    if kind == "f32":
        return tensor.float().numpy()
    if kind == "f16":
        return tensor.half().numpy()
    return tensor.bfloat16().view(torch.int16).numpy()  # bf16 bits, as GGUF stores them
