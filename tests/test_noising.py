"""BART's corruptions on real text: realised rates against the settings, span lengths against the
Poisson law, permutation and rotation recoverable, purity in (seed, epoch, index), and bad input."""

import json
import math

import ml_collections
import numpy as np
import pytest

from bertjax import config as config_lib
from bertjax.config import ConfigError
from bertjax.data import corpus, masking, noising
from bertjax.data import tokenizer as tokenizer_lib

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def text_data(shared_data, tmp_path_factory):
    """A tokenizer trained on the start of Pride and Prejudice and the novel's first ~400 documents
    (4 consecutive paragraphs each) as (tokens, sentence lengths)."""
    text = corpus.read_text(shared_data / "corpus" / "pride-and-prejudice.txt")
    start = text.index("It is a truth universally acknowledged")
    paragraphs = [" ".join(p.split()) for p in text[start : start + 400_000].split("\n\n") if p.strip()]
    sentences = [[s for s in corpus.split_sentences(p)] for p in paragraphs]
    tokenizer = tokenizer_lib.load(
        tokenizer_lib.train_from_sentences((s for p in sentences for s in p), 1000, tmp_path_factory.mktemp("noising_tok"))
    )
    documents = []
    for begin in range(0, len(sentences), 4):
        ids = [piece for piece in tokenizer.encode_many([s for p in sentences[begin : begin + 4] for s in p]) if piece]
        if ids:
            documents.append((np.concatenate(ids).astype(np.int32), np.array([len(piece) for piece in ids])))
    assert len(documents) > 250
    return tokenizer, documents


def noised(text_data, epochs=1, max_length=MAX_LENGTH, **settings):
    """Every document through the corruptions, for `epochs` epochs: (documents, examples) in step."""
    tokenizer, documents = text_data
    noiser = noising.Noiser(noising.NoisingSpec(**settings), tokenizer, max_length)
    index = np.arange(len(documents))
    examples = [e for epoch in range(epochs) for e in noiser.examples(documents, epoch, index)]
    return documents * epochs, examples


def bodies(example):
    return example.source[1:-1], example.target[1:-1]


def rounding_tolerance(count, total):
    """Four standard deviations of a rate whose per-document budgets are rounded stochastically
    (each an error of variance at most 1/4) over `count` documents of `total` units in all."""
    return 4 * math.sqrt(count / 4) / total


def test_infilling_masks_the_configured_fraction_each_span_one_mask(text_data):
    """Token units: the masked fraction read off the output (target length - unmasked source tokens)
    is 30% up to the rounding; and the output equals a plain re-implementation from the record."""
    tokenizer, _ = text_data
    _, examples = noised(text_data, epochs=3, infilling=0.3, whole_word=False)
    masked = total = 0
    for example in examples:
        source, target = bodies(example)
        record = example.record
        unmasked = int((source != tokenizer.mask_id).sum())
        masked += len(target) - unmasked
        total += len(target)
        assert (source == tokenizer.mask_id).sum() == len(record["span_lengths"])  # one [MASK] per span, 0-length ones too
        # Reference: walk the target, a span of length L at unit u -> one [MASK] replacing u..u+L-1.
        expected, spans = [], sorted(zip(record["span_starts"].tolist(), record["span_lengths"].tolist()))
        position = 0
        for start, length in spans:
            expected += target[position:start].tolist() + [tokenizer.mask_id]
            position = start + length
        expected += target[position:].tolist()
        assert source.tolist() == expected
    assert abs(masked / total - 0.3) < rounding_tolerance(len(examples), total)


