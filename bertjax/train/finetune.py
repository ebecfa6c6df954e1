"""Fine-tuning on a downstream task, over several seeds, and prediction with the result.

  train_and_evaluate(config, workdir)   one run per seed in WORKDIR/seed_K/, then WORKDIR/results.json
  predict(workdir, lines)               one prediction string per input line

A run reads top to bottom: seeds, tokenizer, data, model, (pretrained) parameters, then per seed
the state, the step, the loop with dev evaluation every `train.eval_every` steps and at the end
(the best step's parameters are kept and saved), and finally the spread over seeds.

Select on dev, report on held-out data: the step is chosen on dev alone, then the held-out set is
scored once, with that step's parameters (the held-out labels are never read before). The held-out
set is `data.test` when the task has a labelled one, else the part `data.dev_split` (a fraction, a
fixed seed) of the dev set that selection does not see. A seed whose best dev score is at the level
of always predicting the training set's majority class (within `finetune.failed_margin`), or whose
dev predictions are all one value, is marked failed: fine-tuning collapsed (Mosbach et al., 2021).
Each seed also keeps per-example counts on the held-out set (`per_example.statistics`), which
`sweep collect` bootstraps over examples and seeds.

WORKDIR holds config.json (the config as run: model = the checkpoint's), labels.json (label
strings in id order), tokenizer/, results.json, and seed_K/{config.json, metrics.jsonl,
tensorboard/, checkpoints/BEST_STEP, result.json}. A seed whose result.json exists is not rerun.
results.json keeps each dev metric at the top level by its usual name (mean, std, median, runs) and
adds `dev` and `test` (the held-out scores at the dev-selected steps), `failed_seeds`, `baseline`
(the majority-class scores on dev) and `without_failed` (dev and test summaries of the other seeds).

Regimes (config.finetune.regime): 'full' trains everything; 'freeze_bottom' freezes the embeddings
and the lowest `freeze_layers` layers; 'features' freezes the encoder and trains a new head on
`finetune.features` ('last', 'sum_last4', 'concat_last4', 'scalar_mix'). Frozen parameters get no
update and no optimizer state (`optim.create(frozen=...)`).

Family 'seq2seq' (question generation, `configs/finetune.py:xquad_qg`): an encoder-decoder
(`bertjax.models.Seq2Seq`, from scratch or from a seq2seq pretraining run) reads the answer and its
passage and is trained on the question with the pretraining's token cross-entropy
(`pretrain.loss_sums`, `train.label_smoothing`); it is scored on questions it generates
(`config.generation`: greedy or beam search, `bertjax.models.generate`) with BLEU and ROUGE-L.
`data.passage_split` (train and dev fractions, the rest held out) cuts one SQuAD file by passage
(`tasks.split_by_passage`), so no passage is in two parts. Only the 'full' regime applies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import linen as nn
from flax import traverse_util

from bertjax import checkpoint_io, errors, host_memory, models
from bertjax import config as config_lib
from bertjax.data import tasks
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.eval import metrics as metrics_lib
from bertjax.eval import per_example, squad
from bertjax.models import generate as generate_lib
from bertjax.models.heads import BertForTask
from bertjax.train import optim, partitioning, pretrain
from bertjax.train import metrics as writers
from bertjax.train import state as state_lib
from bertjax.train import workdir as workdir_lib

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
RESULTS_FILE = "results.json"
SEED_RESULT_FILE = "result.json"
DEV_SPLIT_SEED = 0  # the same dev/held-out split for every run, arm and seed
# What the model and the loss read from a batch; the rest of the features (offsets, word positions)
# stay on the host for decoding.
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
TARGETS = {
    "single": ("label",),
    "pair": ("label",),
    "tagging": ("tag_ids",),
    "span": ("start_position", "end_position"),
    "seq2seq": ("decoder_input_ids", "decoder_attention_mask", "labels", "label_weights"),
}
SEQ2SEQ_INPUTS = ("input_ids", "attention_mask")  # the encoder-decoder has no segment ids


def batch_keys(family: str) -> tuple[str, ...]:
    """What a training batch of the family holds: the model's inputs and the loss's targets."""
    return (SEQ2SEQ_INPUTS if family == "seq2seq" else MODEL_INPUTS) + TARGETS[family]


def seed_list(seeds, base_seed: int) -> list[int]:
    """config.seeds: N -> [base, ..., base + N - 1]; a list or tuple is taken as it is."""
    if isinstance(seeds, (list, tuple)):
        return [int(seed) for seed in seeds]
    if not isinstance(seeds, int) or seeds < 1:
        raise config_lib.ConfigError(f"config.seeds={seeds!r}: give a positive count or a list of seeds")
    return [base_seed + offset for offset in range(seeds)]


# --------------------------------------------------------------------------------------------- tokenizer


def _record_texts(records) -> Iterator[str]:
    for record in records:
        if isinstance(record, tasks.TextExample):
            yield from record.texts
        elif isinstance(record, tasks.TaggedSentence):
            yield " ".join(record.words)
        else:
            yield record.question
            yield record.context


def _tokenizer(config, workdir: pathlib.Path, train_records) -> tuple[tokenizer_lib.Tokenizer, bool]:
    """The init_from run's tokenizer, else data.tokenizer, else one trained on the task's train text.

    Returns (tokenizer, whether it is the checkpoint's own) and saves it in WORKDIR/tokenizer.
    """
    if config.init_from:
        try:
            tok = tokenizer_lib.load(checkpoint_io.tokenizer_path(config.init_from))
            own = True
        except (FileNotFoundError, tokenizer_lib.TokenizerError):
            if not config.data.tokenizer:
                raise
            tok, own = tokenizer_lib.load(config.data.tokenizer), False
    elif config.data.tokenizer:
        tok, own = tokenizer_lib.load(config.data.tokenizer), False
    elif (workdir / checkpoint_io.TOKENIZER / tokenizer_lib.SENTENCEPIECE_FILE).exists():
        # A rerun of this workdir (more seeds): the seeds already run used this tokenizer.
        tok, own = tokenizer_lib.load(workdir / checkpoint_io.TOKENIZER), True
    else:
        path = tokenizer_lib.train_from_sentences(
            _record_texts(train_records), config.model.vocab_size, workdir / checkpoint_io.TOKENIZER, description=f"{config.data.train} (task train text)"
        )
        tok, own = tokenizer_lib.load(path), True
    tok = tokenizer_lib.load(tok.save(workdir / checkpoint_io.TOKENIZER))
    return tok, own


# --------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
    records: list
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.features["input_ids"])


def _subset(records: list, limit: int, seed: int) -> list:
    """`limit` records drawn at random (in file order) when 0 < limit < len(records)."""
    if not 0 < limit < len(records):
        return records
    keep = np.sort(np.random.default_rng(seed).choice(len(records), size=limit, replace=False))
    return [records[i] for i in keep]


def split_dev(records: list, fraction: float) -> tuple[list, list]:
    """(selection, held-out): a fixed-seed `fraction` of the dev records held out, both in file order."""
    count = int(round(fraction * len(records)))
    if not 0 < count < len(records):
        raise config_lib.ConfigError(f"config.data.dev_split={fraction}: leaves {len(records) - count} of {len(records)} dev examples for selection and {count} held out")
    held = np.zeros(len(records), dtype=bool)
    held[np.random.default_rng(DEV_SPLIT_SEED).permutation(len(records))[:count]] = True
    return [r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h]


def _gold(config, records) -> list:
    if config.task.family == "seq2seq":
        return [record.question for record in records]
    if config.task.family == "tagging":
        return [list(record.tags) for record in records]
    return [float(record.label) for record in records] if config.task.regression else [record.label for record in records]


def majority_predictions(config, labels: tasks.Labels | None, train_records, records) -> list | None:
    """The training set's most frequent label (or tag, for every word) as the prediction for each
    record: the level a collapsed run scores at. None for regression and span tasks."""
    if labels is None:
        return None
    gold = [tag for tags in _gold(config, train_records) for tag in tags] if config.task.family == "tagging" else _gold(config, train_records)
    names, counts = np.unique(np.asarray(gold, dtype=object).astype(str), return_counts=True)
    majority = str(names[np.argmax(counts)])
    if config.task.family == "tagging":
        return [[majority] * len(record.words) for record in records]
    return [majority] * len(records)


def failure(config, predictions: list, metrics: dict, baseline: dict | None) -> str | None:
    """Why a run counts as failed (its dev predictions are constant, or its primary dev metric is no
    better than always predicting the majority class), or None."""
    if baseline is None:
        return None
    flat = [tag for tags in predictions for tag in tags] if config.task.family == "tagging" else predictions
    if len(set(flat)) <= 1:
        return f"constant prediction {flat[0]!r}" if flat else "no predictions"
    primary = config.task.metrics[0]
    if metrics[primary] <= baseline[primary] + config.finetune.failed_margin:
        return f"dev {primary} {metrics[primary]:.4f} is within {config.finetune.failed_margin} of the majority class's {baseline[primary]:.4f}"
    return None


def encode(config, tokenizer, records, labels: tasks.Labels | None) -> dict[str, np.ndarray]:
    """Model features of records; records without labels (prediction) get no targets."""
    data, family = config.data, config.task.family
    if family == "tagging":
        return tasks.encode_tagging(tokenizer, records, data.max_seq_length, labels)
    if family == "span":
        return tasks.encode_squad(tokenizer, records, data.max_seq_length, data.doc_stride, data.max_query_length)
    if family == "seq2seq":
        return tasks.encode_question_generation(
            tokenizer, records, data.max_seq_length, data.max_target_length, data.max_answer_length, config.model.decoder_start_token_id
        )
    if records and records[0].label is None:
        return tasks.encode_texts(tokenizer, [record.texts for record in records], data.max_seq_length)
    return tasks.encode_classification(tokenizer, records, data.max_seq_length, None if config.task.regression else labels)


def _labels(config, train_records) -> tasks.Labels | None:
    if config.task.family in ("span", "seq2seq") or config.task.regression:
        return None
    return tasks.Labels.from_records(tasks.record_labels(train_records), tuple(config.task.labels))


def num_outputs(config, labels: tasks.Labels | None) -> int:
    if config.task.family == "seq2seq":
        return 0  # the LM head over the vocabulary
    if config.task.family == "span":
        return 2
    return 1 if config.task.regression else len(labels)


# --------------------------------------------------------------------------------------------- model and parameters


def build_model(config, labels: tasks.Labels | None) -> nn.Module:
    if config.task.family == "seq2seq":
        if "num_decoder_layers" not in config.model:
            raise config_lib.ConfigError(
                "config.task.family='seq2seq' but config.model has no decoder (no num_decoder_layers): start from configs/finetune.py:xquad_qg"
            )
        return models.Seq2Seq(models.Seq2SeqConfig.from_config(config.model))
    features = config.finetune.features if config.finetune.regime == "features" else None
    return BertForTask(models.BertConfig.from_config(config.model), config.task.family, num_outputs(config, labels), features)


def frozen_mask(params, finetune_config):
    """True for each frozen parameter: the encoder ('features'), or its embeddings and lowest layers ('freeze_bottom')."""

    def frozen(path, _):
        names = optim.path_names(path)
        if names[0] != "encoder" or finetune_config.regime == "full":
            return False
        if finetune_config.regime == "features":
            return True
        index = models.encoder_layer_index(names)
        return index is not None and index < finetune_config.freeze_layers

    return jax.tree_util.tree_map_with_path(frozen, params)


def _load_pretrained(config, tokenizer, tokenizer_is_checkpoints: bool):
    """(model config, host params) of init_from; the checkpoint's vocabulary must fit the tokenizer."""
    source_config, params = checkpoint_io.load_params(config.init_from)
    if ("num_decoder_layers" in source_config.model) != (config.task.family == "seq2seq"):
        kind = "a seq2seq (encoder-decoder) run" if "num_decoder_layers" in source_config.model else "an encoder-only run"
        raise config_lib.ConfigError(f"config.init_from={config.init_from} is {kind}; task family {config.task.family!r} needs the other kind")
    params = jax.device_get(params)
    # The encoder-decoder shares one word-embedding table at the top of its tree.
    table = params["word_embeddings"] if "word_embeddings" in params else params["encoder"]["embeddings"]["word_embeddings"]
    rows = table["embedding"].shape[0]
    # A run's own tokenizer may have fewer pieces than its embedding table (a small corpus); any
    # other tokenizer must match it exactly, or ids would index the wrong rows.
    if tokenizer.vocab_size > rows or (tokenizer.vocab_size != rows and not tokenizer_is_checkpoints):
        raise tokenizer_lib.TokenizerError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but checkpoint {config.init_from} has a vocabulary of {rows}"
        )
    return source_config.model, params


