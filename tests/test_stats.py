"""The paired (multi-)bootstrap: calibrated on synthetic scores whose true difference is known."""

import numpy as np
import pytest

from bertjax.eval import stats

REPETITIONS = 300


def _scores(rng, effect: float, seeds: int, examples: int, seed_spread: float = 0.05):
    """Per-seed, per-example correctness of two systems on one fresh sample of examples and seeds.

    An example has a difficulty shared by both systems (what pairing cancels); each seed shifts its
    system's accuracy (what the multi-bootstrap must cover). The population difference is `effect`.
    """
    difficulty = rng.normal(0.0, 1.5, size=examples)
    logits_a = difficulty[None, :] + rng.normal(0.0, seed_spread * 10, size=(seeds, 1))
    logits_b = difficulty[None, :] + rng.normal(0.0, seed_spread * 10, size=(seeds, 1))
    a = rng.random((seeds, examples)) < 1 / (1 + np.exp(-logits_a))
    b = rng.random((seeds, examples)) < 1 / (1 + np.exp(-logits_b))
    # A is B's model with a fraction `effect` of its errors fixed; the exact population gap is measured below.
    a = a | (rng.random((seeds, examples)) < effect)
    return a.astype(float), b.astype(float)


def _true_effect(effect: float, seed_spread: float) -> float:
    """The population difference of _scores, estimated once from a very large draw."""
    a, b = _scores(np.random.default_rng(123), effect, seeds=400, examples=20_000, seed_spread=seed_spread)
    return float(a.mean() - b.mean())


@pytest.mark.parametrize("seeds,seed_spread", [(1, 0.0), (8, 0.05)])
def test_interval_covers_the_true_difference_near_nominal_rate(seeds, seed_spread):
    """One seed: only examples vary. Eight seeds that shift accuracy: the multi-bootstrap must cover that too."""
    effect = 0.05
    truth = _true_effect(effect, seed_spread)
    rng = np.random.default_rng(seeds)
    covered = 0
    for repetition in range(REPETITIONS):
        a, b = _scores(rng, effect, seeds=seeds, examples=150, seed_spread=seed_spread)
        result = stats.paired_bootstrap(a, b, num_samples=400, seed=repetition)
        covered += result.low <= truth <= result.high
    coverage = covered / REPETITIONS
    # 300 repetitions: a 95% interval's coverage is measured to about +-2.5 points.
    assert 0.88 <= coverage <= 0.99, coverage


@pytest.mark.parametrize("seeds,seed_spread,paired", [(1, 0.0, False), (6, 0.05, False), (6, 0.05, True)])
def test_p_value_is_roughly_uniform_without_an_effect(seeds, seed_spread, paired):
    rng = np.random.default_rng(7 + seeds)
    p_values = np.array(
        [
            stats.paired_bootstrap(*_scores(rng, 0.0, seeds, 120, seed_spread), num_samples=400, seed=r, paired_seeds=paired).p_value
            for r in range(REPETITIONS)
        ]
    )
    # Kolmogorov-Smirnov distance to U(0, 1); the 5% critical value at n=300 is 0.078, bound generously.
    ordered = np.sort(p_values)
    grid = np.arange(1, REPETITIONS + 1) / REPETITIONS
    distance = max(np.max(grid - ordered), np.max(ordered - (grid - 1 / REPETITIONS)))
    assert distance < 0.15, distance
    assert 0.02 <= np.mean(p_values < 0.05) <= 0.10


def test_a_large_effect_is_significant_and_the_sign_follows_the_order():
    rng = np.random.default_rng(0)
    a, b = _scores(rng, 0.2, seeds=4, examples=500, seed_spread=0.0)
    forward = stats.paired_bootstrap(a, b)
    backward = stats.paired_bootstrap(b, a)
    assert forward.p_value < 0.01 and forward.low > 0
    assert backward.difference == pytest.approx(-forward.difference)
    assert backward.high < 0


def test_pairing_over_examples_narrows_the_interval():
    """Shared example difficulty cancels in a paired comparison; shuffling B's examples breaks the pairing."""
    rng = np.random.default_rng(1)
    a, b = _scores(rng, 0.0, seeds=1, examples=400)
    paired = stats.paired_bootstrap(a, b)
    unpaired = stats.paired_bootstrap(a, b[:, rng.permutation(400)])
    assert paired.high - paired.low < unpaired.high - unpaired.low


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="share their examples"):
        stats.paired_bootstrap(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="as many seeds"):
        stats.paired_bootstrap(np.ones((2, 5)), np.ones((3, 5)), paired_seeds=True)