def test_infilling_with_whole_words_masks_about_30_percent_of_tokens(text_data):
    documents, examples = noised(text_data, epochs=2, infilling=0.3)
    units = np.array([e.record["units"] for e in examples])
    covered_units = np.array([e.record["infilled_units"] for e in examples])
    assert abs(covered_units.sum() / units.sum() - 0.3) < rounding_tolerance(len(examples), units.sum())
    tokenizer = text_data[0]
    # Read off the output: the tokens the spans removed (each span left one [MASK]).
    n = np.array([len(e.target) - 2 for e in examples])
    m = np.array([len(e.target) - int((e.source[1:-1] != tokenizer.mask_id).sum()) - 2 for e in examples])
    rate = m.sum() / n.sum()
    standard_error = np.sqrt(((m - rate * n) ** 2).sum()) / n.sum()
    assert abs(rate - 0.3) < 4 * standard_error + 0.005
    # A span never starts inside a word: the token after a [MASK] in the source starts a word.
    for example in examples[:200]:
        source = example.source[1:-1]
        after = source[1:][source[:-1] == tokenizer.mask_id]
        assert tokenizer.word_start[after].all()


def test_span_lengths_follow_the_poisson_law(text_data):
    """The draws, untrimmed, pooled over documents: mean lambda (Wald's identity); the spans that
    cover a unit: the zero-truncated mean lambda / (1 - e^-lambda); 0-length: e^-lambda of them.
    The realised spans are the draws, the last one of a document trimmed to fill the budget."""
    lam = 3.0
    _, examples = noised(text_data, epochs=3, infilling=0.3, poisson_lambda=lam)
    draws = np.concatenate([e.record["span_draws"] for e in examples])
    assert len(draws) > 3000
    assert abs(draws.mean() - lam) < 4 * math.sqrt(lam / len(draws))
    nonzero = draws[draws > 0]
    truncated_mean = lam / (1 - math.exp(-lam))
    truncated_variance = (lam + lam**2) / (1 - math.exp(-lam)) - truncated_mean**2
    assert abs(nonzero.mean() - truncated_mean) < 4 * math.sqrt(truncated_variance / len(nonzero))
    p0 = math.exp(-lam)
    assert abs((draws == 0).mean() - p0) < 4 * math.sqrt(p0 * (1 - p0) / len(draws))
    for example in examples:
        record = example.record
        lengths, spans = record["span_draws"].copy(), record["span_lengths"]
        if len(lengths):
            lengths[-1] = record["infilled_units"] - lengths[:-1].sum()
            assert 0 < lengths[-1] <= record["span_draws"][-1]
        assert sorted(spans.tolist()) == sorted(lengths.tolist())
    stats = noising.realised_stats([e.record for e in examples])
    assert stats["span_draw_mean"] == pytest.approx(draws.mean())
    assert stats["span_mean"] < stats["span_draw_mean"]  # trimming shortens the last span


def test_permutation_keeps_the_multiset_of_sentences(text_data):
    documents, examples = noised(text_data, permutation=1.0)
    moved = expected_moved = 0
    for (tokens, lengths), example in zip(documents, examples):
        source, target = bodies(example)
        assert target.tolist() == tokens[: MAX_LENGTH - 2].tolist()
        cut = np.diff(np.minimum(np.concatenate([[0], np.cumsum(lengths)]), len(target)))
        sentences = [tuple(s) for s in np.split(target, np.cumsum(cut[cut > 0])[:-1])]
        if len(sentences) < 2:
            assert example.record["single_sentence"] and source.tolist() == target.tolist()
            continue
        order = example.record["sentence_order"]
        assert sorted(order.tolist()) == list(range(len(sentences)))
        assert sorted(sentences) == sorted(tuple(sentences[k]) for k in order)
        assert source.tolist() == [t for k in order for t in sentences[k]]
        moved += int((order != np.arange(len(order))).sum())
        expected_moved += len(sentences) - 1  # a uniform permutation fixes one element on average, with variance 1
    permuted = sum(e.record["permuted"] for e in examples)
    assert abs(moved - expected_moved) < 4 * math.sqrt(permuted)


def test_partial_permutation_moves_only_the_chosen_share(text_data):
    documents, examples = noised(text_data, permutation=0.5)
    for example in examples:
        order = example.record["sentence_order"]
        if len(order):
            assert (order != np.arange(len(order))).sum() <= math.ceil(0.5 * len(order))