def _token_ids(tokenizer) -> dict:
    """The seq2seq model's token ids for `tokenizer`, as pretraining frames them (configs/seq2seq.py):
    the target is [CLS] text [SEP] and the decoder starts from [SEP]."""
    return dict(pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.cls_id, eos_token_id=tokenizer.sep_id, decoder_start_token_id=tokenizer.sep_id)


def _check_token_ids(config, tokenizer) -> None:
    for key, value in _token_ids(tokenizer).items():
        if config.model[key] != value:
            raise config_lib.ConfigError(f"config.init_from={config.init_from}: its model.{key}={config.model[key]} but tokenizer {tokenizer.path} gives {value}")


def _with_pretrained(params, pretrained):
    """The freshly initialised task parameters with every pretrained leaf of the same path put in."""
    flat = traverse_util.flatten_dict(params)
    source = traverse_util.flatten_dict(pretrained)
    copied = 0
    for path in flat:
        if path in source:
            if source[path].shape != flat[path].shape:
                raise ValueError(f"checkpoint parameter {'/'.join(path)} has shape {source[path].shape}, the model {flat[path].shape}")
            flat[path] = jax.device_put(np.asarray(source[path], flat[path].dtype), flat[path].sharding)
            copied += 1
    log.info("initialised %d of %d parameter arrays from the checkpoint (the rest: the new head)", copied, len(flat))
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------- loss and decoding


