"""The 80/10/10 rule: BERT's Table 8 (mask / random / keep the chosen tokens).

  bertjax sweep --config configs/ablations/mask_random_keep.py --workdir runs/mask_random_keep \
      --config.sweep.finetune.suite=configs/suites.py:local --config.sweep.finetune.seeds=2

BERT found 80/10/10 best for fine-tuning and 100/0/0 worst for feature-based use (the model never
sees [MASK] at fine-tuning time). Measured here: experiments/mask_random_keep/README.md.
"""

from bertjax import config as config_lib
from bertjax.sweep import Arm, product, seeds

SPLITS = {"80-10-10": (0.8, 0.1, 0.1), "100-0-0": (1.0, 0.0, 0.0), "80-0-20": (0.8, 0.0, 0.2), "80-20-0": (0.8, 0.2, 0.0)}


def get_config():
    return config_lib.ablation_config("tiny")


def get_sweep():
    splits = [
        Arm(name, {"data.masking.mask": mask, "data.masking.random": random, "data.masking.keep": keep})
        for name, (mask, random, keep) in SPLITS.items()
    ]
    return product(splits, seeds(1))
