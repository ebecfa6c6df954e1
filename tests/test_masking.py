"""Masking: realised statistics, special tokens, whole words, spans, and purity in (seed, epoch, index)."""

import types

import numpy as np
import pytest

from bertjax.data import masking

VOCAB = 1000
PAD, UNK, CLS, SEP, MASK = range(5)


def fake_tokenizer(seed=0):
    """A vocabulary where every third piece continues a word (like '##x' or a piece without '▁')."""
    is_special = np.zeros(VOCAB, bool)
    is_special[:5] = True
    word_start = np.ones(VOCAB, bool)
    word_start[5::3] = False
    return types.SimpleNamespace(mask_id=MASK, is_special=is_special, word_start=word_start)


def fake_batch(batch=64, length=128, seed=0):
    """[CLS] A [SEP] B [SEP] [PAD]... with random real lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(batch, length))
    real = rng.integers(20, length - 3, size=batch)
    split = rng.integers(5, real - 5)
    position = np.arange(length)[None]
    ids = np.where(position == 0, CLS, ids)
    ids = np.where(position == split[:, None], SEP, ids)
    ids = np.where(position == real[:, None], SEP, ids)
    ids = np.where(position > real[:, None], PAD, ids)
    return ids.astype(np.int32)


def run(spec, ids, epoch=0, start=0):
    examples = np.arange(start, start + len(ids))
    return masking.Masker(spec, fake_tokenizer())(ids, np.full(len(ids), epoch), examples)


@pytest.mark.parametrize("split", [(0.8, 0.1, 0.1), (0.5, 0.2, 0.3)])
def test_realised_rate_and_split_match_config(split):
    spec = masking.MaskingSpec(rate=0.15, mask=split[0], random=split[1], keep=split[2], max_predictions=40)
    ids = fake_batch(batch=4000, seed=1)
    out = run(spec, ids)
    real = (ids >= 5).sum(1)
    weights = out["masked_weights"].astype(bool)
    # Per row: exactly round(rate * real tokens) predictions (at least 1, at most max_predictions).
    expected = np.clip(np.floor(0.15 * real + 0.5), 1, 40)
    np.testing.assert_array_equal(weights.sum(1), expected)
    shown = np.take_along_axis(out["input_ids"], out["masked_positions"], 1)[weights]
    original = out["masked_ids"][weights]
    n = weights.sum()
    is_mask = shown == MASK
    changed = ~is_mask & (shown != original)
    kept = shown == original
    # Three standard errors; a random replacement equal to the original (p = 1/995) counts as kept.
    for realised, target in ((is_mask.mean(), split[0]), (changed.mean(), split[1]), (kept.mean(), split[2])):
        assert abs(realised - target) < 3 * np.sqrt(target * (1 - target) / n) + 2e-3
    # Unchosen positions are untouched, and the targets are the original tokens.
    untouched = np.ones_like(ids, bool)
    np.put_along_axis(untouched, out["masked_positions"], ~weights, axis=1)
    untouched[:, 0] = True
    np.testing.assert_array_equal(out["input_ids"][untouched], ids[untouched])
    np.testing.assert_array_equal(original, np.take_along_axis(ids, out["masked_positions"], 1)[weights])
    # Random replacements never draw special tokens.
    assert (shown[changed] >= 5).all()


@pytest.mark.parametrize("mode", ["token", "whole_word", "span"])
def test_special_tokens_and_padding_never_chosen(mode):
    spec = masking.MaskingSpec(rate=0.4, max_predictions=60, whole_word=mode == "whole_word", span=mode == "span")
    ids = fake_batch(batch=300, seed=2)
    out = run(spec, ids)
    weights = out["masked_weights"].astype(bool)
    chosen_ids = out["masked_ids"][weights]
    assert (chosen_ids >= 5).all()
    # Positions within a row are distinct and sorted; padding slots have weight 0 and position 0.
    positions = np.where(weights, out["masked_positions"], -1)
    for row in positions:
        real = row[row >= 0]
        assert (np.diff(real) > 0).all()
    assert (out["masked_positions"][~weights] == 0).all()


def word_spans(ids, word_start):
    """(start, end) of every word: a word starts at a word-start piece or after a special token."""
    spans = []
    for row in ids:
        row_spans, start = [], None
        for position, token in enumerate(row):
            special = token < 5
            if special or word_start[token] or start is None:
                if start is not None:
                    row_spans.append((start, position))
                start = None if special else position
        if start is not None:
            row_spans.append((start, len(row)))
        spans.append(row_spans)
    return spans


def test_whole_word_masks_every_piece_of_a_chosen_word():
    spec = masking.MaskingSpec(rate=0.15, max_predictions=30, whole_word=True)
    ids = fake_batch(batch=200, seed=3)
    out = run(spec, ids)
    chosen = np.zeros_like(ids, bool)
    np.put_along_axis(chosen, out["masked_positions"], out["masked_weights"].astype(bool), axis=1)
    multi_piece_words = 0
    for row, spans in enumerate(word_spans(ids, fake_tokenizer().word_start)):
        for start, end in spans:
            assert chosen[row, start:end].all() or not chosen[row, start:end].any(), (row, start, end)
            multi_piece_words += end - start > 1 and chosen[row, start]
    assert multi_piece_words > 100
    # The budget is respected and nearly met (a word that does not fit is skipped).
    real = (ids >= 5).sum(1)
    budget = np.clip(np.floor(0.15 * real + 0.5), 1, 30)
    count = chosen.sum(1)
    assert (count <= budget).all() and count.mean() > 0.85 * budget.mean()


def test_span_masking_lengths():
    spec = masking.MaskingSpec(rate=0.3, max_predictions=40, span=True, span_mean=3.0, span_max=6)
    tokenizer = fake_tokenizer()
    tokenizer.word_start[:] = True  # one piece per word: span length in words = in tokens
    ids = fake_batch(batch=500, seed=4)
    out = masking.Masker(spec, tokenizer)(ids, np.zeros(len(ids)), np.arange(len(ids)))
    chosen = np.zeros_like(ids, bool)
    np.put_along_axis(chosen, out["masked_positions"], out["masked_weights"].astype(bool), axis=1)
    chosen[:, 0] = False
    runs = []
    for row in chosen:
        edges = np.diff(np.concatenate([[0], row.astype(int), [0]]))
        runs.extend(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    runs = np.array(runs)
    # Adjacent spans can merge into one run, so runs may exceed span_max a little, rarely.
    assert np.mean(runs <= 6) > 0.9
    # Geometric(1/3) clipped at 6 has mean sum_{k<6} (2/3)^k = 2.74; budget rejections favour short spans.
    assert 1.8 < runs.mean() < 3.2
    assert np.mean(runs > 1) > 0.5  # spans, not isolated tokens


def chinese_tokenizer():
    """One piece per character, as bertjax's tokenizers have Chinese, and a Latin word and its suffix."""
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "\u2581iPhone", "iPhone", "s", "。", *"我喜欢用拍照今天天气很好北京大学"]
    is_special = np.arange(len(pieces)) < 5
    is_cjk = np.array([len(p) == 1 and "\u3001" <= p <= "\u9fff" for p in pieces])
    word_start = is_special | is_cjk | np.array([p.startswith("\u2581") for p in pieces])
    return types.SimpleNamespace(mask_id=MASK, is_special=is_special, word_start=word_start, is_cjk=is_cjk, pieces=pieces)