def test_rotation_is_a_rotation_and_the_target_is_recoverable(text_data):
    _, examples = noised(text_data, rotation=1.0)
    offsets = []
    for example in examples:
        source, target = bodies(example)
        offset = example.record["rotation_offset"]
        assert 1 <= offset < len(target)
        assert source.tolist() == target[offset:].tolist() + target[:offset].tolist()
        assert np.roll(source, offset).tolist() == target.tolist()
        offsets.append(offset / len(target))
    assert 0.4 < np.mean(offsets) < 0.6  # uniform over the document


def test_rotation_rate_is_a_probability(text_data):
    _, examples = noised(text_data, epochs=3, rotation=0.3)
    rotated = np.mean([e.record["rotation_offset"] > 0 for e in examples])
    assert abs(rotated - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(examples))


def test_deletion_removes_the_configured_fraction(text_data):
    _, examples = noised(text_data, epochs=2, deletion=0.3, whole_word=False)
    removed = total = 0
    for example in examples:
        source, target = bodies(example)
        # The source is the target with tokens removed: a subsequence, in order.
        remaining = iter(target.tolist())
        assert all(token in remaining for token in source.tolist())
        removed += len(target) - len(source)
        total += len(target)
        assert len(target) - len(source) == example.record["deleted_tokens"]
    assert abs(removed / total - 0.3) < rounding_tolerance(len(examples), total)


def test_masking_rate_and_whole_words(text_data):
    tokenizer, _ = text_data
    documents, examples = noised(text_data, epochs=2, masking=0.3)
    masked_tokens = total = masked_words = words = 0
    for (_, lengths), example in zip(documents, examples):
        source, target = bodies(example)
        assert len(source) == len(target)  # masking replaces, one for one
        masked = source == tokenizer.mask_id
        assert (source[~masked] == target[~masked]).all()
        masked_tokens += int(masked.sum())
        total += len(target)
        # Whole words: a masked token that continues a word (not at a sentence start) follows a masked token.
        continues = ~tokenizer.word_start[target]
        sentence_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        continues[sentence_starts[sentence_starts < len(target)]] = False
        assert not (masked[1:] & continues[1:] & ~masked[:-1]).any()
        # Words (a word-start piece, or a sentence start) read off the output: the budget, exactly.
        masked_words += int((masked & ~continues).sum())
        words += int((~continues).sum())
        assert (masked & ~continues).sum() == example.record["masked_units"]
    assert abs(masked_words / words - 0.3) < rounding_tolerance(len(examples), words)
    rate = masked_tokens / total
    standard_error = math.sqrt(rate * (1 - rate) / total) * 3  # words of several tokens are masked together
    assert abs(rate - 0.3) < 4 * standard_error


def test_mask_random_replaces_that_share_of_the_masks(text_data):
    tokenizer, _ = text_data
    _, examples = noised(text_data, epochs=2, masking=0.3, infilling=0.3, mask_random=0.1)
    masks = sum(int((e.source == tokenizer.mask_id).sum()) for e in examples)
    replaced = sum(e.record["random_replacements"] for e in examples)
    assert abs(replaced / (masks + replaced) - 0.1) < 4 * math.sqrt(0.09 / (masks + replaced))
    bodies_ids = np.concatenate([e.source[1:-1] for e in examples])
    assert not tokenizer.is_special[bodies_ids[bodies_ids != tokenizer.mask_id]].any()  # replacements are real tokens


