"""What does the masking rate do? 10% / 15% (BERT) / 20% / 30% / 40% (Wettig et al. 2023).

  bertjax sweep --config configs/ablations/masking_rate.py --workdir runs/masking_rate
  bertjax sweep --config configs/ablations/masking_rate.py --workdir runs/masking_rate \
      --config.sweep.finetune.suite=configs/suites.py:local --config.sweep.finetune.seeds=2   # as measured

All arms see the same data order (one data seed) and are evaluated with the same fixed 15% eval
masking, so eval/mlm_accuracy is comparable across arms; then each is fine-tuned on SST-2 (by default; with the
suite, on SST-2, CoLA, CoNLL-2003 NER and UD POS, scored on held-out data).
`data.max_predictions` grows with the rate (at least BERT's 20 at length 128): with a fixed cap of 20,
every rate above 15% would mask the same ~16% of a full-length sequence.
Measured here: experiments/masking_rate/README.md.
"""

import math

from bertjax import config as config_lib
from bertjax.sweep import Arm, product, seeds

RATES = (0.10, 0.15, 0.20, 0.30, 0.40)


def get_config():
    return config_lib.ablation_config("tiny")


def get_sweep():
    length = get_config().data.max_seq_length
    rates = [
        Arm(f"rate{round(rate * 100)}", {"data.masking.rate": rate, "data.max_predictions": max(20, math.ceil(rate * length))})
        for rate in RATES
    ]
    return product(rates, seeds(1))
