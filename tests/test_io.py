"""Checkpoint input forms, streaming and atomic output."""

import hashlib
import os

import pytest
import torch

from moefy.export.native import NativeFormat
from tests.conftest import REPO, assert_matches_dense, read_json, run_cli


def test_sharded_safetensors_source(tiny, tmp_path):
    src = tiny("llama", shard="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out)[0] == 0
    digests = read_json(out / "moefy.json")["source"]["weights_sha256"]
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1  # hashed while streaming, tensor by tensor: the same as hashing each whole file
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}
    assert_matches_dense(out, src)


def test_pytorch_bin_source(tiny, tmp_path):
    src = tiny("qwen2", safe=False)
    assert (src / "pytorch_model.bin").is_file() and not (src / "model.safetensors").exists()
    out = tmp_path / "out"
    code, _, err = run_cli("convert", src, "-r", "mlpmoe", "-o", out)
    assert code == 0, err
    assert_matches_dense(out, src)


def test_base_model_checkpoint_without_prefix(tiny, tmp_path):
    """GPT-2 on the hub is the bare GPT2Model: `h.0.mlp.c_fc.weight`, no `transformer.` and no tied head."""
    from safetensors.torch import load_file, save_file

    src = tiny("gpt2", n_inner=128)
    tensors = load_file(src / "model.safetensors")
    save_file({name.removeprefix("transformer."): t for name, t in tensors.items() if name != "lm_head.weight"},
              src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = run_cli("convert", src, "-r", "mlpmoe", "-o", out)
    assert code == 0, err
    assert_matches_dense(out, src)


def test_missing_shard_is_bad_input(tiny, tmp_path):
    src = tiny("llama", shard="40KB")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, _, err = run_cli("convert", src, "-r", "mlpmoe", "-o", tmp_path / "out")
    assert code == 2 and "missing" in err


def test_failed_convert_leaves_nothing(tiny, tmp_path, monkeypatch):
    src = tiny("llama")
    out = tmp_path / "out"

    def boom(self, out_dir):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(NativeFormat, "write_files", boom)
    with pytest.raises(RuntimeError):
        from moefy.convert import convert
        from moefy.recipe import load_recipe

        convert(str(src), load_recipe("mlpmoe"), out, fmt="native")
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if "moefy-tmp" in p] == []


def test_dry_run_writes_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_cli("convert", tiny("llama"), "-r", "mlpmoe-fade", "-o", out, "--dry-run")
    assert code == 0 and '"format": "native"' in stdout
    assert not out.exists()


def test_bfloat16_output(tiny, tmp_path):
    src = tiny("llama")
    out = tmp_path / "out"
    assert run_cli("convert", src, "-r", "mlpmoe", "-o", out, "--dtype", "bfloat16")[0] == 0
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert read_json(out / "config.json")["dtype"] == "bfloat16"


def test_missing_parent_directories_are_created(tiny, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    assert run_cli("convert", tiny("llama"), "-r", "mlpmoe", "-o", out)[0] == 0
    assert (out / "config.json").is_file()


def test_parent_that_is_a_file_is_bad_input(tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("convert", tiny("llama"), "-r", "mlpmoe", "-o", tmp_path / "file" / "out")
    assert code == 2 and "cannot be created" in err


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")) +
                         [REPO / "examples" / name for name in ("carve-25-wide.yaml", "fit-router-64k.yaml")],
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    """Every built-in and example recipe parses and builds its transforms with validated options."""
    from moefy.recipe import load_recipe

    assert load_recipe(str(recipe)).build_transforms(seed=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("recipe", ["mlpmoe", "mlpmoe-fade", "upcycle-8x2", "upcycle-fine-32x8"])
def test_stored_dtype_path_is_byte_identical(tiny, tmp_path, monkeypatch, family, recipe):
    """Rearranging transforms run on a bf16 checkpoint's own dtype: the same bytes as through fp32."""
    from safetensors.torch import load_file, save_file

    import moefy.convert

    src = tiny(family, **({"n_inner": 128} if family == "gpt2" else {}))
    tensors = load_file(src / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in tensors.items()}, src / "model.safetensors", metadata={"format": "pt"})
    assert run_cli("convert", src, "-r", recipe, "-o", tmp_path / "stored")[0] == 0
    upcast = moefy.convert.mlp_from_tensors
    monkeypatch.setattr(moefy.convert, "mlp_from_tensors", lambda info, t, upcast_=True, **_: upcast(info, t))
    assert run_cli("convert", src, "-r", recipe, "-o", tmp_path / "fp32")[0] == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "stored" / name).read_bytes() == (tmp_path / "fp32" / name).read_bytes()
