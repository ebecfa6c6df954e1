"""Pretraining instances: NSP/SOP/none pairs are what they claim, balanced, fit the sequence, and assemble right."""

import types

import numpy as np
import pytest

from bertjax.data import corpus, pretraining

CLS, SEP, PAD = 2, 3, 0


def synthetic_documents(num_documents=60, seed=0, single_sentence_documents=0, long_sentence=0):
    """Token id = 5 + position in the flat token array, so a token says which sentence and document it is."""
    rng = np.random.default_rng(seed)
    records = []
    cursor = 5
    for document in range(num_documents):
        count = 1 if document < single_sentence_documents else int(rng.integers(3, 15))
        lengths = rng.integers(3, 20, size=count)
        if document == num_documents - 1 and long_sentence:
            lengths[0] = long_sentence
        total = int(lengths.sum())
        records.append((np.arange(cursor, cursor + total, dtype=np.int32), lengths.astype(np.int32)))
        cursor += total
    docs = corpus.TokenizedDocuments.from_records(records)
    assert (docs.tokens == np.arange(5, 5 + len(docs.tokens))).all()
    return docs


def locate(docs, token_offsets):
    """Sentence and document of flat token offsets."""
    sentence = np.searchsorted(docs.sentence_offsets, token_offsets, side="right") - 1
    document = np.searchsorted(docs.document_offsets, sentence, side="right") - 1
    return sentence, document


def untruncated(instances, max_tokens):
    """Truncation trims a pair to exactly max_tokens, so a shorter pair was not truncated."""
    return instances.a_length + instances.b_length < max_tokens


def test_nsp_pairs_are_real_continuations_or_from_another_document():
    docs = synthetic_documents(200)
    instances, report = pretraining.create_instances(docs, 96, 0.1, "nsp", seed=0)
    a_end = instances.a_start + instances.a_length - 1
    a_last_sentence, a_document = locate(docs, a_end)
    a_first_sentence, a_document_first = locate(docs, instances.a_start)
    b_first_sentence, b_document = locate(docs, instances.b_start)
    _, b_document_last = locate(docs, instances.b_start + instances.b_length - 1)
    assert (a_document == a_document_first).all() and (b_document == b_document_last).all()
    assert (instances.a_length > 0).all() and (instances.b_length > 0).all()
    assert (instances.a_length + instances.b_length <= 96 - 3).all()
    real = instances.label == 0
    assert (a_document[real] == b_document[real]).all()
    assert (a_document[~real] != b_document[~real]).all()
    np.testing.assert_array_equal(b_document, instances.b_document)
    whole = untruncated(instances, 93)
    assert (real & whole).sum() > 50
    np.testing.assert_array_equal(b_first_sentence[real & whole], a_last_sentence[real & whole] + 1)
    np.testing.assert_array_equal(instances.b_start[real & whole], (instances.a_start + instances.a_length)[real & whole])
    n = len(instances)
    assert abs(instances.label.mean() - 0.5) < 3 * np.sqrt(0.25 / n), (instances.label.mean(), n)
    assert report["label_1_fraction"] == pytest.approx(instances.label.mean())


def test_sop_swapped_pairs_are_consecutive_pairs_reversed():
    docs = synthetic_documents(200, seed=1)
    instances, _ = pretraining.create_instances(docs, 96, 0.1, "sop", seed=0)
    _, a_document = locate(docs, instances.a_start)
    _, b_document = locate(docs, instances.b_start)
    assert (a_document == b_document).all()
    whole = untruncated(instances, 93)
    swapped = instances.label == 1
    # In order: B starts where A ends. Swapped: A starts where B ends (B is the earlier text).
    in_order = ~swapped & whole
    np.testing.assert_array_equal(instances.b_start[in_order], instances.a_start[in_order] + instances.a_length[in_order])
    reversed_ = swapped & whole
    assert reversed_.sum() > 50
    np.testing.assert_array_equal(instances.a_start[reversed_], instances.b_start[reversed_] + instances.b_length[reversed_])
    assert (instances.b_start[swapped] < instances.a_start[swapped]).all()
    assert abs(swapped.mean() - 0.5) < 3 * np.sqrt(0.25 / len(instances))


def test_none_objective_is_one_contiguous_segment():
    docs = synthetic_documents(100, seed=2)
    instances, report = pretraining.create_instances(docs, 64, 0.0, "none", seed=0)
    assert (instances.b_length == 0).all()
    assert (instances.a_length <= 62).all()
    _, first_document = locate(docs, instances.a_start)
    _, last_document = locate(docs, instances.a_start + instances.a_length - 1)
    assert (first_document == last_document).all()
    assert report["label_1_fraction"] is None
    batch = pretraining.assemble(docs.tokens, instances, np.arange(8), 64, types.SimpleNamespace(cls_id=CLS, sep_id=SEP, pad_id=PAD))
    assert "sentence_label" not in batch
    assert (batch["token_type_ids"] == 0).all()


