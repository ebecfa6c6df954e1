"""The grain loader: batch contract, determinism, resume (state and orbax), sharding, eval, and the inspect verbs."""

import json

import numpy as np
import pytest

from bertjax import cli
from bertjax import config as config_lib
from bertjax.data import loader

WORDS = "sea whale ship captain storm night oil boat mast rope deck harpoon sailor wind white".split()
KEYS = ("input_ids", "token_type_ids", "attention_mask", "masked_positions", "masked_ids", "masked_weights", "sentence_label")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    blocks = []
    for _ in range(120):
        sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))).capitalize() + "." for _ in range(rng.integers(2, 9))]
        blocks.append("\n".join(sentences))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(blocks) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def make_config(corpus_file, data_dir, **overrides):
    config = config_lib.pretrain_config("tiny")
    config.model.vocab_size = 400
    config.data.corpus = str(corpus_file)
    config.data.data_dir = str(data_dir)
    config.data.max_seq_length = 32
    config.data.max_predictions = 8
    config.data.eval_fraction = 0.1
    config.train.batch_size = 8
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config_lib.validate(config)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def unmasked(batch):
    """input_ids with the original tokens put back at the masked positions."""
    ids = batch["input_ids"].copy()
    rows = np.broadcast_to(np.arange(len(ids))[:, None], batch["masked_positions"].shape)
    weights = batch["masked_weights"].astype(bool)
    ids[rows[weights], batch["masked_positions"][weights]] = batch["masked_ids"][weights]
    return ids


def assert_same(batches_a, batches_b):
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_batches_follow_the_contract(corpus_file, data_dir):
    config = make_config(corpus_file, data_dir)
    batch = next(loader.batches(config, "train", process_index=0, process_count=1))
    assert set(batch) == set(KEYS)
    for key in KEYS:
        assert batch[key].dtype == np.int32
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["attention_mask"].shape == (8, 32)
    assert batch["masked_positions"].shape == batch["masked_ids"].shape == batch["masked_weights"].shape == (8, 8)
    assert batch["sentence_label"].shape == (8,)
    tokenizer = loader.prepared(config)[0]
    assert (batch["input_ids"][:, 0] == tokenizer.cls_id).all()
    none = make_config(corpus_file, data_dir, **{"data.sentence_objective": "none"})
    assert "sentence_label" not in next(loader.batches(none, "train", 0, 1))
    # The default process index and count come from JAX (one process here).
    assert next(loader.batches(config))["input_ids"].shape == (8, 32)


def test_same_seed_same_batches_and_masking_changes_only_the_masks(corpus_file, data_dir):
    config = make_config(corpus_file, data_dir)
    first = take(loader.batches(config, "train", 0, 1), 3)
    assert_same(first, take(loader.batches(config, "train", 0, 1), 3))
    other_masking = make_config(corpus_file, data_dir, **{"data.masking.rate": 0.4, "data.masking.whole_word": True})
    other = take(loader.batches(other_masking, "train", 0, 1), 3)
    for a, b in zip(first, other):
        np.testing.assert_array_equal(unmasked(a), unmasked(b))
        np.testing.assert_array_equal(a["sentence_label"], b["sentence_label"])
        assert a["masked_weights"].sum() < b["masked_weights"].sum()
    other_seed = take(loader.batches(make_config(corpus_file, data_dir, **{"data.seed": 1}), "train", 0, 1), 1)
    assert (unmasked(other_seed[0]) != unmasked(first[0])).any()


def test_a_new_epoch_reshuffles_and_remasks(corpus_file, data_dir):
    config = make_config(corpus_file, data_dir)
    count = len(loader.prepared(config)[2]["train"])
    steps = count // 8
    batches = take(loader.batches(config, "train", 0, 1), 2 * steps)
    epoch0, epoch1 = batches[:steps], batches[steps : 2 * steps]
    masks = {}
    for epoch, group in enumerate((epoch0, epoch1)):
        for batch in group:
            for row, original in enumerate(unmasked(batch)):
                masks.setdefault(original.tobytes(), {})[epoch] = batch["input_ids"][row].tobytes()
    both = [m for m in masks.values() if len(m) == 2]
    assert len(both) > count // 2
    assert np.mean([m[0] != m[1] for m in both]) > 0.9
    assert (unmasked(epoch0[0]) != unmasked(epoch1[0])).any()


def test_resume_from_iterator_state(corpus_file, data_dir):
    config = make_config(corpus_file, data_dir)
    iterator = loader.batches(config, "train", 0, 1)
    take(iterator, 5)
    state = iterator.get_state()
    expected = take(iterator, 4)
    fresh = loader.batches(config, "train", 0, 1)
    fresh.set_state(state)
    assert_same(expected, take(fresh, 4))


