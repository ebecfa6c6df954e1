"""Fine-tuning suites: the tasks every arm of a sweep is fine-tuned on, each with its own sizes.

  bertjax sweep --config configs/ablations/masking_rate.py --workdir runs/masking_rate \
      --config.sweep.finetune.suite=configs/suites.py:local

A suite is a ConfigDict of tasks: NAME -> (config = a fine-tuning config spec, settings = the keys
that task sets, nested as in the config). `sweep.finetune` applies to every task; a task's own
settings win for the keys it names, and an arm's `sweep.finetune.` keys win over both. Each task
reports its held-out score (configs/finetune.py: data.test or data.dev_split) and `sweep collect`
adds the GLUE-style mean of the tasks' primary metrics (the first of each task's task.metrics).

  local  the tasks with data under $BERTJAX_SHARED_DATA: SST-2 (accuracy), CoLA (MCC),
         CoNLL-2003 NER (entity F1, eng.testb held out), UD EWT POS (accuracy). Sized for a CPU:
         a few thousand training examples and 3 epochs each (Mosbach et al., 2021: enough steps,
         warm-up, bias-corrected AdamW; configs/finetune.py), about 2 minutes per task and seed
         for the tiny model on 2 cores.
  glue   the nine GLUE tasks, full size, for users with the GLUE data in $GLUE_DIR (SST-2 and CoLA
         are read from there too).
"""

import os

import ml_collections

GLUE = os.environ.get("GLUE_DIR", "data/glue")
FINETUNE = "configs/finetune.py"


def task(variant: str, **settings) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(config=f"{FINETUNE}:{variant}", settings=settings))


def sized(train_examples: int, seq_length: int, epochs: float = 3.0, batch_size: int = 16) -> dict:
    """A task's CPU budget: a training subset, the length, and epochs over that subset."""
    return dict(
        data=dict(max_train_examples=train_examples, max_seq_length=seq_length),
        train=dict(epochs=epochs, batch_size=batch_size, eval_every=100),
    )


def get_config(name: str = "local") -> ml_collections.ConfigDict:
    if name == "local":
        return ml_collections.ConfigDict(
            dict(
                sst2=task("sst2", **sized(4000, 64)),
                cola=task("cola", **sized(4000, 48)),
                conll2003=task("conll2003", **sized(3000, 64)),
                ud_pos=task("ud_pos", **sized(2000, 64)),
            )
        )
    if name == "glue":
        suite = {variant: task(variant) for variant in ("mnli", "qnli", "qqp", "rte", "mrpc", "stsb", "wnli")}
        suite["sst2"] = task("sst2", data=dict(train=f"{GLUE}/SST-2/train.tsv", dev=f"{GLUE}/SST-2/dev.tsv", text_a="sentence", header=True))
        suite["cola"] = task("cola", data=dict(train=f"{GLUE}/CoLA/train.tsv", dev=f"{GLUE}/CoLA/dev.tsv"))
        return ml_collections.ConfigDict(suite)
    raise ValueError(f"unknown suite {name!r}: choose local or glue")