def task_loss(config, logits: jax.Array, batch: dict) -> jax.Array:
    family = config.task.family
    if family == "span":
        start = optax.softmax_cross_entropy_with_integer_labels(logits[..., 0], batch["start_position"])
        end = optax.softmax_cross_entropy_with_integer_labels(logits[..., 1], batch["end_position"])
        return jnp.mean(start + end) / 2
    if family == "tagging":
        weights = (batch["tag_ids"] >= 0).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(batch["tag_ids"], 0))
        return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    if config.task.regression:
        return jnp.mean(jnp.square(logits[:, 0] - batch["label"]))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))


def batch_loss(config, model, params, batch: dict, dropout_rng) -> jax.Array:
    """The training loss of one batch: the task head's, or (seq2seq) the decoder's token cross-entropy
    as seq2seq pretraining computes it, averaged over the target tokens."""
    if config.task.family == "seq2seq":
        sums = pretrain.loss_sums(model, params, batch, False, dropout_rng, config.train.get("label_smoothing", 0.0))
        return sums["token_loss"] / jnp.maximum(sums["token_weight"], 1.0)
    logits = model.apply({"params": params}, *(batch[name] for name in MODEL_INPUTS), deterministic=False, rngs={"dropout": dropout_rng})
    return task_loss(config, logits, batch)


