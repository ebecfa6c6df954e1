r"""Fine-tuning on a downstream task: one variant per task, the four task families of the BERT paper.

  bertjax finetune --config configs/finetune.py:sst2 --workdir runs/sst2 --config.init_from=runs/tiny
  bertjax finetune --config configs/finetune.py:conll2003 --workdir runs/ner --config.finetune.regime=features \
      --config.finetune.features=scalar_mix --config.init_from=runs/tiny
  bertjax finetune --config configs/finetune.py:cola --workdir runs/cola --config.seeds=5 --config.init_from=HF_DIR
  bertjax finetune --config configs/finetune.py:xquad_qg --workdir runs/qg --config.init_from=runs/s2s-tiny

Variants: sst2, cola, mnli (matched dev; mismatched dev as `mismatched/...`), qnli, rte, mrpc,
qqp, stsb (regression), wnli, conll2003 (NER), ud_pos (UD EWT UPOS), squad (v1.1), squad_v2,
xquad (the shared XQuAD file as SQuAD v1.1), xquad_qg (question generation, below), chnsenticorp. Data paths are relative to
$BERTJAX_SHARED_DATA (default ../shared/data) for the data sets shipped there and to
$GLUE_DIR / $SQUAD_DIR (default data/glue, data/squad) for the others; override with
--config.data.train=... --config.data.dev=... (a path or 'tfds:NAME[:SPLIT]'; dev's split defaults to
'validation'; with TFDS, text_a/text_b/label name its features, e.g. for glue/sst2
--config.data.text_a=sentence, for conll2003 --config.data.text_a=tokens --config.data.label=ner).

Each run writes WORKDIR/results.json: every metric's mean, std, median and per-seed values on the
dev set at each seed's best evaluation step, and (`test`) on the held-out set at that step: CoNLL-2003
holds out eng.testb (data.test); the GLUE tasks and UD POS, whose test labels are not here, hold
out half their dev (test) set (data.dev_split=0.5) and select on the other half. Seeds that
collapsed to the majority class are listed in `failed_seeds`.

Defaults follow the fine-tuning stability literature (Mosbach et al., 2021; Dodge et al., 2020):
AdamW with bias correction (optax's), linear warm-up over 10% of the steps then linear decay,
gradient clipping at 1, and 3 epochs; with a few thousand examples, train for more steps rather
than with a larger learning rate. From a random init (no init_from, logged as a
warning) a small model beats SST-2's majority class (50.9%): this gave 65.8-66.5% accuracy on the
whole dev set over seeds 0-3 (measured before dev_split; the held-out half is checked against the
majority class in tests/test_finetune.py), about 25 s a seed on 2 CPU cores:

  bertjax finetune --config configs/finetune.py:sst2 --workdir runs/sst2-scratch --config.seeds=4 \
      --config.data.max_train_examples=3000 --config.data.max_seq_length=48 --config.model.hidden_size=64 \
      --config.model.intermediate_size=256 --config.model.vocab_size=1000 --config.train.batch_size=16 \
      --config.train.epochs=2 --config.optim.lr=1e-3

xquad_qg is question generation (family seq2seq): an encoder-decoder reads `[CLS] answer [SEP]
passage window [SEP]` (the window centred on the answer) and generates the question; init_from is a
seq2seq pretraining run (`bertjax pretrain --config configs/seq2seq.py:tiny`), or none: a tiny
encoder-decoder from scratch (model = configs/seq2seq.py's tiny) with the tokenizer of
data.tokenizer, else one trained on the training passages and questions. The one XQuAD file is cut by
passage (data.passage_split: 70% train, 15% dev to select the step, 15% held out; fixed seed), so no
passage is in two parts. Generated questions (config.generation: greedy, or beam search with
num_beams > 1) are scored with ROUGE-L F (rouge-score; it selects the step: smoother than BLEU on a
few hundred questions) and corpus BLEU (sacrebleu). Scratch vs pretrained, measured:
experiments/question_generation/README.md.
"""

import os

import ml_collections

from bertjax import config as config_lib
from bertjax.models import seq2seq

SHARED = os.environ.get("BERTJAX_SHARED_DATA", "../shared/data")
GLUE = os.environ.get("GLUE_DIR", "data/glue")
SQUAD = os.environ.get("SQUAD_DIR", "data/squad")

