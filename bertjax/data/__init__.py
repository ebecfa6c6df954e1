"""Pretraining data: tokenizer, corpora, instances, masking and the grain loader.

`batches(config, split)` is the contract the trainer relies on (DESIGN.md): an iterator of dicts
of fixed-shape int32 numpy arrays.
"""


def batches(config, split: str = "train", **kwargs):
    from bertjax.data import loader

    return loader.batches(config, split, **kwargs)
