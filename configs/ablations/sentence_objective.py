"""Does the sentence objective matter? None vs NSP vs SOP (ALBERT, Lan et al. 2020, Table 5).

  bertjax sweep --config configs/ablations/sentence_objective.py --workdir runs/sentence_objective
  bertjax sweep --config configs/ablations/sentence_objective.py --workdir runs/sentence_objective \
      --config.sweep.finetune.suite=configs/suites.py:local --config.sweep.finetune.seeds=2   # as measured

Each arm pretrains a tiny model on the real corpora, is evaluated on BOTH sentence tasks
(eval/nsp_accuracy, eval/sop_accuracy: the ALBERT cross-evaluation) and is fine-tuned on SST-2
(by default; with the suite, on SST-2, CoLA, CoNLL-2003 NER and UD POS, scored on held-out data).
ALBERT's finding: an NSP-trained model does SOP at chance (it learns topic, not coherence); an
SOP-trained model does NSP well. Measured here: experiments/sentence_objective/README.md.
"""

from bertjax import config as config_lib
from bertjax.sweep import Arm, product, seeds


def get_config():
    return config_lib.ablation_config("tiny")


def get_sweep():
    objectives = [Arm(objective, {"data.sentence_objective": objective}) for objective in ("none", "nsp", "sop")]
    return product(objectives, seeds(1))