def decode(config, labels: tasks.Labels | None, split: Split, logits: np.ndarray) -> list:
    """Predictions as the task's own values: label strings, scores, tag lists, or answer texts."""
    family = config.task.family
    if family == "span":
        return squad.answers(
            [record.context for record in split.records],
            split.features["example_index"],
            split.features["offsets"],
            split.features["max_context"],
            logits[..., 0],
            logits[..., 1],
            n_best=config.data.n_best,
            max_answer_length=config.data.max_answer_length,
            allow_no_answer=config.task.version_2,
            null_threshold=config.task.null_threshold,
        )
    if family == "tagging":
        # Words cut off by max_seq_length get the outside tag (or the first label when there is none).
        default = "O" if "O" in labels.names else labels.names[0]
        best = np.argmax(logits, axis=-1)
        return [
            [labels.names[best[row, position]] if position >= 0 else default for position in split.features["word_positions"][row][: len(record.words)]]
            for row, record in enumerate(split.records)
        ]
    if config.task.regression:
        return [float(score) for score in logits[:, 0]]
    return [labels.names[index] for index in np.argmax(logits, axis=-1)]


def score(config, predictions: list, records: list) -> dict[str, float]:
    """The config's metrics of the predictions against the records' gold values."""
    family, names = config.task.family, list(config.task.metrics)
    if family == "seq2seq":
        return metrics_lib.compute(names, predictions, _gold(config, records), text=True, tokenize=config.task.get("text_tokenize", "auto"))
    if family == "span":
        scores = squad.evaluate({record.qid: answer for record, answer in zip(records, predictions)}, {record.qid: record.answers for record in records})
        return {name: scores[name] for name in names}
    if family == "tagging":
        return metrics_lib.compute(names, predictions, [record.tags for record in records], tagging=True)
    if config.task.regression:
        return metrics_lib.compute(names, np.array(predictions), np.array([float(record.label) for record in records]))
    return metrics_lib.compute(
        names, np.array(predictions, dtype=object), np.array([record.label for record in records], dtype=object), positive=config.task.positive_label
    )


# --------------------------------------------------------------------------------------------- devices


@dataclasses.dataclass
class Placement:
    mesh: jax.sharding.Mesh
    rule_table: tuple

    @classmethod
    def from_config(cls, config) -> Placement:
        return cls(partitioning.make_mesh(config.mesh), partitioning.rules(config.mesh))

    def batch(self, arrays: dict) -> dict:
        return partitioning.global_batch(arrays, self.mesh, self.rule_table)

    @property
    def data_parallelism(self) -> int:
        return math.prod(self.mesh.shape[axis] for axis in ("data", "fsdp"))


def _logits_fn(model):
    @jax.jit
    def logits(params, batch):
        return model.apply({"params": params}, *(batch[name] for name in MODEL_INPUTS), deterministic=True)

    return logits


def generated_texts(config, model, tokenizer, params, features: dict) -> list[str]:
    """The text the seq2seq model generates for every source row (config.generation: greedy when
    num_beams is 1, else beam search), in batches of train.eval_batch_size (the last one filled with
    copies of its first row: one compilation). Special tokens are dropped and the text ends at EOS."""
    batch_size, settings, eos_id = config.train.eval_batch_size, config.generation, config.model.eos_token_id
    count = len(features["input_ids"])
    texts = []
    for begin in range(0, count, batch_size):
        rows = np.arange(begin, begin + batch_size)
        rows = np.where(rows < count, rows, begin)
        tokens = generate_lib.generate(
            model,
            {"params": params},
            features["input_ids"][rows],
            features["attention_mask"][rows],
            num_beams=settings.num_beams,
            max_length=settings.max_length,
            length_penalty=settings.length_penalty,
        )
        for ids in tokens[: min(batch_size, count - begin)]:
            ids = [int(i) for i in ids[1:]]  # after the decoder start token
            ids = ids[: ids.index(eos_id)] if eos_id in ids else ids
            texts.append(tokenizer.decode([i for i in ids if not tokenizer.is_special[i]]))
    return texts


