"""Post-LN (BERT) vs pre-LN (Xiong et al. 2020) LayerNorm placement.

  bertjax sweep --config configs/ablations/layer_norm.py --workdir runs/layer_norm
"""

from bertjax import config as config_lib
from bertjax.sweep import Arm, product, seeds


def get_config():
    return config_lib.ablation_config("tiny")


def get_sweep():
    placements = [Arm(placement, {"model.layer_norm": placement}) for placement in ("post", "pre")]
    return product(placements, seeds(1))