def test_combined_corruptions_take_disjoint_shares(text_data):
    _, examples = noised(text_data, epochs=2, masking=0.2, deletion=0.2, infilling=0.3, permutation=1.0, rotation=0.5)
    stats = noising.realised_stats([e.record for e in examples])
    tolerance = rounding_tolerance(len(examples), stats["units"])
    assert abs(stats["masked_unit_fraction"] - 0.2) < tolerance
    assert abs(stats["deleted_unit_fraction"] - 0.2) < tolerance
    assert abs(stats["infilled_unit_fraction"] - 0.3) < tolerance
    tokenizer = text_data[0]
    for example in examples:
        record = example.record
        assert record["masked_units"] + record["deleted_units"] + record["infilled_units"] <= record["units"]
        # Unrotated and uncut, the source is the target (its sentences reordered) minus the deleted and
        # infilled tokens, plus one [MASK] per span; masked tokens are [MASK]s one for one.
        if record["rotation_offset"] == 0 and record["source_cut_tokens"] == 0:
            source, target = bodies(example)
            spans = len(record["span_lengths"])
            assert len(source) == len(target) - record["deleted_tokens"] - record["infilled_tokens"] + spans
            assert (source == tokenizer.mask_id).sum() == record["masked_tokens"] + spans


def test_pure_function_of_seed_epoch_and_index(text_data):
    tokenizer, documents = text_data
    settings = dict(infilling=0.3, permutation=1.0, rotation=0.5, masking=0.1, mask_random=0.1)
    noiser = noising.Noiser(noising.NoisingSpec(**settings), tokenizer, MAX_LENGTH)
    batch = noiser(documents[:16], 3, np.arange(100, 116))
    # The same example alone, or in another batch order, comes out the same.
    reversed_batch = noiser(documents[:16][::-1], 3, np.arange(115, 99, -1))
    for key in batch:
        np.testing.assert_array_equal(batch[key], reversed_batch[key][::-1])
    alone = noiser.example(*documents[5], 3, 105)
    np.testing.assert_array_equal(alone.source, batch["input_ids"][5, : len(alone.source)])
    # Another epoch, another index or another seed: other noise, the same targets.
    for other in (noiser(documents[:16], 4, np.arange(100, 116)), noiser(documents[:16], 3, np.arange(200, 216))):
        np.testing.assert_array_equal(other["labels"], batch["labels"])
        assert (other["input_ids"] != batch["input_ids"]).any(axis=1).all()
    reseeded = noising.Noiser(noising.NoisingSpec(**settings, seed=1), tokenizer, MAX_LENGTH)(documents[:16], 3, np.arange(100, 116))
    assert (reseeded["input_ids"] != batch["input_ids"]).any(axis=1).all()


def test_the_batch_contract(text_data):
    tokenizer, documents = text_data
    noiser = noising.Noiser(noising.NoisingSpec(infilling=0.3, permutation=1.0), tokenizer, 64)
    examples = noiser.examples(documents[:8], 0, np.arange(8))
    batch = noiser.collate(examples)
    direct = noiser(documents[:8], 0, np.arange(8))  # straight from the rows, as training gets it
    for key in batch:
        np.testing.assert_array_equal(direct[key], batch[key])
    assert set(batch) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels", "label_weights"}
    for value in batch.values():
        assert value.shape == (8, 64) and value.dtype == np.int32
    for row, example in enumerate(examples):
        source_length, target_length = len(example.source), len(example.target)
        assert batch["input_ids"][row, :source_length].tolist() == example.source.tolist()
        assert (batch["input_ids"][row, source_length:] == tokenizer.pad_id).all()
        assert batch["attention_mask"][row].sum() == source_length and batch["attention_mask"][row, :source_length].all()
        assert batch["labels"][row, :target_length].tolist() == example.target.tolist()
        assert batch["labels"][row, 0] == tokenizer.cls_id and batch["labels"][row, target_length - 1] == tokenizer.sep_id
        assert batch["label_weights"][row].tolist() == [1] * target_length + [0] * (64 - target_length)
        # Teacher forcing: the decoder reads the target shifted right, starting from [EOS] as BART does.
        assert batch["decoder_input_ids"][row, 0] == tokenizer.sep_id
        assert batch["decoder_input_ids"][row, 1:target_length].tolist() == example.target[:-1].tolist()
        assert (batch["decoder_input_ids"][row, target_length:] == tokenizer.pad_id).all()
        np.testing.assert_array_equal(batch["decoder_attention_mask"][row], batch["label_weights"][row])


