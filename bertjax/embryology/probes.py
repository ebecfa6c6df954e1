"""Measure 2: layer-wise linear probes on frozen features, with control tasks (Hewitt & Liang, 2019).

For each task, one forward pass gives every layer's features (the embeddings output is layer 0);
a softmax regression is trained on each layer, all layers at once (`jax.vmap` over the layer axis,
one jitted `lax.scan` of a fixed number of Adam steps from zero weights, so a given seed always gives
the same probe). Features are standardised per layer with the training set's mean and deviation, so
one learning rate suits every layer whatever its scale.

Token tasks (UPOS, NER) read each word at its first piece, on a seeded sample of whole sentences of
about max_train_tokens / max_test_tokens words (bounded memory whatever the file size). Each also gets
a control task: every word type is given a label drawn at random from the training labels' empirical
distribution, once, and a probe trained on those labels measures what memorising word identity alone
achieves. selectivity = probe - control. A sentence task (SST-2) reads each layer's mean over the
real tokens and has no control task.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bertjax.data import tasks
from bertjax.embryology import features as features_lib
from bertjax.eval import metrics

KINDS = ("token", "sentence")
METRICS = ("accuracy", "entity_f1")
# The probes config's keys (configs/embryology.py sets them; a key it lacks takes this value).
DEFAULTS = dict(
    # Seeded samples of whole sentences: about this many words for token tasks, sentences for SST-2.
    max_train_tokens=3000,
    max_test_tokens=2000,
    max_train_sentences=1000,
    max_test_sentences=872,
    steps=200,  # Adam steps of every probe (all layers at once, from zero weights)
    learning_rate=0.02,
    l2=1e-4,
    batch_size=0,  # 0: full batch
    seed=0,
    max_seq_length=128,
    forward_batch_size=32,
)


def setting(config, key: str):
    return config[key] if config is not None and key in config else DEFAULTS[key]


@dataclasses.dataclass(frozen=True)
class ProbeTask:
    """A probing task: token-level (tasks.TaggedSentence records) or sentence-level (tasks.TextExample)."""

    kind: str
    train: Sequence
    test: Sequence
    metric: str = "accuracy"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ProbeTask kind={self.kind!r}: choose one of {KINDS}")
        if self.metric not in METRICS:
            raise ValueError(f"ProbeTask metric={self.metric!r}: choose one of {METRICS}")

    @classmethod
    def from_files(cls, kind: str, train, test, metric: str = "accuracy") -> ProbeTask:
        """Read by suffix: .conllu (UPOS), .tsv (header `text<TAB>label`, as GLUE SST-2 here), else CoNLL-2003 columns."""
        return cls(kind, read(train), read(test), metric)


def read(path) -> list:
    path = pathlib.Path(path)
    if not path.exists():
        raise tasks.TaskDataError(f"probe data file {path} does not exist (config probes.<task>.train / .test)")
    if path.suffix == ".conllu":
        return tasks.read_conllu(path)
    if path.suffix == ".tsv":
        return tasks.read_tsv(path, "text", label="label")
    return tasks.read_conll(path)


# --- Features and labels -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenSet:
    """Features of a sample of words and what each is: label, word type, and where it sits."""

    features: np.ndarray  # [L+1, N, H] float32
    labels: np.ndarray  # [N] str
    types: np.ndarray  # [N] str: the word form
    sentence: np.ndarray  # [N] index into the sentences given
    word: np.ndarray  # [N] index of the word in its sentence


def token_features(model: features_lib.Model, sentences: Sequence[tasks.TaggedSentence], max_tokens: int, seed: int, *, max_seq_length: int = 128, batch_size: int = 32) -> TokenSet:
    """Every layer at the first piece of each word of a seeded sample of whole sentences (about max_tokens words)."""
    feats, sentence, word = model.word_features([s.words for s in sentences], max_tokens, seed, max_seq_length=max_seq_length, batch_size=batch_size)
    labels = np.array([sentences[s].tags[w] for s, w in zip(sentence, word)], dtype=object)
    types = np.array([sentences[s].words[w] for s, w in zip(sentence, word)], dtype=object)
    return TokenSet(feats, labels, types, sentence, word)


def control_map(train_types, train_labels, types, seed: int) -> dict[str, str]:
    """Hewitt & Liang's control task: each word type (of the training set and of `types`) -> one label
    drawn from the training labels' empirical distribution; seeded, independent of the model."""
    names, counts = np.unique(np.asarray(train_labels, dtype=str), return_counts=True)
    vocabulary = sorted(set(map(str, train_types)) | set(map(str, types)))
    drawn = np.random.default_rng(seed).choice(len(names), size=len(vocabulary), p=counts / counts.sum())
    return {word: str(names[index]) for word, index in zip(vocabulary, drawn)}


