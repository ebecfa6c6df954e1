"""Embryology measures: the model's forward passes against the model itself, step 0 against pretraining's
init, per-POS accuracy on a copying model (a known answer), the prediction masking, CKA against a numpy
reference, and probes on synthetic features with a known answer."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from bertjax import checkpoint_io, models
from bertjax import config as config_lib
from bertjax.data import tasks
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.embryology import cka, features, pos, probes
from bertjax.train import optim, partitioning
from bertjax.train import state as state_lib

TINY = dict(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64)
UD_TEST = "ud-english-ewt/en_ewt-ud-test.conllu"
UD_DEV = "ud-english-ewt/en_ewt-ud-dev.conllu"


def pretraining_init(config):
    """The parameters pretraining starts from, made exactly as bertjax.train.pretrain makes them."""
    model = models.BertForPreTraining(models.BertConfig.from_config(config.model))
    seq_len = config.data.max_seq_length
    tx = optim.create(config.optim, config.train.total_steps, state_lib.abstract_params(model, seq_len))
    mesh = partitioning.make_mesh(config.mesh)
    state, _ = state_lib.create(model, tx, config.train.seed, seq_len, mesh, partitioning.rules(config.mesh))
    return state.params


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data):
    """A tiny real workdir: a tokenizer trained on a few lines beside a params-only checkpoint of the run's init."""
    workdir = tmp_path_factory.mktemp("run")
    lines = [" ".join(s.words) for s in tasks.read_conllu(shared_data / UD_DEV)[:1500]]
    tok = tokenizer_lib.load(tokenizer_lib.train_from_sentences(lines, 800, workdir / checkpoint_io.TOKENIZER))
    config = config_lib.pretrain_config("tiny")
    config.model.update(TINY, vocab_size=tok.vocab_size)
    config.data.max_seq_length = 64
    config.train.seed = 3
    params = pretraining_init(config)
    checkpoint_io.save_params(workdir, config, params, step=5)
    return workdir, config, params


@pytest.fixture(scope="module")
def model(run):
    return features.Model.load(str(run[0]))


def flat(params):
    return traverse_util.flatten_dict(jax.device_get(params))


def test_load_and_initial_give_the_run_params(run, model):
    workdir, config, params = run
    expected = flat(params)
    initial = features.Model.initial(workdir)
    for loaded in (model, initial):
        got = flat(loaded.params)
        assert got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg="/".join(name))
    assert (model.num_layers, model.hidden_size) == (2, 32)
    assert model.tokenizer.vocab_size == config.model.vocab_size


def test_forward_passes_match_the_model(model, shared_data):
    sentences = [s.words for s in tasks.read_conllu(shared_data / UD_TEST)[:40]]
    batch = model.encode_words(sentences, 64)
    positions = features.positions_of(batch, batch.kept)
    # Two batches of rows sorted by length (two length buckets), whose order must come back.
    predicted = model.predict_ids(batch.input_ids, batch.attention_mask, positions)
    hidden = model.hidden_states(batch.input_ids, batch.attention_mask, positions)
    pooled = model.mean_pooled(batch.input_ids, batch.attention_mask)
    module = models.BertForPreTraining(model.cfg)
    out = module.apply({"params": model.params}, batch.input_ids, np.zeros_like(batch.input_ids), batch.attention_mask)
    logits = np.asarray(out.mlm_logits)
    mask = batch.attention_mask[..., None]
    for row in range(len(sentences)):
        chosen = positions[row][positions[row] >= 0]
        np.testing.assert_array_equal(predicted[row, : len(chosen)], logits[row, chosen].argmax(-1))
        for layer, states in enumerate(out.hidden_states):
            np.testing.assert_allclose(hidden[layer, row, : len(chosen)], np.asarray(states)[row, chosen], atol=2e-5)
            mean = (np.asarray(states)[row] * mask[row]).sum(0) / mask[row].sum()
            np.testing.assert_allclose(pooled[layer, row], mean, atol=2e-5)


def test_encode_words_spans_cover_each_word(model):
    batch = model.encode_words([["unbelievably", "long", "words"], ["a"] * 40], 16)
    assert batch.num_words.tolist() == [3, 40]
    assert batch.kept[1].sum() == 14 and batch.truncated == 26  # [CLS] + 14 words + [SEP] = 16
    for start, end, word in zip(batch.word_start[0], batch.word_end[0], ["unbelievably", "long", "words"]):
        assert batch.input_ids[0, start:end].tolist() == model.tokenizer.encode(word)


