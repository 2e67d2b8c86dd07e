from moefy.arch.base import ArchAdapter

# non-gated MLP with biases; the parallel residual (x + attn(ln1 x) + mlp(ln2 x)) needs nothing from the adapter
ADAPTER = ArchAdapter("gpt_neox", layers_prefix="gpt_neox.layers", gate=None, up="dense_h_to_4h",
                      down="dense_4h_to_h", bias=True, lm_head="embed_out.weight")