def test_short_documents_and_long_sentences_are_reported_not_lost_silently():
    docs = synthetic_documents(50, seed=3, single_sentence_documents=5, long_sentence=300)
    instances, report = pretraining.create_instances(docs, 64, 0.0, "nsp", seed=0)
    assert report["single_sentence_documents_unused"] == 5
    assert report["long_sentences_split"] == 1
    assert (instances.a_length + instances.b_length <= 61).all()
    # The long sentence's tokens are used, in pieces.
    long_start = docs.sentence_offsets[docs.document_offsets[-2]]
    covered = np.zeros(len(docs.tokens), bool)
    for start, length in zip(np.concatenate([instances.a_start, instances.b_start]), np.concatenate([instances.a_length, instances.b_length])):
        covered[start : start + length] = True
    assert covered[long_start : long_start + 300].mean() > 0.5
    with pytest.raises(corpus.CorpusError, match="^no pretraining instance in this split: 4 documents, 4 of them with a single sentence"):
        pretraining.create_instances(synthetic_documents(4, single_sentence_documents=4), 64, 0.0, "sop", seed=0)


def test_short_seq_prob_makes_short_sequences():
    docs = synthetic_documents(200, seed=4)
    long_only, _ = pretraining.create_instances(docs, 128, 0.0, "sop", seed=0)
    some_short, _ = pretraining.create_instances(docs, 128, 0.5, "sop", seed=0)
    mean_length = lambda inst: np.mean(inst.a_length + inst.b_length)  # noqa: E731
    assert mean_length(some_short) < 0.85 * mean_length(long_only)
    assert len(some_short) > 1.1 * len(long_only)


def test_instances_are_deterministic_in_the_seed():
    docs = synthetic_documents(80, seed=5)
    first, _ = pretraining.create_instances(docs, 64, 0.1, "nsp", seed=7)
    again, _ = pretraining.create_instances(docs, 64, 0.1, "nsp", seed=7)
    other, _ = pretraining.create_instances(docs, 64, 0.1, "nsp", seed=8)
    np.testing.assert_array_equal(first.a_start, again.a_start)
    np.testing.assert_array_equal(first.label, again.label)
    assert len(first) != len(other) or (first.label != other.label).any()


def test_assemble_lays_out_cls_a_sep_b_sep_and_padding():
    docs = synthetic_documents(50, seed=6)
    instances, _ = pretraining.create_instances(docs, 64, 0.1, "nsp", seed=0)
    index = np.arange(len(instances))
    tokenizer = types.SimpleNamespace(cls_id=CLS, sep_id=SEP, pad_id=PAD)
    batch = pretraining.assemble(docs.tokens, instances, index, 64, tokenizer)
    for key in ("input_ids", "token_type_ids", "attention_mask", "sentence_label"):
        assert batch[key].dtype == np.int32
    for row in range(len(instances)):
        a = docs.tokens[instances.a_start[row] : instances.a_start[row] + instances.a_length[row]]
        b = docs.tokens[instances.b_start[row] : instances.b_start[row] + instances.b_length[row]]
        expected = np.concatenate([[CLS], a, [SEP], b, [SEP]])
        length = len(expected)
        np.testing.assert_array_equal(batch["input_ids"][row, :length], expected)
        assert (batch["input_ids"][row, length:] == PAD).all()
        np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(64) < length)
        np.testing.assert_array_equal(batch["token_type_ids"][row, :length], [0] * (len(a) + 2) + [1] * (len(b) + 1))
        assert (batch["token_type_ids"][row, length:] == 0).all()
    np.testing.assert_array_equal(batch["sentence_label"], instances.label)


def test_nsp_on_one_document_is_an_error_not_a_one_label_split():
    with pytest.raises(corpus.CorpusError, match="needs at least two documents .* but the eval split of 'play.txt' has 1: give a larger"):
        pretraining.create_instances(synthetic_documents(1), 64, 0.0, "nsp", seed=0, name="the eval split of 'play.txt'")
    instances, _ = pretraining.create_instances(synthetic_documents(1), 64, 0.0, "sop", seed=0)
    assert len(instances) >= 1, "SOP pairs come from within a document: one is enough"


def test_the_eval_split_holds_two_documents_so_nsp_has_negatives():
    documents = [[f"document {i} sentence {j}." for j in range(3)] for i in range(40)]
    digests = [corpus.document_hash(document) for document in documents]
    assert len(set(digests)) == 40
    assert corpus._eval_choice(digests, 0.01).sum() == 2
    assert corpus._eval_choice(digests, 0.25).sum() == 10
    assert corpus._eval_choice(digests[:3], 0.01).sum() == 1
