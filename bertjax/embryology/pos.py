"""Measure 1: token reconstruction and masked-word prediction accuracy by part of speech (Chiang et al., 2020, section 3).

On a UPOS-tagged set (UD English EWT test by default), each word tokenised on its own:
  reconstruction  the input is left unmasked and the MLM head is asked for every piece of every word
  prediction      every word is masked once, all of its pieces replaced by [MASK]: the words of a
                  sentence are split into groups of about mask_rate of its words, no two neighbours
                  in one group, and each group is one masked copy of the sentence (seeded, so every
                  checkpoint sees the same copies)
A word is correct only when all of its pieces are. Words cut off by max_seq_length are not scored
(`truncated_words` counts them); CoNLL-U multiword-token and empty-node lines are not words of the
tagged sequence (`skipped_lines` counts them).
"""

from __future__ import annotations

import collections
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from bertjax.data import tasks
from bertjax.embryology import features as features_lib

MEASURES = ("reconstruction", "prediction")
ALL = "ALL"
# The pos config's keys (configs/embryology.py sets them; a key it lacks takes this value).
DEFAULTS = dict(max_sentences=300, seed=0, mask_rate=0.15, max_seq_length=128, batch_size=32)

_MULTIWORD_ID = re.compile(r"^\d+-\d+\t")
_EMPTY_NODE_ID = re.compile(r"^\d+\.\d+\t")


def setting(config, key: str):
    return config[key] if config is not None and key in config else DEFAULTS[key]


def skipped_lines(path) -> dict[str, int]:
    """How many multiword-token (`3-4 don't`) and empty-node (`8.1`) lines `tasks.read_conllu` left out of `path`."""
    counts = {"multiword_tokens": 0, "empty_nodes": 0}
    with open(pathlib.Path(path), encoding="utf-8-sig") as lines:
        for line in lines:
            counts["multiword_tokens"] += bool(_MULTIWORD_ID.match(line))
            counts["empty_nodes"] += bool(_EMPTY_NODE_ID.match(line))
    return counts


def choose_sentences(sentences: Sequence[tasks.TaggedSentence], max_sentences: int, seed: int) -> list[tasks.TaggedSentence]:
    """A seeded sample of max_sentences (in file order; 0 = all): the same words at every checkpoint."""
    if not max_sentences or max_sentences >= len(sentences):
        return list(sentences)
    chosen = np.sort(np.random.default_rng(seed).choice(len(sentences), max_sentences, replace=False))
    return [sentences[index] for index in chosen]


def masking_groups(num_words: int, mask_rate: float, rng: np.random.Generator) -> list[list[int]]:
    """Every word index 0..num_words-1 in exactly one group; groups hold at most max(1, round(rate * n))
    words and never two neighbours. Words are placed in a random order, each into the first group that takes it."""
    size = max(1, round(mask_rate * num_words))
    groups: list[list[int]] = []
    for word in rng.permutation(num_words):
        for group in groups:
            if len(group) < size and word - 1 not in group and word + 1 not in group:
                group.append(int(word))
                break
        else:
            groups.append([int(word)])
    return [sorted(group) for group in groups]


def _words_correct(reference_ids, positions, predicted, word_batch: features_lib.WordBatch, rows) -> np.ndarray:
    """[R, W] bool: for each row, is every scored piece inside each word predicted as the reference piece?"""
    wrong = np.zeros(reference_ids.shape, np.int32)
    scored = positions >= 0
    row_index = np.nonzero(scored)[0]
    wrong[row_index, positions[scored]] = predicted[scored] != reference_ids[row_index, positions[scored]]
    # Wrong pieces in [start, end) from a running count: no loop over words.
    cumulative = np.concatenate([np.zeros((len(wrong), 1), np.int32), np.cumsum(wrong, axis=1)], axis=1)
    start, end = np.maximum(word_batch.word_start[rows], 0), np.maximum(word_batch.word_end[rows], 0)
    return np.take_along_axis(cumulative, end, axis=1) == np.take_along_axis(cumulative, start, axis=1)


