"""bertjax.data.index_shuffle against grain itself: the loader's order must stay grain's shuffle order."""

import grain
import numpy as np
import pytest

from bertjax.data import index_shuffle


def test_round_keys_and_cipher_match_grains_cpp_on_random_indices():
    reference = index_shuffle._grain_index_shuffle()
    rng = np.random.default_rng(0)
    # Block sizes 16 (the minimum) to 42 bits, both sides of powers of two, and a seed at the top of the range.
    # (Below NUMPY_MIN, shuffle() calls grain itself.)
    for max_index in (index_shuffle.NUMPY_MIN, 21356, 65535, 65536, 65537, 123_456_789, 2**40 + 5):
        for seed in (0, 7, 2**32 - 1):
            index = rng.integers(0, max_index + 1, 300)
            expected = [reference(int(i), max_index=max_index, seed=seed, rounds=4) for i in index]
            assert index_shuffle._shuffle_numpy(index, max_index, seed).tolist() == expected, (max_index, seed)
    assert index_shuffle.matches_grain()


@pytest.mark.parametrize("whole", [True, False], ids=["whole-permutation", "per-batch"])
def test_epoch_order_is_grains_shuffled_repeated_stream_across_epochs(monkeypatch, whole):
    if not whole:
        monkeypatch.setattr(index_shuffle, "WHOLE_PERMUTATION_MAX", 0)
    count, seed = 20_011, 11
    stream = grain.MapDataset.range(count).shuffle(seed=seed).repeat()
    positions = np.concatenate([np.arange(0, 50), np.arange(count - 40, count + 40), np.arange(3 * count - 5, 3 * count + 5)])
    ids, epochs = index_shuffle.epoch_order(positions, count, seed)
    assert ids.tolist() == [stream[int(p)] for p in positions]
    assert epochs.tolist() == (positions // count).tolist()
    # Every epoch is a permutation, and the next epoch is a different one.
    first, _ = index_shuffle.epoch_order(np.arange(count), count, seed)
    second, _ = index_shuffle.epoch_order(np.arange(count, 2 * count), count, seed)
    assert sorted(first.tolist()) == list(range(count)) == sorted(second.tolist())
    assert first.tolist() != second.tolist()


def test_small_counts_use_grain_and_stay_its_order():
    stream = grain.MapDataset.range(37).shuffle(seed=4).repeat()
    ids, _ = index_shuffle.epoch_order(np.arange(100), 37, 4)
    assert ids.tolist() == [stream[i] for i in range(100)]


def test_falls_back_to_grain_when_the_cipher_disagrees(monkeypatch):
    monkeypatch.setattr(index_shuffle, "matches_grain", lambda: False)
    monkeypatch.setattr(index_shuffle, "_shuffle_numpy", lambda *args: pytest.fail("the numpy cipher was used"))
    stream = grain.MapDataset.range(20_000).shuffle(seed=2)
    assert index_shuffle.shuffle(np.arange(20), 19_999, 2).tolist() == [stream[i] for i in range(20)]