def test_empty_single_sentence_and_overlong_documents_are_counted_repairs(text_data):
    tokenizer, documents = text_data
    spec = noising.NoisingSpec(infilling=0.3, permutation=1.0, rotation=1.0)
    noiser = noising.Noiser(spec, tokenizer, 64)
    empty = noiser.example(np.zeros(0, np.int32), np.zeros(0, np.int64), 0, 0)
    assert empty.source.tolist() == empty.target.tolist() == [tokenizer.cls_id, tokenizer.sep_id]
    assert empty.record["empty"]
    tokens, lengths = next(d for d in documents if len(d[1]) > 1 and 10 < d[1][0] < 60)
    single = noiser.example(tokens[: lengths[0]], lengths[:1], 0, 1)
    assert single.record["single_sentence"] and not single.record["permuted"]
    long_tokens, long_lengths = next(d for d in documents if len(d[0]) > 200)
    overlong = noiser.example(long_tokens, long_lengths, 0, 2)
    assert len(overlong.target) == 64 and overlong.target[1:-1].tolist() == long_tokens[:62].tolist()
    assert overlong.record["cut_tokens"] == len(long_tokens) - 62 and len(overlong.source) <= 64
    # Many 0-length spans insert more [MASK]s than they cover: the source's tail is cut, and counted.
    grower = noising.Noiser(noising.NoisingSpec(infilling=1.0, poisson_lambda=0.2), tokenizer, 64)
    grown = grower.example(long_tokens, long_lengths, 0, 3)
    assert len(grown.source) == 64 and grown.source[-1] == tokenizer.sep_id and grown.record["source_cut_tokens"] > 0
    stats = noising.realised_stats([empty.record, single.record, overlong.record, grown.record])
    assert stats["empty_documents"] == 1 and stats["single_sentence_documents"] == 1
    assert stats["cut_documents"] == 2 and stats["source_cut_tokens"] == grown.record["source_cut_tokens"]


def test_batch_builder_corrupts_the_chunks_of_objective_none_instances(text_data):
    """What loader.batches maps over (instance id, epoch) pairs for a seq2seq config."""
    from bertjax.data import pretraining

    tokenizer, documents = text_data
    prepared = corpus.TokenizedDocuments.from_records([(tokens, lengths) for tokens, lengths in documents])
    instances, _ = pretraining.create_instances(prepared, MAX_LENGTH, 0.1, "none", 0)
    noiser = noising.Noiser(noising.NoisingSpec(infilling=0.3, permutation=1.0), tokenizer, MAX_LENGTH)
    ids_and_epochs = np.array([[5, 0], [9, 2], [40, 1]])
    batch = noising.BatchBuilder(prepared, instances, noiser)(ids_and_epochs)
    for row, (instance, epoch) in enumerate(ids_and_epochs.tolist()):
        start, length = int(instances.a_start[instance]), int(instances.a_length[instance])
        chunk = prepared.tokens[start : start + length]
        assert batch["labels"][row, 1 : length + 1].tolist() == chunk.tolist()
        expected = noiser.example(*noising.segment(prepared.tokens, prepared.sentence_offsets, start, length), epoch, instance)
        assert batch["input_ids"][row, : len(expected.source)].tolist() == expected.source.tolist()


def test_segment_splits_a_flat_array_at_its_sentence_offsets():
    tokens = np.arange(20)
    offsets = np.array([0, 4, 9, 15, 20])
    piece, lengths = noising.segment(tokens, offsets, 6, 12)
    assert piece.tolist() == list(range(6, 18)) and lengths.tolist() == [3, 6, 3]
    assert noising.segment(tokens, offsets, 4, 5)[1].tolist() == [5]


