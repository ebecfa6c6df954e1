"""Logical axis names (the T5X/MaxText vocabulary) that parameters and activations carry.

The model annotates with these names only; `bertjax.train.partitioning` maps them to the mesh
axes `data`, `fsdp` and `tensor` through a rule table chosen by the config.
"""

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"  # the hidden size
MLP = "mlp"  # the feed-forward width
HEADS = "heads"
KV = "kv"  # the size of one attention head
VOCAB = "vocab"
TYPES = "types"  # segment (token type) vocabulary
POSITIONS = "positions"
CLASSES = "classes"
LAYERS = "layers"