def control_labels(train_types, train_labels, test_types, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_control, test_control): the control task's labels of each training and test word."""
    mapping = control_map(train_types, train_labels, test_types, seed)
    return np.array([mapping[str(t)] for t in train_types], dtype=object), np.array([mapping[str(t)] for t in test_types], dtype=object)


# --- Probes --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "learning_rate", "l2", "batch_size"))
def _train(x, y, key, *, num_classes: int, steps: int, learning_rate: float, l2: float, batch_size: int):
    tx = optax.adam(learning_rate)

    def one_layer(x):
        mean, scale = jnp.mean(x, axis=0), jnp.std(x, axis=0) + 1e-6
        x = (x - mean) / scale
        params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

        def loss(params, xb, yb):
            logits = xb @ params["w"] + params["b"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean() + 0.5 * l2 * jnp.sum(params["w"] ** 2)

        def step(carry, step_key):
            params, opt_state = carry
            if batch_size:
                rows = jax.random.randint(step_key, (batch_size,), 0, x.shape[0])
                xb, yb = x[rows], y[rows]
            else:
                xb, yb = x, y
            updates, opt_state = tx.update(jax.grad(loss)(params, xb, yb), opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
        return {**params, "mean": mean, "scale": scale}

    return jax.vmap(one_layer)(x)


def train_softmax_probes(train_x, train_y, num_classes: int, probe_config=None) -> dict:
    """One softmax regression per layer of train_x [L+1, N, H] on class ids train_y [N]; all layers at once.

    Returns {'w' [L+1, H, C], 'b' [L+1, C], 'mean', 'scale' [L+1, H]} (the standardisation goes with the probe).
    """
    batch_size = setting(probe_config, "batch_size")
    return _train(
        jnp.asarray(train_x, jnp.float32),
        jnp.asarray(train_y, jnp.int32),
        jax.random.key(setting(probe_config, "seed")),
        num_classes=num_classes,
        steps=setting(probe_config, "steps"),
        learning_rate=float(setting(probe_config, "learning_rate")),
        l2=float(setting(probe_config, "l2")),
        batch_size=batch_size if 0 < batch_size < np.shape(train_x)[1] else 0,
    )


@jax.jit
def _predict(params, x):
    x = (x - params["mean"][:, None]) / params["scale"][:, None]
    return jnp.argmax(jnp.einsum("lnh,lhc->lnc", x, params["w"]) + params["b"][:, None], axis=-1)


def predict(params, x) -> np.ndarray:
    """[L+1, M] the class id each layer's probe predicts for x [L+1, M, H]."""
    return np.asarray(_predict(params, jnp.asarray(x, jnp.float32)))


# --- The measure ---------------------------------------------------------------------------------


def _fit_and_score(names: list[str], train_x, train_labels, test_x, test_labels, probe_config, score) -> list[float]:
    """Train on label strings (classes `names`: the task's, shared by its control task so that both
    compile once), predict the test set, and score each layer's predicted label strings."""
    ids = {name: index for index, name in enumerate(names)}
    params = train_softmax_probes(train_x, np.array([ids[str(label)] for label in train_labels]), len(names), probe_config)
    predicted = np.asarray(names, dtype=object)[predict(params, test_x)]
    return [score(layer_predictions, test_labels) for layer_predictions in predicted]


def _accuracy(predicted, reference) -> float:
    return metrics.accuracy(np.asarray(predicted, dtype=str), np.asarray(reference, dtype=str))


def _token_task(model, name: str, task: ProbeTask, config) -> list[dict]:
    kwargs = dict(max_seq_length=setting(config, "max_seq_length"), batch_size=setting(config, "forward_batch_size"))
    seed = setting(config, "seed")
    train = token_features(model, task.train, setting(config, "max_train_tokens"), seed, **kwargs)
    test = token_features(model, task.test, setting(config, "max_test_tokens"), seed, **kwargs)
    test_sentences = np.unique(test.sentence)
    mapping = control_map(train.types, train.labels, [word for s in test_sentences for word in task.test[s].words], seed)

    if task.metric == "entity_f1":

        def tagged(labels) -> list[list[str]]:
            """Word-level tags per test sentence: the predicted ones, 'O' where max_seq_length cut the word off."""
            tags = {s: ["O"] * len(task.test[s].words) for s in test_sentences}
            for s, w, label in zip(test.sentence, test.word, labels):
                tags[s][w] = label
            return [tags[s] for s in test_sentences]

        def entity_score(references):
            return lambda predicted, _: metrics.entity_f1(tagged(predicted), references)

        score_probe = entity_score([list(task.test[s].tags) for s in test_sentences])
        score_control = entity_score([[mapping[word] for word in task.test[s].words] for s in test_sentences])
    else:
        score_probe = score_control = _accuracy

    train_control = np.array([mapping[str(t)] for t in train.types], dtype=object)
    test_control = np.array([mapping[str(t)] for t in test.types], dtype=object)
    names = sorted(set(map(str, train.labels)))
    probe = _fit_and_score(names, train.features, train.labels, test.features, test.labels, config, score_probe)
    control = _fit_and_score(names, train.features, train_control, test.features, test_control, config, score_control)
    n = len(test.labels)
    rows = []
    for layer, (p, c) in enumerate(zip(probe, control)):
        rows.append({"measure": f"probe:{name}", "layer": layer, "label": task.metric, "value": p, "n": n})
        rows.append({"measure": f"control:{name}", "layer": layer, "label": task.metric, "value": c, "n": n})
        rows.append({"measure": f"selectivity:{name}", "layer": layer, "label": task.metric, "value": p - c, "n": n})
    return rows


def sentence_features(model: features_lib.Model, examples: Sequence[tasks.TextExample], max_sentences: int, seed: int, *, max_seq_length: int = 128, batch_size: int = 32):
    """(features [L+1, N, H], labels [N]): each layer's mean over the real tokens of a seeded sample of examples."""
    chosen = np.arange(len(examples))
    if max_sentences and max_sentences < len(examples):
        chosen = np.sort(np.random.default_rng(seed).choice(len(examples), max_sentences, replace=False))
    encoded = tasks.encode_texts(model.tokenizer, [examples[i].texts for i in chosen], min(max_seq_length, model.max_positions))
    pooled = model.mean_pooled(encoded["input_ids"], encoded["attention_mask"], batch_size=batch_size)
    return pooled, np.array([examples[i].label for i in chosen], dtype=object)


def _sentence_task(model, name: str, task: ProbeTask, config) -> list[dict]:
    kwargs = dict(max_seq_length=setting(config, "max_seq_length"), batch_size=setting(config, "forward_batch_size"))
    seed = setting(config, "seed")
    train_x, train_y = sentence_features(model, task.train, setting(config, "max_train_sentences"), seed, **kwargs)
    test_x, test_y = sentence_features(model, task.test, setting(config, "max_test_sentences"), seed, **kwargs)
    scores = _fit_and_score(sorted(set(map(str, train_y))), train_x, train_y, test_x, test_y, config, _accuracy)
    return [{"measure": f"probe:{name}", "layer": layer, "label": task.metric, "value": value, "n": len(test_y)} for layer, value in enumerate(scores)]


def evaluate(model: features_lib.Model, probe_tasks: dict[str, ProbeTask], probes_config=None) -> list[dict]:
    """Rows {measure: probe:/control:/selectivity:<task>, layer: 0 (embeddings) .. L, label: the metric, value, n: test examples}."""
    rows = []
    for name, task in probe_tasks.items():
        rows += (_token_task if task.kind == "token" else _sentence_task)(model, name, task, probes_config)
    return rows