# The GLUE tasks in GLUE's own TSV layout: (directory, text_a, text_b, label, metrics, dev file).
# Adding a GLUE-format task is one more line here.
GLUE_TASKS = {
    "mnli": ("MNLI", "sentence1", "sentence2", "gold_label", ("accuracy",), "dev_matched.tsv"),
    "qnli": ("QNLI", "question", "sentence", "label", ("accuracy",), "dev.tsv"),
    "rte": ("RTE", "sentence1", "sentence2", "label", ("accuracy",), "dev.tsv"),
    "mrpc": ("MRPC", "#1 String", "#2 String", "Quality", ("f1", "accuracy"), "dev.tsv"),
    "qqp": ("QQP", "question1", "question2", "is_duplicate", ("f1", "accuracy"), "dev.tsv"),
    "stsb": ("STS-B", "sentence1", "sentence2", "score", ("pearson", "spearman"), "dev.tsv"),
    "wnli": ("WNLI", "sentence1", "sentence2", "label", ("accuracy",), "dev.tsv"),
}


def base_config(size: str = "tiny") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = config_lib.model_config(size)
    config.optim = config_lib.optim_config()
    config.optim.lr = 1e-4 if size in ("base", "large") else 5e-4
    config.optim.warmup_steps = 0
    config.optim.warmup_fraction = 0.1  # of the run's steps (warmup_steps > 0 wins)
    config.mesh = config_lib.mesh_config()
    config.checkpoint = config_lib.checkpoint_config()
    config.data = ml_collections.ConfigDict(
        dict(
            train="",
            dev="",  # selects the step (and, with dev_split, also gives the held-out part)
            test="",  # a labelled held-out set, scored once at the dev-selected step ('' = none)
            # Without data.test: this fraction of dev (a fixed seed) is held out and reported; the
            # rest selects. 0 = no held-out score (results then hold the dev score at its best step).
            dev_split=0.0,
            # More dev sets scored at the end with the best parameters, as NAME/metric (MNLI mismatched).
            other_dev=ml_collections.ConfigDict(),
            format="tsv",  # tsv | conll | conllu | squad (ignored for tfds:)
            header=True,
            text_a="sentence",  # TSV column name (with a header) or index ("0"); TFDS feature name
            text_b="",
            label="label",  # TSV column; for conll/conllu the tag column index ("-1")
            max_seq_length=128,
            doc_stride=128,
            max_query_length=64,
            max_answer_length=30,
            n_best=20,
            tokenizer="",  # used when init_from has none; '' then trains one on the task's train text
            max_train_examples=0,  # 0 = all; a subset for quick runs and tests
            max_dev_examples=0,  # taken before dev_split
            max_test_examples=0,
        )
    )
    config.task = ml_collections.ConfigDict(
        dict(
            name="",
            family="single",  # single | pair | tagging | span
            metrics=("accuracy",),  # the first picks the best step
            labels=(),  # declared label order; () = sorted labels of the train file
            regression=False,
            positive_label="1",  # the class binary F1 scores
            version_2=False,  # SQuAD v2.0: questions may have no answer
            null_threshold=0.0,
        )
    )
    # failed_margin: a seed whose best dev score is within this of the majority class's is marked failed.
    config.finetune = ml_collections.ConfigDict(dict(regime="full", freeze_layers=0, features="last", failed_margin=0.01))
    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=32,
            epochs=3.0,  # > 0: the run's length in epochs; 0: train.total_steps
            total_steps=1000,
            eval_every=200,
            eval_batch_size=128,
            log_every=50,
            seed=0,  # seeds init, data order and dropout; `seeds` below overrides it
            dropout_seed=0,
            progress=True,
        )
    )
    # N -> N runs with seeds train.seed .. train.seed + N - 1; or a list of seeds. A run's seed draws
    # the head's (and a from-scratch encoder's) initialisation, the data order, and (folded into
    # train.dropout_seed) the dropout masks.
    config.seeds = ml_collections.FieldReference(1, field_type=object)
    config.init_from = ""
    return config


def glue_tsv(config, directory: str, text_a, text_b, label, header: bool = True, dev: str = "dev.tsv"):
    config.data.update(dict(train=f"{directory}/train.tsv", dev=f"{directory}/{dev}", format="tsv", header=header))
    config.data.update(dict(text_a=text_a, text_b=text_b, label=label))
    config.task.family = "pair" if text_b != "" else "single"
    return config