def word_accuracy(model: features_lib.Model, word_batch: features_lib.WordBatch, mask_rate: float, seed: int, batch_size: int) -> dict[str, np.ndarray]:
    """{'reconstruction': [N, W] bool, 'prediction': [N, W] bool}: each kept word's correctness."""
    kept = word_batch.kept
    positions = features_lib.positions_of(word_batch, kept)
    predicted = model.predict_ids(word_batch.input_ids, word_batch.attention_mask, positions, batch_size=batch_size)
    rows = np.arange(len(kept))
    reconstruction = _words_correct(word_batch.input_ids, positions, predicted, word_batch, rows) & kept

    # Prediction: one masked copy of a sentence per group of words.
    copy_rows, copy_words = [], []
    for row, count in enumerate(kept.sum(axis=1)):
        for group in masking_groups(int(count), mask_rate, np.random.default_rng((seed, row))):
            words = np.zeros(kept.shape[1], bool)
            words[group] = True
            copy_rows.append(row)
            copy_words.append(words)
    copy_rows, copy_words = np.asarray(copy_rows, np.int64), np.asarray(copy_words, bool).reshape(-1, kept.shape[1])
    copies = features_lib.WordBatch(
        word_batch.input_ids[copy_rows],
        word_batch.attention_mask[copy_rows],
        word_batch.word_start[copy_rows],
        word_batch.word_end[copy_rows],
        word_batch.num_words[copy_rows],
    )
    masked_positions = features_lib.positions_of(copies, copy_words)
    masked_ids = copies.input_ids.copy()
    scored = masked_positions >= 0
    masked_ids[np.nonzero(scored)[0], masked_positions[scored]] = model.tokenizer.mask_id
    predicted = model.predict_ids(masked_ids, copies.attention_mask, masked_positions, batch_size=batch_size)
    correct = _words_correct(copies.input_ids, masked_positions, predicted, copies, np.arange(len(copy_rows)))
    prediction = np.zeros_like(kept)
    copy, word = np.nonzero(copy_words)
    prediction[copy_rows[copy], word] = correct[copy, word]
    return {"reconstruction": reconstruction, "prediction": prediction}


def evaluate(model: features_lib.Model, sentences: Sequence[tasks.TaggedSentence], pos_config=None) -> list[dict]:
    """Rows {measure, layer: None, label: UPOS tag or 'ALL', value: accuracy, n: words} for both measures."""
    sentences = choose_sentences(sentences, setting(pos_config, "max_sentences"), setting(pos_config, "seed"))
    word_batch = model.encode_words([sentence.words for sentence in sentences], setting(pos_config, "max_seq_length"))
    correct = word_accuracy(model, word_batch, setting(pos_config, "mask_rate"), setting(pos_config, "seed"), setting(pos_config, "batch_size"))
    tags = np.full(word_batch.kept.shape, "", dtype=object)
    for row, sentence in enumerate(sentences):
        tags[row, : len(sentence.tags)] = sentence.tags[: tags.shape[1]]
    kept_tags = tags[word_batch.kept]
    rows = []
    for measure in MEASURES:
        kept_correct = correct[measure][word_batch.kept]
        totals, rights = collections.Counter(kept_tags), collections.Counter(kept_tags[kept_correct])
        for label in sorted(totals):
            rows.append({"measure": measure, "layer": None, "label": label, "value": rights[label] / totals[label], "n": totals[label]})
        rows.append({"measure": measure, "layer": None, "label": ALL, "value": float(kept_correct.mean()) if kept_correct.size else 0.0, "n": int(kept_correct.size)})
    return rows


def truncated_words(model: features_lib.Model, sentences: Sequence[tasks.TaggedSentence], pos_config=None) -> int:
    """How many words of the evaluated sentences max_seq_length cuts off (not scored by `evaluate`)."""
    sentences = choose_sentences(sentences, setting(pos_config, "max_sentences"), setting(pos_config, "seed"))
    return model.encode_words([sentence.words for sentence in sentences], setting(pos_config, "max_seq_length")).truncated
