"""Sequential layer-by-layer calibration (GPTQ / llm-compressor style), memory bounded by one layer.

The model is built on the meta device; only the embeddings, the rotary tables and the layer being
processed hold real weights.  One forward through identity "catchers" records what the model's own
code passes to each decoder layer (masks, position embeddings), so no architecture's forward is
re-implemented here.  Then, layer by layer: load its weights, run every calibration sample with the
MLP swapped for a probe that records its input and adds nothing, hand those inputs to the
transforms, and add the *transformed* MLP's output back (sequential mode: later layers see earlier
layers' errors) or the dense MLP's (independent mode).  What a layer does to the MLP output before
the residual add (Gemma 2/3 and OLMo 2 normalise it, Granite scales it) is the adapter's
`mlp_output`, applied in `advance`; the probe's zero output passes through it as zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moefy.arch.base import ArchAdapter
from moefy.errors import BadInput
from moefy.io.checkpoint import Checkpoint


class _Probe(nn.Module):
    """Stands in for a layer's MLP: records its input and contributes nothing to the residual stream."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x)
        return torch.zeros_like(x)


class _Catcher(nn.Module):
    """Stands in for a decoder layer during the first pass: records its call and passes x through."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        if hasattr(layer, "attention_type"):  # models pick each layer's mask by it (sliding vs full)
            self.attention_type = layer.attention_type
        self.calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def forward(self, hidden_states, *args, **kwargs):  # GPT-2 passes the cache and mask positionally
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


class LayerwiseRunner:
    """Calibration tokens through the model one decoder layer at a time.

    Per layer: `mlp_inputs(i)` → [T, H] fp32 inputs of layer i's MLP for all T calibration tokens,
    then `advance(mlp)` with the function whose output continues to layer i+1.
    """

    def __init__(self, ckpt: Checkpoint, adapter: ArchAdapter, batches: list[torch.Tensor], device: str = "cpu"):
        """`batches`: token ids [b, L] each (the lengths may differ between batches)."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        from moefy.io.layout import meta_model

        self.ckpt, self.adapter, self.device = ckpt, adapter, torch.device(device)
        # sdpa where the family has it (Gemma 2 does not: soft-capping), the family's eager attention otherwise
        config_class = type(AutoConfig.for_model(ckpt.config["model_type"]))
        sdpa = MODEL_FOR_CAUSAL_LM_MAPPING[config_class]._supports_sdpa
        self._model = meta_model(ckpt.config, "sdpa" if sdpa else "eager")  # eval mode: no dropout
        layers = self._model.get_submodule(adapter.layers_prefix)
        self._meta_layers = list(layers)
        catchers = [_Catcher(layer) for layer in layers]
        for i, catcher in enumerate(catchers):
            layers[i] = catcher
        base_name = adapter.layers_prefix.rsplit(".", 1)[0]
        base = self._model.get_submodule(base_name)
        self._materialize(base, base_name, skip=adapter.layers_prefix)
        with torch.inference_mode():
            for batch in batches:
                base(input_ids=batch.to(self.device))
        self._hidden = [h for h, _, _ in catchers[0].calls]
        self._arguments = [[(args, kw) for _, args, kw in c.calls] for c in catchers]
        self.lengths = [batch.numel() for batch in batches]  # tokens per batch, in mlp_inputs order
        self._layer: nn.Module | None = None
        self._partial: list[torch.Tensor] = []
        self._inputs: list[torch.Tensor] = []

    def _materialize(self, module: nn.Module, prefix: str, skip: str | None = None) -> None:
        """Give a meta module real fp32 storage: the model's own init (rotary tables, embedding scales),
        then the checkpoint's tensors. Submodules under `skip` stay on meta."""
        def skipped(name: str) -> bool:
            full = f"{prefix}.{name}" if name else prefix
            return skip is not None and (full == skip or full.startswith(skip + "."))

        for name, child in module.named_modules():
            if not skipped(name):
                child.to_empty(device=self.device, recurse=False)
                self._model._init_weights(child)
        missing = []
        with torch.no_grad():
            for name, param in module.named_parameters():
                if skipped(name.rsplit(".", 1)[0]):
                    continue
                full = f"{prefix}.{name}"
                if not self.ckpt.has(full):
                    missing.append(full)
                    continue
                tensor = self.ckpt.get(full)
                if tensor.shape != param.shape:
                    raise BadInput(f"{self.ckpt.path}: {full} has shape {tuple(tensor.shape)}, the config implies "
                                   f"{tuple(param.shape)}. The checkpoint and its config.json disagree.")
                param.copy_(tensor)
        if missing:
            raise BadInput(f"{self.ckpt.path} lacks {missing[0]!r} (and {len(missing) - 1} more), needed to run "
                           f"the model on calibration data. The checkpoint is incomplete.")

    def mlp_inputs(self, index: int) -> torch.Tensor:
        """Run layer `index` on every sample with its MLP replaced by a probe; [T, H] MLP inputs."""
        layer = self._meta_layers[index]
        self._materialize(layer, f"{self.adapter.layers_prefix}.{index}", skip=self._mlp_path(index))
        probe = _Probe()
        setattr(layer, self.adapter.mlp_attr, probe)
        with torch.inference_mode():
            outs = [layer(h, *args, **kw) for h, (args, kw) in zip(self._hidden, self._arguments[index])]
        self._partial = [o[0] if isinstance(o, tuple) else o for o in outs]
        self._inputs = probe.inputs
        self._layer = layer
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in self._inputs]).cpu()

    def advance(self, mlp: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Finish the current layer with `mlp` ([N, H] → [N, H]) and free its weights."""
        post = self.adapter.mlp_output or (lambda layer, y: y)
        with torch.inference_mode():
            self._hidden = [p + post(self._layer, mlp(x.reshape(-1, x.shape[-1]).cpu()).to(p.device).view_as(x))
                            for p, x in zip(self._partial, self._inputs)]
        self._layer.to("meta")
        self._layer = None
        self._partial, self._inputs = [], []

    def _mlp_path(self, index: int) -> str:
        return f"{self.adapter.layers_prefix}.{index}.{self.adapter.mlp_attr}"