def test_resume_from_an_orbax_checkpoint(corpus_file, data_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    config = make_config(corpus_file, data_dir)
    iterator = loader.batches(config, "train", 0, 1)
    take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = take(iterator, 3)
        restored = loader.batches(config, "train", 0, 1)
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same(expected, take(restored, 3))


def test_processes_get_disjoint_halves_of_the_global_batch(corpus_file, data_dir):
    config = make_config(corpus_file, data_dir)
    single = take(loader.batches(config, "train", 0, 1), 4)
    shards = [take(loader.batches(config, "train", index, 2), 4) for index in (0, 1)]
    for step in range(4):
        rows = [set(map(bytes, np.concatenate([s[step]["input_ids"], s[step]["masked_positions"]], 1).astype(np.int32))) for s in shards]
        assert shards[0][step]["input_ids"].shape == (4, 32)
        assert not rows[0] & rows[1]
        everything = set(map(bytes, np.concatenate([single[step]["input_ids"], single[step]["masked_positions"]], 1).astype(np.int32)))
        assert rows[0] | rows[1] == everything
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        loader.batches(config, "train", 0, 3)


def test_eval_is_finite_fixed_and_independent_of_training_masking(corpus_file, data_dir):
    config = make_config(corpus_file, data_dir)
    first = list(loader.batches(config, "eval", 0, 1))
    assert 0 < len(first) < 100
    assert_same(first, list(loader.batches(config, "eval", 0, 1)))
    changed = make_config(corpus_file, data_dir, **{"data.masking.rate": 0.3, "data.masking.span": True, "data.seed": 5})
    assert_same(first, list(loader.batches(changed, "eval", 0, 1)))
    tokens = sum(int((b["attention_mask"].sum(1) - 3).sum()) for b in first)
    predictions = sum(int(b["masked_weights"].sum()) for b in first)
    assert 0.12 < predictions / tokens < 0.2


def test_stats_and_show_verbs(corpus_file, data_dir, capsys):
    overrides = [
        f"--config.data.corpus={corpus_file}",
        f"--config.data.data_dir={data_dir}",
        "--config.model.vocab_size=400",
        "--config.data.max_seq_length=32",
        "--config.data.max_predictions=8",
        "--config.data.eval_fraction=0.1",
        "--config.train.batch_size=8",
    ]
    cli.main(["data", "stats", "--batches", "40", *overrides, "--config.data.sentence_objective=sop"])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["examples_seen"] == 320 and stats["sentence_objective"] == "sop"
    assert abs(stats["chosen_fraction"] - 0.15) < 0.03
    assert abs(stats["mask_fraction"] - 0.8) < 0.08 and abs(stats["keep_fraction"] - 0.1) < 0.06
    assert 0.35 < stats["sentence_label_1_fraction"] < 0.65
    assert 0 <= stats["padding_fraction"] < 1 and stats["batches_per_second"] > 0
    cli.main(["data", "show", "--examples", "2", *overrides])
    shown = capsys.readouterr().out
    assert shown.count("--- example") == 2 and "\u2192" in shown and "[CLS]" in shown and "[SEP]" in shown


def test_bad_loader_input(corpus_file, data_dir):
    config = make_config(corpus_file, data_dir)
    with pytest.raises(ValueError, match="split='test'"):
        loader.batches(config, "test")
    no_eval = make_config(corpus_file, data_dir, **{"data.eval_fraction": 0.0})
    with pytest.raises(ValueError, match="eval split .* is empty"):
        loader.batches(no_eval, "eval", 0, 1)


def test_real_corpus_stats(shared_data, tmp_path_factory):
    """WikiText-2 valid, prepared once: the realised statistics match the configured ones."""
    config = make_config(
        shared_data / "corpus" / "wikitext-2-valid.tokens.txt",
        tmp_path_factory.mktemp("wikitext"),
        **{"model.vocab_size": 2000, "data.max_seq_length": 128, "data.max_predictions": 20, "train.batch_size": 32},
    )
    from bertjax.data import inspect

    stats = inspect.stats(config, "train", 60)
    assert abs(stats["chosen_fraction"] - 0.15) < 0.01
    assert abs(stats["mask_fraction"] - 0.8) < 0.03 and abs(stats["random_fraction"] - 0.1) < 0.03
    assert abs(stats["sentence_label_1_fraction"] - 0.5) < 0.06
    tokenizer, documents, instances = loader.prepared(config)
    assert documents["train"].num_documents + documents["eval"].num_documents == 60
    assert "lobster" in tokenizer.decode(documents["train"].tokens[:200]) + tokenizer.decode(documents["eval"].tokens[:200])
