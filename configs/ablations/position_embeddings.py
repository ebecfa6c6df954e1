"""Learned (BERT) vs sinusoidal (Vaswani et al.) position embeddings.

  bertjax sweep --config configs/ablations/position_embeddings.py --workdir runs/position_embeddings
"""

from bertjax import config as config_lib
from bertjax.sweep import Arm, product, seeds


def get_config():
    return config_lib.ablation_config("tiny")


def get_sweep():
    kinds = [Arm(kind, {"model.position_embedding": kind}) for kind in ("learned", "sinusoidal")]
    return product(kinds, seeds(1))