def copying(self, input_ids, attention_mask, positions, **_):
    """A model whose MLM head returns its input at every position."""
    return np.take_along_axis(np.asarray(input_ids), np.maximum(positions, 0), axis=1)


def test_copying_model_reconstructs_everything_and_predicts_nothing(model, shared_data, monkeypatch):
    path = shared_data / UD_TEST
    sentences = tasks.read_conllu(path)
    monkeypatch.setattr(features.Model, "predict_ids", copying)
    config = dict(max_sentences=0, max_seq_length=32)
    rows = pos.evaluate(model, sentences, config)
    truncated = pos.truncated_words(model, sentences, config)
    words = sum(len(s.words) for s in sentences)
    assert truncated > 0  # max_seq_length=32 cuts some sentences
    for measure, value in (("reconstruction", 1.0), ("prediction", 0.0)):
        by_label = {row["label"]: row for row in rows if row["measure"] == measure}
        assert all(row["value"] == value for row in by_label.values())
        assert by_label[pos.ALL]["n"] == words - truncated
        assert sum(row["n"] for label, row in by_label.items() if label != pos.ALL) == words - truncated
        assert {"NOUN", "VERB", "DET", "PUNCT"} <= set(by_label)
    # The lines read_conllu skips, counted independently.
    ids = [line.split("\t")[0] for line in path.read_text(encoding="utf-8-sig").splitlines() if line and not line.startswith("#")]
    assert pos.skipped_lines(path) == {"multiword_tokens": sum("-" in i for i in ids), "empty_nodes": sum("." in i for i in ids)}
    assert len(ids) == words + sum("-" in i or "." in i for i in ids)


@pytest.mark.parametrize("num_words", [1, 2, 3, 7, 20, 61])
def test_masking_groups(num_words):
    groups = pos.masking_groups(num_words, 0.15, np.random.default_rng(5))
    assert sorted(w for group in groups for w in group) == list(range(num_words))
    assert all(len(group) <= max(1, round(0.15 * num_words)) for group in groups)
    assert all(b - a > 1 for group in groups for a, b in zip(group, group[1:]))
    assert groups == pos.masking_groups(num_words, 0.15, np.random.default_rng(5))
    if num_words >= 20:
        assert groups != pos.masking_groups(num_words, 0.15, np.random.default_rng(6))


def test_prediction_masks_whole_words_never_neighbours(model, shared_data, monkeypatch):
    sentences = [s.words for s in tasks.read_conllu(shared_data / UD_TEST)[:30]]
    batch = model.encode_words(sentences, 64)
    calls = []

    def spy(self, input_ids, attention_mask, positions, **kwargs):
        calls.append((np.asarray(input_ids).copy(), np.asarray(positions).copy()))
        return copying(self, input_ids, attention_mask, positions)

    monkeypatch.setattr(features.Model, "predict_ids", spy)
    for _ in range(2):
        pos.word_accuracy(model, batch, 0.15, seed=0, batch_size=32)
    (_, _), (masked, positions), (_, _), (again, again_positions) = calls
    np.testing.assert_array_equal(masked, again)  # deterministic for a seed
    np.testing.assert_array_equal(positions, again_positions)
    times_masked = np.zeros(batch.kept.shape, int)
    copy = 0
    for row in range(len(sentences)):
        while copy < len(masked) and np.array_equal(np.where(masked[copy] == model.tokenizer.mask_id, batch.input_ids[row], masked[copy]), batch.input_ids[row]):
            is_masked = masked[copy] == model.tokenizer.mask_id
            assert set(np.nonzero(is_masked)[0]) == set(positions[copy][positions[copy] >= 0])
            words = []
            for word, (start, end) in enumerate(zip(batch.word_start[row], batch.word_end[row])):
                if start >= 0 and is_masked[start:end].any():
                    assert is_masked[start:end].all(), "a word is masked with all its pieces"
                    words.append(word)
            assert words and all(b - a > 1 for a, b in zip(words, words[1:])), "masked words are never neighbours"
            times_masked[row, words] += 1
            copy += 1
    assert copy == len(masked)
    np.testing.assert_array_equal(times_masked, batch.kept.astype(int))  # every kept word masked exactly once