def noising_settings(**overrides):
    config = ml_collections.ConfigDict({"data": {"seed": 0, "noising": config_lib.noising_config()}})
    config.data.noising.update(overrides)
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(infilling=1.5), "config.data.noising.infilling=1.5: must be in [0, 1]"),
        (dict(rotation=-0.1), "config.data.noising.rotation=-0.1: must be in [0, 1]"),
        (dict(masking=0.5, deletion=0.4), "masking + deletion + infilling = 1.2"),
        (dict(poisson_lambda=0.0), "config.data.noising.poisson_lambda=0.0: must be positive"),
    ],
)
def test_invalid_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")) as error:
        config_lib.validate(noising_settings(**overrides))
    assert "\n" not in str(error.value)


def test_noising_config_switches_corruptions_on_by_name():
    bart = config_lib.noising_config()
    assert (bart.infilling, bart.permutation, bart.masking, bart.deletion, bart.rotation) == (0.3, 1.0, 0.0, 0.0, 0.0)
    spec = noising.NoisingSpec.from_config(ml_collections.ConfigDict({"data": {"seed": 7, "noising": config_lib.noising_config("rotation")}}))
    assert (spec.rotation, spec.infilling, spec.seed) == (1.0, 0.0, 7)
    eval_spec = noising.NoisingSpec.from_config(ml_collections.ConfigDict({"data": {"seed": 7, "noising": config_lib.noising_config()}}), "eval")
    assert eval_spec.seed == masking.EVAL_SEED  # held-out sources do not depend on the data seed
    with pytest.raises(ConfigError, match="unknown corruption 'shuffle'"):
        config_lib.noising_config("shuffle")
    config = noising_settings()
    config.data.noising.span_mean = 3.0
    with pytest.raises(ConfigError, match=r"unknown keys \['span_mean'\]"):
        config_lib.validate(config)


def test_data_stats_and_show_verbs_for_a_seq2seq_config(shared_data, tmp_path, capsys):
    """`bertjax data stats|show` on a config with data.noising: realised corruption rates, source above target."""
    from bertjax import cli

    text = corpus.read_text(shared_data / "corpus" / "pride-and-prejudice.txt")
    start = text.index("It is a truth universally acknowledged")
    (tmp_path / "novel.txt").write_text(text[start : start + 60_000])
    (tmp_path / "denoise.py").write_text(
        "from bertjax import config as config_lib\n\n\n"
        "def get_config():\n"
        "    config = config_lib.pretrain_config('tiny')\n"
        "    config.data.sentence_objective = 'none'\n"
        "    config.data.noising = config_lib.noising_config('infilling', 'permutation', 'rotation')\n"
        "    return config\n"
    )
    overrides = [
        f"--config={tmp_path / 'denoise.py'}",
        f"--config.data.corpus={tmp_path / 'novel.txt'}",
        f"--config.data.data_dir={tmp_path / 'cache'}",
        "--config.model.vocab_size=400",
        "--config.data.max_seq_length=64",
        "--config.train.batch_size=8",
    ]
    assert cli.main(["data", "stats", "--batches", "20", *overrides]) in (None, 0)
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["examples"] == 160 and stats["split"] == "train" and stats["configured"]["infilling"] == 0.3
    assert abs(stats["infilled_unit_fraction"] - 0.3) < rounding_tolerance(160, stats["units"])
    # Every example is rotated but those too short to rotate (counted).
    assert round(stats["rotated_fraction"] * 160) + stats["unrotatable_documents"] + stats["empty_documents"] == 160
    assert stats["masked_fraction"] == stats["deleted_fraction"] == 0.0
    assert cli.main(["data", "show", "--examples", "2", *overrides]) in (None, 0)
    shown = capsys.readouterr().out
    assert shown.count("--- example") == 2 and shown.count("source: [CLS]") == 2 and "[MASK]" in shown
    assert shown.count("target: [CLS]") == 2
    assert cli.main(["data", "stats", "--split", "eval", "--batches", "1", *overrides]) in (None, 0)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["split"] == "eval"
    assert cli.main(["data", "stats", *overrides, "--config.data.sentence_objective=nsp"]) == 1
    assert "sentence_objective='nsp'" in capsys.readouterr().err
