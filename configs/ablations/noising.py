"""Which corruption teaches a seq2seq model most? BART's five alone, and infilling + permutation (Lewis et al., 2020, Table 1).

  bertjax sweep --config configs/ablations/noising.py --workdir runs/noising
  bertjax sweep --config configs/ablations/noising.py --workdir runs/noising \
      --config.sweep.task=configs/finetune.py:xquad_qg        # + question generation from each arm

Six arms of the tiny seq2seq model (configs/seq2seq.py:tiny: 2+2 layers, H128) under one budget:
the shipped ablations' real corpora, data seed, steps and schedule (`config.ablation_config`), one
pretraining seed each. Each arm switches on one corruption at BART's rate (`config.noising_config`):
token masking 30%, token deletion 30%, text infilling 30% (Poisson(3) spans), sentence permutation
(a full shuffle), document rotation; the sixth is BART's best, infilling + permutation. The held-out
documents are corrupted with each arm's own corruption, so eval/loss (the reconstruction loss) says
how well each arm learned its own task, not which is the better teacher; the downstream score is
what compares them. BART's Table 1 direction: infilling is the strongest single corruption,
permutation and rotation alone are weak.

Downstream, question generation (`configs/finetune.py:xquad_qg`) runs only when asked, as above or
through a suite (`--config.sweep.finetune.suite=SPEC`): `sweep.task` is '' here, because the shipped
ablations' default (SST-2, a BERT classifier) cannot start from an encoder-decoder. `sweep.finetune`
keeps only the number of seeds, so the task's own sizes apply. As measured on 2 CPU cores (1 h 40 min,
two arms at a time; the answer is in experiments/noising/README.md):

  bertjax sweep --config configs/ablations/noising.py --workdir runs/noising \
      --config.sweep.task=configs/finetune.py:xquad_qg --config.sweep.finetune.seeds=1 --config.train.total_steps=300
"""

from bertjax import config as config_lib
from bertjax.sweep import Arm, product, seeds

ARMS = {
    "masking": ("masking",),
    "deletion": ("deletion",),
    "infilling": ("infilling",),
    "permutation": ("permutation",),
    "rotation": ("rotation",),
    "infilling_permutation": ("infilling", "permutation"),
}


def get_config():
    config = config_lib.ablation_config("tiny")
    seq2seq = config_lib.load("configs/seq2seq.py:tiny")
    config.model = seq2seq.model
    config.data.sentence_objective = seq2seq.data.sentence_objective
    config.data.noising = seq2seq.data.noising
    config.train.label_smoothing = seq2seq.train.label_smoothing
    config.sweep.task = ""
    config.sweep.finetune = dict(seeds=3, suite="")
    return config


def get_sweep():
    # Each arm sets the five rates only: shared settings (poisson_lambda, whole_word) stay overridable for all arms.
    rates = {name: config_lib.noising_config(*on) for name, on in ARMS.items()}
    corruptions = [Arm(name, {f"data.noising.{key}": rates[name][key] for key in config_lib.CORRUPTIONS}) for name in ARMS]
    return product(corruptions, seeds(1))