# --- CKA --------------------------------------------------------------------------------------


def reference_cka(x, y):
    """Kornblith et al.'s HSIC form on N x N Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = len(x)
    centering = np.eye(n) - np.ones((n, n)) / n

    def hsic(k, l):
        return np.trace(k @ centering @ l @ centering)

    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_linear_cka_against_reference_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20)) + 3.0
    y = np.tanh(x @ rng.normal(size=(20, 12))) + 0.5 * rng.normal(size=(300, 12))
    assert cka.linear_cka(x, y) == pytest.approx(reference_cka(x, y), rel=1e-9)
    assert 0.1 < cka.linear_cka(x, y) < 0.99
    assert cka.linear_cka(x, x) == pytest.approx(1.0)
    orthogonal, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    assert cka.linear_cka(x @ orthogonal, y) == pytest.approx(cka.linear_cka(x, y), rel=1e-9)
    assert cka.linear_cka(7.5 * x, y) == pytest.approx(cka.linear_cka(x, y), rel=1e-9)
    assert cka.linear_cka(x, y @ np.diag(rng.uniform(0.1, 10, 12))) != pytest.approx(cka.linear_cka(x, y), rel=1e-3)
    independent = cka.linear_cka(rng.normal(size=(5000, 10)), rng.normal(size=(5000, 10)))
    assert independent == pytest.approx(reference_cka(*(np.random.default_rng(1).normal(size=(2, 400, 10)))), abs=0.1)
    assert independent < 0.01
    assert cka.per_layer(np.stack([x, x]), np.stack([x, 2 * x])) == pytest.approx([1.0, 1.0])


def test_sample_features_is_a_fixed_sample(model, shared_data):
    sentences = tasks.read_conllu(shared_data / UD_TEST)
    first = cka.sample_features(model, sentences, 300, seed=0)
    assert first.shape[0] == 3 and first.shape[2] == 32 and 200 < first.shape[1] <= 300
    np.testing.assert_array_equal(first, cka.sample_features(model, sentences, 300, seed=0))
    other = cka.sample_features(model, sentences, 300, seed=1)
    assert other.shape != first.shape or not np.array_equal(other, first)


# --- Probes -----------------------------------------------------------------------------------


def test_probes_learn_separable_layers_independently():
    rng = np.random.default_rng(0)
    n, h, classes = 1500, 16, 4
    x = rng.normal(size=(2, 2 * n, h)).astype(np.float32)  # layer 0: noise
    y = (x[1] @ rng.normal(size=(h, classes))).argmax(-1)  # layer 1: linearly separable
    params = probes.train_softmax_probes(x[:, :n], y[:n], classes, dict(steps=300, learning_rate=0.05, l2=0.0))
    predicted = probes.predict(params, x[:, n:])
    accuracy = (predicted == y[n:]).mean(axis=1)
    assert accuracy[1] > 0.95
    assert accuracy[0] < 0.4
    # Minibatches: the same answer, and the seed fixes the probe.
    config = dict(steps=300, learning_rate=0.05, batch_size=256, seed=2)
    minibatch = probes.train_softmax_probes(x[:, :n], y[:n], classes, config)
    assert (probes.predict(minibatch, x[:, n:])[1] == y[n:]).mean() > 0.9
    np.testing.assert_array_equal(np.asarray(minibatch["w"]), np.asarray(probes.train_softmax_probes(x[:, :n], y[:n], classes, config)["w"]))


def test_control_task_stays_near_the_majority_rate():
    rng = np.random.default_rng(0)
    vocabulary = np.array([f"w{i}" for i in range(400)])
    names = np.array(["A", "B", "C"])
    train_types, test_types = rng.choice(vocabulary, 3000), rng.choice(vocabulary, 1000)
    train_labels = rng.choice(names, 3000, p=[0.6, 0.3, 0.1])
    train_control, test_control = probes.control_labels(train_types, train_labels, test_types, seed=0)
    # One label per type, drawn from the labels' empirical distribution, the same for a seed.
    mapping = dict(zip(train_types, train_control)) | dict(zip(test_types, test_control))
    assert all(mapping[t] == c for t, c in zip(train_types, train_control))
    assert len(mapping) <= 400 and set(mapping.values()) <= set(names)
    assert abs(np.mean(np.array(list(mapping.values())) == "A") - 0.6) < 0.1
    np.testing.assert_array_equal(test_control, probes.control_labels(train_types, train_labels, test_types, seed=0)[1])
    # Features that carry nothing: the control probe can only learn the majority label.
    x = rng.normal(size=(1, 4000, 8)).astype(np.float32)
    ids = {name: i for i, name in enumerate(names)}
    params = probes.train_softmax_probes(x[:, :3000], np.array([ids[c] for c in train_control]), 3, dict(steps=200, l2=1e-2))
    accuracy = (names[probes.predict(params, x[:, 3000:])[0]] == test_control).mean()
    majority = max(np.mean(test_control == name) for name in names)
    assert abs(accuracy - majority) < 0.06


def test_probe_rows_on_real_tasks(model, shared_data):
    probe_tasks = {
        "upos": probes.ProbeTask.from_files("token", shared_data / UD_DEV, shared_data / UD_TEST),
        "ner": probes.ProbeTask.from_files("token", shared_data / "conll2003/eng.train", shared_data / "conll2003/eng.testa", "entity_f1"),
        "sst2": probes.ProbeTask.from_files("sentence", shared_data / "glue/SST-2/train.tsv", shared_data / "glue/SST-2/dev.tsv"),
    }
    config = dict(max_train_tokens=400, max_test_tokens=300, max_train_sentences=100, max_test_sentences=60, steps=30, max_seq_length=64)
    rows = probes.evaluate(model, probe_tasks, config)
    values = {(row["measure"], row["layer"]): row for row in rows}
    for task in ("upos", "ner"):
        for layer in range(3):
            probe, control = values[f"probe:{task}", layer], values[f"control:{task}", layer]
            assert 0.0 <= probe["value"] <= 1.0 and 0.0 <= control["value"] <= 1.0
            assert values[f"selectivity:{task}", layer]["value"] == pytest.approx(probe["value"] - control["value"])
            assert 200 < probe["n"] <= 300
    assert [values["probe:sst2", layer]["n"] for layer in range(3)] == [60] * 3
    assert not any(row["measure"] == "control:sst2" for row in rows)
    assert values["probe:upos", 0]["label"] == "accuracy" and values["probe:ner", 0]["label"] == "entity_f1"
    with pytest.raises(tasks.TaskDataError, match="does not exist"):
        probes.ProbeTask.from_files("token", shared_data / "no-such.conllu", shared_data / UD_TEST)


def test_probes_on_features_that_encode_the_tag_score_perfectly(model, shared_data, monkeypatch):
    """Features that are the gold tag (one-hot, every layer): accuracy and entity F1 of 1 (word-level tags
    reassembled into sentences), whatever the model."""
    ner = probes.ProbeTask.from_files("token", shared_data / "conll2003/eng.train", shared_data / "conll2003/eng.testa", "entity_f1")
    ner = probes.ProbeTask("token", ner.train[:300], ner.test[:200], "entity_f1")
    tags_of = {sentence.words: sentence.tags for sentence in list(ner.train) + list(ner.test)}
    names = sorted({tag for tags in tags_of.values() for tag in tags})
    real = features.Model.word_features

    def gold(self, sentences, max_tokens, seed, **kwargs):
        feats, sentence, word = real(self, sentences, max_tokens, seed, **kwargs)
        one_hot = np.eye(len(names), dtype=np.float32)[[names.index(tags_of[tuple(sentences[s])][w]) for s, w in zip(sentence, word)]]
        return np.broadcast_to(one_hot, (feats.shape[0],) + one_hot.shape), sentence, word

    monkeypatch.setattr(features.Model, "word_features", gold)
    # max_seq_length 512: no word is cut off (a cut word is scored as 'O', which would lower F1 below 1).
    rows = probes.evaluate(model, {"ner": ner}, dict(max_train_tokens=2000, max_test_tokens=1000, steps=300, l2=0.0, learning_rate=0.1, max_seq_length=512))
    probe = [row for row in rows if row["measure"] == "probe:ner"]
    assert [row["layer"] for row in probe] == [0, 1, 2]
    assert [row["value"] for row in probe] == pytest.approx([1.0] * 3), rows