def predictions_fn(config, model, labels: tasks.Labels | None, tokenizer, placement: Placement):
    """(params, split) -> the task's predictions: decoded logits, or generated text (seq2seq)."""
    if config.task.family == "seq2seq":
        return lambda params, split: generated_texts(config, model, tokenizer, params, split.features)
    logits_fn = _logits_fn(model)
    return lambda params, split: decode(config, labels, split, all_logits(logits_fn, params, split.features, config.train.eval_batch_size, placement))


def all_logits(logits_fn, params, features: dict, batch_size: int, placement: Placement) -> np.ndarray:
    """Logits of every row, in batches padded to a fixed size (one compilation)."""
    count = len(features["input_ids"])
    outputs = []
    for begin in range(0, count, batch_size):
        rows = {name: features[name][begin : begin + batch_size] for name in MODEL_INPUTS}
        real = len(rows["input_ids"])
        padded = {name: np.pad(value, [(0, batch_size - real)] + [(0, 0)] * (value.ndim - 1)) for name, value in rows.items()}
        outputs.append(np.asarray(jax.device_get(logits_fn(params, placement.batch(padded))))[:real])
    return np.concatenate(outputs) if outputs else np.zeros((0,))


# --------------------------------------------------------------------------------------------- one seed


def _steps(config, train_size: int) -> int:
    if config.train.epochs > 0:
        steps_per_epoch = max(train_size // config.train.batch_size, 1)
        return max(int(round(config.train.epochs * steps_per_epoch)), 1)
    return config.train.total_steps


def _optimizer_config(config, total_steps: int):
    optim_config = ml_collections.ConfigDict(config.optim.to_dict())
    if not optim_config.warmup_steps:
        optim_config.warmup_steps = int(optim_config.get("warmup_fraction", 0.0) * total_steps)
    return optim_config


def _batches(train: Split, batch_size: int, total_steps: int, seed: int, keys) -> Iterator[dict]:
    """`total_steps` shuffled full batches (a new order each epoch; the last partial batch dropped)."""
    rng = np.random.default_rng(seed)
    step = 0
    while True:
        order = rng.permutation(len(train))
        for begin in range(0, len(order) - batch_size + 1, batch_size):
            if step == total_steps:
                return
            rows = order[begin : begin + batch_size]
            yield {name: train.features[name][rows] for name in keys}
            step += 1


def create_state(config, model, seed: int, total_steps: int, placement: Placement, pretrained=None):
    """(state, spec, optimizer, learning-rate schedule): parameters from `seed` (pretrained ones put
    in), and an optimizer whose frozen leaves get no update and no state."""
    optim_config = _optimizer_config(config, total_steps)
    abstract = nn.meta.unbox(state_lib.abstract_params(model, config.data.max_seq_length))
    tx = optim.create(optim_config, total_steps, abstract, frozen=frozen_mask(abstract, config.finetune))
    state, spec = state_lib.create(model, tx, seed, config.data.max_seq_length, placement.mesh, placement.rule_table)
    if pretrained is not None:
        state = state.replace(params=_with_pretrained(state.params, pretrained))
    return state, spec, tx, optim.learning_rate_schedule(optim_config, total_steps)


def make_train_step(config, model, tx, spec, placement: Placement):
    """The jitted step (state, batch, dropout key) -> (state, loss); the state is donated."""

    def train_step(state, batch, dropout_rng):
        loss, grads = jax.value_and_grad(lambda params: batch_loss(config, model, params, batch, dropout_rng))(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state), loss

    return jax.jit(train_step, donate_argnums=0, out_shardings=(spec.shardings, partitioning.replicated(placement.mesh)))


def _train_seed(
    config, seed: int, seed_dir: pathlib.Path, model, labels, train: Split, dev: Split, heldout: Split | None, other_dev: dict, baseline, pretrained, placement, tokenizer
) -> dict:
    if len(train) < config.train.batch_size:
        raise ValueError(f"{config.data.train}: {len(train)} training examples, fewer than train.batch_size={config.train.batch_size}")
    batch_size, eval_batch_size = config.train.batch_size, config.train.eval_batch_size
    for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if size % placement.data_parallelism:
            raise config_lib.ConfigError(f"config.train.{name}={size} must be divisible by the {placement.data_parallelism} data-parallel devices")
    total_steps = _steps(config, len(train))

    state, spec, tx, schedule = create_state(config, model, seed, total_steps, placement, pretrained)
    train_step = make_train_step(config, model, tx, spec, placement)
    keys = batch_keys(config.task.family)
    predictions = predictions_fn(config, model, labels, tokenizer, placement)

    def evaluate(params, split: Split) -> dict:
        return score(config, predictions(params, split), split.records)

    # Loop.
    writer = writers.Writer(seed_dir, config)
    primary = config.task.metrics[0]
    best = {"step": 0, "metrics": None, "params": None}
    dropout_base = jax.random.fold_in(jax.random.key(config.train.dropout_seed), seed)
    bar = tqdm.tqdm(total=total_steps, desc=f"finetune {config.task.name} seed {seed}", unit="step", disable=not config.train.progress, dynamic_ncols=True)
    for step, batch in enumerate(_batches(train, batch_size, total_steps, seed, keys), start=1):
        state, loss = train_step(state, placement.batch(batch), jax.random.fold_in(dropout_base, step))
        if step == 1:
            jax.block_until_ready(loss)
            host_memory.release_if_tight()
        bar.update()
        if step % config.train.log_every == 0 or step == total_steps:
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"seed {seed}: the training loss is {loss} at step {step}")
            writer.write(step, {"loss": loss, "learning_rate": float(schedule(step))})
            bar.set_postfix(loss=f"{loss:.4f}")
            host_memory.release_if_tight()  # again as the heap settles (host_memory)
        if step % config.train.eval_every == 0 or step == total_steps:
            dev_predictions = predictions(state.params, dev)
            dev_metrics = score(config, dev_predictions, dev.records)
            writer.write(step, {f"eval/{name}": value for name, value in dev_metrics.items()})
            log.info("seed %d step %d: dev %s", seed, step, json.dumps({k: round(v, 4) for k, v in dev_metrics.items()}))
            if best["metrics"] is None or dev_metrics[primary] > best["metrics"][primary]:
                best = {"step": step, "metrics": dev_metrics, "params": jax.device_get(state.params), "predictions": dev_predictions}
    bar.close()
    writer.close()

    # The best step's parameters: saved for predict, and scored on the held-out set (its labels are
    # read here for the first time) and on the other dev sets.
    checkpoint_io.save_params(seed_dir, config, best["params"], step=best["step"])
    dev_metrics = dict(best["metrics"])
    why = failure(config, best["predictions"], best["metrics"], baseline)
    if why:
        log.warning("seed %d FAILED (fine-tuning collapsed): %s", seed, why)
    result = {"seed": seed, "best_step": best["step"], "total_steps": total_steps, "failed": why is not None, "failure": why}
    params = jax.device_put(best["params"], spec.shardings.params) if other_dev or heldout is not None else None
    if heldout is not None:
        test_predictions = predictions(params, heldout)
        result["test"] = score(config, test_predictions, heldout.records)
        classes = labels.names if labels is not None else None
        result["heldout_examples"] = per_example.statistics(
            config.task.family, config.task.regression, test_predictions, _gold(config, heldout.records), classes, config.task.get("text_tokenize", "auto")
        )
        log.info("seed %d: held-out %s at dev-selected step %d", seed, json.dumps({k: round(v, 4) for k, v in result["test"].items()}), best["step"])
    for name, split in other_dev.items():
        dev_metrics.update({f"{name}/{metric}": value for metric, value in evaluate(params, split).items()})
    result["metrics"] = dev_metrics
    (seed_dir / SEED_RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------- the run


def summarize(values: list[float]) -> dict:
    """mean, std (sample, over seeds), median and the runs themselves."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "median": float(np.median(array)),
        "runs": [float(value) for value in array],
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Fine-tune once per seed; write and return results.json's content. The run holds the workdir's lock."""
    config_lib.validate(config)
    with workdir_lib.lock(workdir) as locked:
        return _train(config, locked)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    family = config.task.family
    if family not in TARGETS:
        raise config_lib.ConfigError(f"config.task.family={family!r}: choose one of {sorted(TARGETS)}")
    seeds = seed_list(config.seeds, config.train.seed)

    if family == "seq2seq" and config.finetune.regime != "full":
        raise config_lib.ConfigError(f"config.finetune.regime={config.finetune.regime!r}: the seq2seq family trains every parameter ('full')")
    if family == "seq2seq" and config.task.get("text_tokenize", "auto") not in metrics_lib.TOKENIZATIONS:
        raise config_lib.ConfigError(f"config.task.text_tokenize={config.task.text_tokenize!r}: choose one of {metrics_lib.TOKENIZATIONS}")

    # Data (records) and tokenizer.
    if config.data.get("passage_split"):
        parts = _passage_split(config, family)
        limits = (config.data.max_train_examples, config.data.max_dev_examples, config.data.max_test_examples)
        train_records, dev_records, heldout_records = (_subset(part, limit, config.train.seed) for part, limit in zip(parts, limits))
    else:
        train_records = _subset(tasks.read(config.data.train, config.data, family, "train"), config.data.max_train_examples, config.train.seed)
        dev_records = _subset(tasks.read(config.data.dev, config.data, family, "validation"), config.data.max_dev_examples, config.train.seed)
        heldout_records = None
        if config.data.test:
            heldout_records = _subset(tasks.read(config.data.test, config.data, family, "test"), config.data.max_test_examples, config.train.seed)
    if family == "seq2seq":
        requested = config.task.get("text_tokenize", "auto")
        log.info("BLEU and ROUGE-L split texts by the %r tokenization (config.task.text_tokenize=%r)", metrics_lib.text_tokenization(_gold(config, dev_records), requested), requested)
    other_records = {name: tasks.read(path, config.data, family, "validation") for name, path in config.data.other_dev.items()}
    tokenizer, tokenizer_is_checkpoints = _tokenizer(config, workdir, train_records)

    # Model config: the checkpoint's, or the config's sized to the tokenizer.
    pretrained = None
    with config.unlocked():
        if config.init_from:
            model_config, pretrained = _load_pretrained(config, tokenizer, tokenizer_is_checkpoints)
            config.model = ml_collections.ConfigDict(model_config.to_dict())
            if family == "seq2seq":
                _check_token_ids(config, tokenizer)
        else:
            log.warning(
                "\n%s\nNO config.init_from: fine-tuning a RANDOMLY INITIALISED model (%s). Results measure the task, not pretraining.\n%s",
                "!" * 100,
                config.model.get("size", "custom size"),
                "!" * 100,
            )
            config.model.vocab_size = tokenizer.vocab_size
            if family == "seq2seq":
                config.model.update(_token_ids(tokenizer))
    config_lib.validate(config)

    # Features.
    labels = _labels(config, train_records)
    if heldout_records is None and config.data.dev_split:
        if labels is not None and family != "tagging":
            for record in dev_records:  # a dev label training lacks is named before the split puts it in either part
                labels.encode(record.label, record.where)
        dev_records, heldout_records = split_dev(dev_records, config.data.dev_split)
    if labels is not None:
        labels.save(workdir / LABELS_FILE)
    trainable = [record for record in train_records if _trainable(record)]
    train = Split(trainable, encode(config, tokenizer, trainable, labels))
    dev = Split(dev_records, encode(config, tokenizer, dev_records, labels))
    heldout = None if heldout_records is None else Split(heldout_records, encode(config, tokenizer, heldout_records, labels))
    majority = majority_predictions(config, labels, trainable, dev_records)
    baseline = None if majority is None else score(config, majority, dev_records)
    other_dev = {name: Split(records, encode(config, tokenizer, records, labels)) for name, records in other_records.items()}
    held = f", {len(heldout)} held-out ({_heldout_source(config)})" if heldout is not None else ", no held-out set"
    log.info("%s: %d train and %d dev features%s (%s, %s regime)", config.task.name, len(train), len(dev), held, family, config.finetune.regime)
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")

    # One run per seed.
    model = build_model(config, labels)
    placement = Placement.from_config(config)
    runs = []
    for seed in seeds:
        seed_dir = workdir / f"seed_{seed}"
        if (seed_dir / SEED_RESULT_FILE).exists():
            log.info("seed %d finished before: %s", seed, seed_dir / SEED_RESULT_FILE)
            runs.append(json.loads((seed_dir / SEED_RESULT_FILE).read_text()))
            continue
        runs.append(_train_seed(config, seed, seed_dir, model, labels, train, dev, heldout, other_dev, baseline, pretrained, placement, tokenizer))

    # The spread over seeds.
    results = {
        "task": config.task.name,
        "family": family,
        "regime": config.finetune.regime,
        "features": config.finetune.features if config.finetune.regime == "features" else None,
        "init_from": config.init_from or None,
        "primary_metric": config.task.metrics[0],
        "seeds": seeds,
        "best_step": {str(run["seed"]): run["best_step"] for run in runs},
        "heldout": _heldout_source(config),
        "baseline": baseline,
        "failed_seeds": [run["seed"] for run in runs if run.get("failed")],
        "per_seed": runs,
    }
    for name in runs[0]["metrics"]:
        results[name] = summarize([run["metrics"][name] for run in runs])
    kept = [run for run in runs if not run.get("failed")]
    results["dev"], results["without_failed"] = _summaries(runs, "metrics"), {"dev": _summaries(kept, "metrics")}
    if heldout is not None:
        results["test"], results["without_failed"]["test"] = _summaries(runs, "test"), _summaries(kept, "test")
    (workdir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    summary = ", ".join(f"{part} {name} {values['mean']:.4f} ± {values['std']:.4f}" for part in ("dev", "test") for name, values in results.get(part, {}).items())
    failed = f"; {len(results['failed_seeds'])} failed seed(s): {results['failed_seeds']}" if results["failed_seeds"] else ""
    log.info("%s over %d seed(s): %s%s; %s", config.task.name, len(seeds), summary, failed, workdir / RESULTS_FILE)
    return results


def _heldout_source(config) -> str | None:
    """Where the held-out examples come from (results.json's `heldout`)."""
    if config.data.get("passage_split"):
        return "data.passage_split"
    return "data.test" if config.data.test else ("data.dev_split" if config.data.dev_split else None)


def _passage_split(config, family: str) -> list[list]:
    """(train, dev, held-out) records of the one SQuAD file data.train, cut by passage."""
    fractions = tuple(config.data.passage_split)
    if config.data.format != "squad" or len(fractions) != 2:
        raise config_lib.ConfigError(
            f"config.data.passage_split={fractions} (data.format={config.data.format!r}): give the (train, dev) fractions of passages of a SQuAD file; the rest is held out"
        )
    records = tasks.read(config.data.train, config.data, family, "train")
    return tasks.split_by_passage(records, fractions, config.data.passage_split_seed)


def _summaries(runs: list[dict], key: str) -> dict:
    """{metric: summarize(...)} of runs[i][key]; {} when no run is left (every seed failed)."""
    if not runs or key not in runs[0]:
        return {}
    return {name: summarize([run[key][name] for run in runs]) for name in runs[0][key]}


def _trainable(record) -> bool:
    # A SQuAD answer whose offset did not match its text cannot be located: not trained on.
    return not isinstance(record, tasks.QAExample) or not record.answers or record.answer_starts[0] >= 0


# --------------------------------------------------------------------------------------------- predict


def _parse_line(family: str, line: str, number: int):
    where = f"input line {number}"
    if family == "tagging":
        return tasks.TaggedSentence(tuple(line.split()), None, where)
    if family == "span":
        question, tab, passage = line.partition("\t")
        if not tab:
            raise ValueError(f"{where}: QA input is question TAB passage")
        return tasks.QAExample(str(number), question, passage, (), (), where)
    if family == "seq2seq":
        answer, tab, passage = line.partition("\t")
        if not tab:
            raise tasks.TaskDataError(f"{where}: question generation input is answer TAB passage")
        return tasks.QAExample(str(number), "", passage, (answer,), (passage.find(answer),), where)
    texts = tuple(line.split("\t"))
    if len(texts) != (2 if family == "pair" else 1):
        raise ValueError(f"{where}: a {family} task takes {'two texts separated by a tab' if family == 'pair' else 'one text (no tab)'}")
    return tasks.TextExample(texts, None, where)


def _best_seed_dir(workdir: pathlib.Path, seed: int | None = None) -> pathlib.Path:
    """seed_K of `seed`, or of the seed with the best dev score (the primary metric) when None."""
    results = json.loads((workdir / RESULTS_FILE).read_text())
    if seed is not None:
        seeds = [run["seed"] for run in results["per_seed"]]
        if seed not in seeds:
            raise errors.UserError(f"--seed {seed}: {workdir} ran seeds {seeds}")
        return workdir / f"seed_{seed}"
    primary = results["primary_metric"]
    best = max(results["per_seed"], key=lambda run: run["metrics"][primary])
    return workdir / f"seed_{best['seed']}"


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[tuple[int, str]]]:
    chunk = []
    for number, line in enumerate(lines, start=1):
        chunk.append((number, line))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict(workdir, lines: Iterable[str], seed: int | None = None) -> Iterator[str]:
    """One prediction per input line, with the best seed's (or `seed`'s) best parameters: the label, the score
    (regression), the space-separated tags (tagging; input = whitespace-separated words), the
    answer text (QA; input = question TAB passage) or the generated question (seq2seq; input =
    answer TAB passage)."""
    workdir = pathlib.Path(workdir).expanduser().absolute()
    if not (workdir / RESULTS_FILE).exists():
        raise errors.MissingInputError(f"{workdir / RESULTS_FILE} does not exist: {workdir} is not a finished fine-tuning run")
    config = checkpoint_io.read_config(workdir)
    labels = tasks.Labels.load(workdir / LABELS_FILE) if (workdir / LABELS_FILE).exists() else None
    tokenizer = tokenizer_lib.load(workdir / checkpoint_io.TOKENIZER)
    model = build_model(config, labels)
    placement = Placement.from_config(config)

    seed_dir = _best_seed_dir(workdir, seed)
    boxed = state_lib.abstract_params(model, config.data.max_seq_length)
    shardings = partitioning.param_shardings(boxed, placement.mesh, placement.rule_table)
    abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), nn.meta.unbox(boxed), shardings)
    _, params = checkpoint_io.load_params(str(seed_dir), abstract)

    predictions = predictions_fn(config, model, labels, tokenizer, placement)
    family = config.task.family
    for chunk in _chunks(lines, config.train.eval_batch_size):
        records = [_parse_line(family, line, number) for number, line in chunk]
        split = Split(records, encode(config, tokenizer, records, labels))
        for prediction in predictions(params, split):
            if family == "tagging":
                yield " ".join(prediction)
            elif config.task.regression:
                yield f"{prediction:.4f}"
            else:
                yield prediction
