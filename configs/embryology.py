r"""Embryology (Chiang et al., 2020): what a pretraining run knows at each kept checkpoint.

  bertjax pretrain --config configs/pretrain.py:mini --workdir runs/mini --config.checkpoint.keep_log=16
  bertjax embryology --workdir runs/mini                                  # -> runs/mini/embryology
  bertjax embryology --workdir runs/a,runs/b --out runs/cmp               # several runs, overlaid
  bertjax embryology --workdir runs/mini --watch                          # follows a run as it trains
  bertjax embryology --workdir runs/mini --config.probes.ner.enabled=False --config.downstream.enabled=True

Every measure can be switched off (`--config.MEASURE.enabled=False`). Data paths are relative to
$BERTJAX_SHARED_DATA (default ../shared/data), as configs/finetune.py finds them; point a measure at
another file with `--config.pos.conllu=PATH` or `--config.probes.TASK.train=PATH` / `.test=PATH`.
On a tiny run with 16 kept checkpoints, measures 1-3 take a few minutes on 2 CPU cores
(experiments/embryology/README.md has the measured figures).
"""

import ml_collections

from bertjax import config as config_lib
from bertjax.embryology import probes as probes_lib

UD = "ud-english-ewt/en_ewt-ud-{}.conllu"


def get_config():
    config = ml_collections.ConfigDict()
    # Measure 1: token reconstruction (nothing masked) and masked-word prediction, by UPOS tag.
    config.pos = ml_collections.ConfigDict(
        dict(
            enabled=True,
            conllu=config_lib.shared_data_path(UD.format("test")),
            tag_column=3,  # CoNLL-U column: 3 = UPOS, 4 = XPOS
            max_sentences=400,  # a seeded sample of the file's sentences; 0 = all of them
            max_seq_length=128,
            mask_rate=0.15,  # of a sentence's words masked at once (never two neighbours); every word once
            seed=0,
            batch_size=32,
            # The paper's comparison: do function-word classes plateau before content words?
            function_tags=("DET", "ADP", "CCONJ", "PUNCT"),
            content_tags=("NOUN", "VERB", "ADJ", "PROPN"),
        )
    )
    # Measure 2: layer-wise softmax probes on frozen features, with control tasks (Hewitt & Liang, 2019).
    config.probes = ml_collections.ConfigDict(
        dict(
            enabled=True,
            **probes_lib.DEFAULTS,  # sample sizes, the probes' optimiser budget, seed (bertjax/embryology/probes.py)
            # Tasks: kind token|sentence; files read by suffix (.conllu, .tsv with text/label header, else CoNLL-2003).
            pos=dict(enabled=True, kind="token", train=config_lib.shared_data_path(UD.format("dev")), test=config_lib.shared_data_path(UD.format("test")), metric="accuracy"),
            ner=dict(
                enabled=True,
                kind="token",
                train=config_lib.shared_data_path("conll2003/eng.train"),
                test=config_lib.shared_data_path("conll2003/eng.testa"),
                metric="entity_f1",
            ),
            sst2=dict(
                enabled=True,
                kind="sentence",
                train=config_lib.shared_data_path("glue/SST-2/train.tsv"),
                test=config_lib.shared_data_path("glue/SST-2/dev.tsv"),
                metric="accuracy",
            ),
        )
    )
    # Measure 3: linear CKA (Kornblith et al., 2019) of each layer against the final and the previous step.
    config.cka = ml_collections.ConfigDict(
        dict(enabled=True, conllu=config_lib.shared_data_path(UD.format("test")), max_tokens=2000, max_seq_length=128, seed=0, batch_size=32)
    )
    # Measure 4 (slow, off by default): `bertjax finetune` from chosen checkpoints.
    config.downstream = ml_collections.ConfigDict(
        dict(
            enabled=False,
            tasks=("sst2",),  # variants of configs/finetune.py
            steps=(),  # () = every studied step (step 0 included); else these steps where present
            seeds=1,
            # Extra overrides for every fine-tuning run, e.g. ("--config.train.total_steps=300",).
            overrides=("--config.train.epochs=0", "--config.train.total_steps=300", "--config.data.max_train_examples=8000"),
        )
    )
    # Measure 5: the run's own metrics.jsonl (MLM loss and accuracy, NSP/SOP accuracy) at the studied steps.
    config.metrics = ml_collections.ConfigDict(dict(enabled=True))
    # --watch: how often to look for a new checkpoint.
    config.watch = ml_collections.ConfigDict(dict(poll_seconds=60.0))
    # Comparisons between runs that differ in more than the seed: the paired multi-bootstrap.
    config.compare = ml_collections.ConfigDict(dict(num_samples=1000, confidence=0.95, seed=0))
    config.plots = True
    return config