def get_config(task: str = "sst2"):
    config = base_config()
    config.task.name = task
    # GLUE's test labels are not public: every GLUE task selects on half its dev set, reports the other.
    config.data.dev_split = 0.5 if task in ("sst2", "cola") or task in GLUE_TASKS else 0.0
    if task == "sst2":
        glue_tsv(config, f"{SHARED}/glue/SST-2", "text", "", "label")
    elif task == "cola":
        glue_tsv(config, f"{SHARED}/glue/CoLA", "3", "", "1", header=False)
        config.task.metrics = ("mcc", "accuracy")
    elif task in GLUE_TASKS:
        directory, text_a, text_b, label, metric_names, dev = GLUE_TASKS[task]
        glue_tsv(config, f"{GLUE}/{directory}", text_a, text_b, label, dev=dev)
        config.task.metrics = metric_names
        if task == "stsb":
            config.task.regression = True
        if task == "mnli":
            config.data.other_dev = ml_collections.ConfigDict({"mismatched": f"{GLUE}/MNLI/dev_mismatched.tsv"})
    elif task == "chnsenticorp":
        # text TAB positive|negative, no header; test.tsv has no labels (qid TAB text_a). A pretrained
        # Chinese model: experiments/chinese/README.md.
        glue_tsv(config, f"{SHARED}/chinese/ChnSentiCorp", "0", "", "1", header=False)
        config.task.labels = ("negative", "positive")  # the order of the data set's labels.txt
        config.task.positive_label = "positive"
    elif task == "conll2003":
        config.data.update(dict(train=f"{SHARED}/conll2003/eng.train", dev=f"{SHARED}/conll2003/eng.testa", test=f"{SHARED}/conll2003/eng.testb", format="conll", label="-1"))
        config.task.update(dict(family="tagging", metrics=("entity_f1", "accuracy")))
    elif task == "ud_pos":
        # The shared copy of UD EWT has no train file: train on dev; half of test selects, half is reported.
        directory = f"{SHARED}/ud-english-ewt"
        config.data.update(dict(train=f"{directory}/en_ewt-ud-dev.conllu", dev=f"{directory}/en_ewt-ud-test.conllu", format="conllu", label="3", dev_split=0.5))
        config.task.update(dict(family="tagging", metrics=("accuracy",)))
    elif task in ("squad", "squad_v2", "xquad"):
        if task == "xquad":
            # One file: XQuAD is an evaluation set; train on SQuAD v1.1 for a real number.
            config.data.update(dict(train=f"{SHARED}/squad-format/xquad.en.json", dev=f"{SHARED}/squad-format/xquad.en.json"))
        else:
            suffix = "v2.0" if task == "squad_v2" else "v1.1"
            config.data.update(dict(train=f"{SQUAD}/train-{suffix}.json", dev=f"{SQUAD}/dev-{suffix}.json"))
        config.data.update(dict(format="squad", max_seq_length=384, doc_stride=128))
        config.task.update(dict(family="span", metrics=("f1", "exact_match"), version_2=task == "squad_v2"))
        config.train.epochs = 2.0
    elif task == "xquad_qg":
        config.model = seq2seq.model_config("tiny")
        config.model.update(pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=3)  # configs/seq2seq.py's
        config.data.update(dict(train=f"{SHARED}/squad-format/xquad.en.json", format="squad", max_seq_length=128, max_answer_length=30))
        config.data.passage_split = (0.7, 0.15)  # (train, dev) fractions of the passages; the rest is held out
        config.data.passage_split_seed = 0
        config.data.max_target_length = 32  # question pieces + [CLS] and [SEP]
        # text_tokenize: how BLEU and ROUGE-L split texts into words (bertjax.eval.metrics.TOKENIZATIONS); 'auto'
        # takes 'zh' for Chinese references (xquad.zh.json), 'intl' for other non-Latin scripts, else '13a'.
        config.task.update(dict(family="seq2seq", metrics=("rougeL", "bleu"), text_tokenize="auto"))
        config.generation = ml_collections.ConfigDict(dict(num_beams=1, max_length=32, length_penalty=1.0))
        config.train.label_smoothing = 0.1  # BART's fine-tuning value
        config.train.update(dict(batch_size=16, epochs=6.0, eval_every=80))  # ~320 steps: the CPU scale measured
        config.optim.lr = 1e-3
    else:
        raise ValueError(f"unknown fine-tuning task {task!r}")
    return config