@pytest.mark.parametrize("mode", ["whole_word", "span"])
def test_chinese_words_are_jieba_words_masked_whole(mode):
    pytest.importorskip("jieba")
    tokenizer = chinese_tokenizer()
    index = {piece: i for i, piece in enumerate(tokenizer.pieces)}
    # 我|喜欢|用|iPhone s|拍照|。|今天天气|很|好|。|北京大学 (jieba's dictionary words, without HMM guesses);
    # 'iPhone' has no '▁' but starts a word after a Chinese character.
    row = [CLS, *(index[c] for c in "我喜欢用"), index["iPhone"], index["s"], *(index[c] for c in "拍照。今天天气很好。北京大学"), SEP]
    words = [[1], [2, 3], [4], [5, 6], [7, 8], [9], [10, 11, 12, 13], [14], [15], [16], [17, 18, 19, 20]]
    ids = np.array([row] * 400, np.int32)
    spec = masking.MaskingSpec(rate=0.3, max_predictions=8, whole_word=mode == "whole_word", span=mode == "span")
    out = masking.Masker(spec, tokenizer)(ids, np.zeros(400, np.int64), np.arange(400))
    chosen = np.zeros_like(ids, bool)
    np.put_along_axis(chosen, out["masked_positions"], out["masked_weights"].astype(bool), axis=1)
    for word in words:
        assert (chosen[:, word].all(1) | ~chosen[:, word].any(1)).all(), word
    # Every word is chosen in some row; token-level masking splits words.
    assert all(chosen[:, word].all(1).any() for word in words)
    token_level = masking.Masker(masking.MaskingSpec(rate=0.3, max_predictions=8), tokenizer)(ids, np.zeros(400, np.int64), np.arange(400))
    split = np.zeros_like(ids, bool)
    np.put_along_axis(split, token_level["masked_positions"], token_level["masked_weights"].astype(bool), axis=1)
    assert (split[:, 2] != split[:, 3]).any()


def test_masks_are_a_pure_function_of_seed_epoch_and_example():
    spec = masking.MaskingSpec()
    ids = fake_batch(batch=16, seed=5)
    first = run(spec, ids)
    np.testing.assert_array_equal(first["input_ids"], run(spec, ids)["input_ids"])
    # The same examples in another batch composition (reversed order) get the same masks.
    masker = masking.Masker(spec, fake_tokenizer())
    reversed_out = masker(ids[::-1], np.zeros(16), np.arange(16)[::-1])
    np.testing.assert_array_equal(reversed_out["input_ids"][::-1], first["input_ids"])
    # A new epoch or another seed gives other masks.
    assert (run(spec, ids, epoch=1)["masked_positions"] != first["masked_positions"]).any()
    other_seed = masking.MaskingSpec(seed=1)
    assert (run(other_seed, ids)["masked_positions"] != first["masked_positions"]).any()


def test_uniform_is_uniform_and_independent_across_streams():
    u = masking.uniform(0, np.zeros(2000), np.arange(2000), 1, 64)
    v = masking.uniform(0, np.zeros(2000), np.arange(2000), 2, 64)
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert abs(np.corrcoef(u.ravel(), v.ravel())[0, 1]) < 0.01
    assert u.min() >= 0 and u.max() < 1


def test_bad_masking_settings_are_errors():
    with pytest.raises(ValueError, match="sum to 1"):
        masking.MaskingSpec(mask=0.8, random=0.1, keep=0.2)
    from bertjax import config as config_lib

    config = config_lib.pretrain_config("tiny")
    config.data.max_predictions = 200
    with pytest.raises(ValueError, match="max_predictions=200 is larger than config.data.max_seq_length=128"):
        masking.MaskingSpec.from_config(config)
    config.data.max_predictions = 20
    config.data.masking.rate = 0.5
    eval_spec = masking.MaskingSpec.from_config(config, "eval")
    assert (eval_spec.rate, eval_spec.mask, eval_spec.seed, eval_spec.whole_word) == (0.15, 0.8, masking.EVAL_SEED, False)
