"""Is a difference between two systems real? The paired bootstrap, and its multi-seed form.

One module for every comparison bertjax makes (`sweep collect` between arms, embryology between runs).
Two systems scored on the same examples are compared *paired*: each bootstrap sample draws one set
of example indices and uses it for both, so the examples' own difficulty cancels out (Koehn 2004;
Berg-Kirkpatrick et al. 2012). With several seeds per system the **multi-bootstrap** of the MultiBERTs
(Sellam et al., 2022, section 3) resamples the seeds too, so the interval also covers what another
pretraining or fine-tuning seed would have given: a finding about the *procedure*, not one artifact.
Seeds are paired (the same seed list drawn for both sides) when seed i of A and seed i of B share
something, e.g. the same fine-tuning seed on two checkpoints; otherwise each side's seeds are drawn
on their own (different pretraining runs), as in the MultiBERTs' unpaired analysis.

The statistic is a mean over seeds and examples (accuracy from 0/1 correctness, a mean loss, or the
per-item values of any measure). All bootstrap samples are drawn at once as multinomial counts, so a
comparison of 10 seeds x 10,000 examples x 1,000 samples is one matrix product.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Comparison:
    """mean(A) - mean(B), its bootstrap interval, and a two-sided p-value for "no difference"."""

    difference: float
    low: float
    high: float
    p_value: float
    confidence: float
    num_samples: int
    seeds: tuple[int, int]  # how many seeds each side had
    examples: int

    def __str__(self) -> str:
        return f"{self.difference:+.4f} [{self.low:+.4f}, {self.high:+.4f}] p={self.p_value:.3g}"


def _as_seeds_by_examples(scores, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[None, :]
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"{name}: expected per-example scores [examples] or [seeds, examples], got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name}: scores contain NaN or infinity")
    return scores


def _counts(rng: np.random.Generator, num_samples: int, size: int) -> np.ndarray:
    """[num_samples, size]: how often each of `size` items is drawn in each resample of `size` with replacement."""
    return rng.multinomial(size, np.full(size, 1.0 / size), size=num_samples).astype(np.float64)


def paired_bootstrap(
    scores_a,
    scores_b,
    *,
    num_samples: int = 1000,
    confidence: float = 0.95,
    paired_seeds: bool = False,
    seed: int = 0,
) -> Comparison:
    """Compare two systems on the same examples: mean(A) - mean(B) with a bootstrap interval and p-value.

    scores_a, scores_b: per-example scores, [examples] for one seed or [seeds, examples] (the MultiBERTs
      multi-bootstrap); column j of both must be the same example. The sides may have different seed
      counts unless `paired_seeds`.
    paired_seeds: row i of A and row i of B share a seed (draw the same seed indices for both).
    Returns the observed difference, the percentile interval of the bootstrap differences at
    `confidence`, and the two-sided p-value 2 * min(P*(d <= 0), P*(d >= 0)) (the MultiBERTs' one-sided
    P*(d <= 0), made two-sided), floored at 1 / num_samples.
    """
    a = _as_seeds_by_examples(scores_a, "scores_a")
    b = _as_seeds_by_examples(scores_b, "scores_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired scores must share their examples: A has {a.shape[1]}, B has {b.shape[1]}")
    if paired_seeds and a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_seeds needs as many seeds on both sides: A has {a.shape[0]}, B has {b.shape[0]}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    examples = _counts(rng, num_samples, a.shape[1]) / a.shape[1]
    seeds_a = _counts(rng, num_samples, a.shape[0]) / a.shape[0]
    seeds_b = seeds_a if paired_seeds else _counts(rng, num_samples, b.shape[0]) / b.shape[0]
    # Each sample's mean is (seed weights) @ scores @ (example weights): one einsum for all samples.
    means_a = np.einsum("ns,se,ne->n", seeds_a, a, examples)
    means_b = np.einsum("ns,se,ne->n", seeds_b, b, examples)
    return _comparison(float(a.mean() - b.mean()), means_a - means_b, confidence, (a.shape[0], b.shape[0]), a.shape[1])


def _comparison(observed: float, differences: np.ndarray, confidence: float, seeds: tuple[int, int], examples: int) -> Comparison:
    """The percentile interval of the bootstrap `differences` and the two-sided p-value, floored at 1 / samples."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    one_sided = min(np.mean(differences <= 0.0), np.mean(differences >= 0.0))
    p_value = float(np.clip(2.0 * one_sided, 1.0 / len(differences), 1.0))
    return Comparison(
        difference=observed,
        low=float(low),
        high=float(high),
        p_value=p_value,
        confidence=confidence,
        num_samples=len(differences),
        seeds=seeds,
        examples=examples,
    )


@dataclasses.dataclass(frozen=True)
class Runs:
    """One system's fine-tuning runs scored on one evaluation set, for `multi_bootstrap`.

    stats: [runs, examples, K] per-example sufficient statistics (`per_example.statistics`);
      example j is the same example in every run (and in the other system's runs).
    groups: each run's pretraining seed (any hashable); runs of one group differ in fine-tuning seed.
    metric: totals [..., K] -> metric [...] (`per_example.metric`).
    """

    stats: np.ndarray
    groups: tuple
    metric: Callable[[np.ndarray], np.ndarray]

    def __post_init__(self):
        stats = np.asarray(self.stats, dtype=np.float64)
        if stats.ndim != 3 or stats.shape[0] != len(self.groups) or stats.shape[0] == 0:
            raise ValueError(f"Runs: expected stats [runs, examples, K] with one group per run, got {stats.shape} and {len(self.groups)} groups")
        object.__setattr__(self, "stats", stats)
        object.__setattr__(self, "groups", tuple(self.groups))

    @property
    def pretraining_seeds(self) -> int:
        return len(set(self.groups))

    @property
    def finetuning_seeds(self) -> int:
        """Fine-tuning runs per pretraining seed (the largest count, when failures left some short)."""
        return max(self.groups.count(group) for group in set(self.groups))

    def run_weights(self, rng: np.random.Generator, num_samples: int) -> np.ndarray:
        """[num_samples, runs]: pretraining seeds drawn with replacement, then each drawn seed's own
        fine-tuning runs drawn with replacement; each row sums to 1. Without resampling (the observed
        value) every group weighs the same and so does every run within its group."""
        names = sorted(set(self.groups), key=str)
        group_weights = _counts(rng, num_samples, len(names)) / len(names)
        weights = np.zeros((num_samples, len(self.groups)))
        for g, name in enumerate(names):
            members = [i for i, group in enumerate(self.groups) if group == name]
            weights[:, members] = group_weights[:, [g]] * _counts(rng, num_samples, len(members)) / len(members)
        return weights

    def observed(self) -> float:
        values = self.metric(self.stats.sum(axis=1))
        return float(np.mean([np.mean([v for v, g in zip(values, self.groups) if g == name]) for name in set(self.groups)]))


def multi_bootstrap(pairs: Sequence[tuple[Runs, Runs]], *, num_samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Comparison:
    """A vs B on one or more evaluation sets: the mean over `pairs` of metric(A) - metric(B).

    The MultiBERTs multi-bootstrap with both seed levels: each resample draws the pretraining seeds,
    then the fine-tuning seeds within each, on each side independently (the arms' pretraining runs
    are distinct), and the evaluation examples, the same draw for both sides (paired). Each run's
    metric is computed from its resampled totals, so MCC and F1 are bootstrapped as what they are,
    not as means. With several pairs (the tasks of a suite) a side whose runs have the same seeds on
    every task gets the same seed draw for all of them, so the mean's interval carries the pretraining
    seed's effect on all tasks at once. Returns the Comparison; `seeds` holds the pretraining seed counts.
    """
    if not pairs:
        raise ValueError("multi_bootstrap: no pairs to compare")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    drawn: dict = {}

    def weights(side: str, runs: Runs) -> np.ndarray:
        key = (side, runs.groups)
        if key not in drawn:
            drawn[key] = runs.run_weights(rng, num_samples)
        return drawn[key]

    differences = np.zeros(num_samples)
    observed = 0.0
    for a, b in pairs:
        if a.stats.shape[1:] != b.stats.shape[1:]:
            raise ValueError(f"paired runs must share their examples: A has {a.stats.shape[1:]}, B has {b.stats.shape[1:]} (examples, K)")
        examples = _counts(rng, num_samples, a.stats.shape[1])
        for side, runs, sign in (("a", a, 1.0), ("b", b, -1.0)):
            totals = np.einsum("ne,rek->nrk", examples, runs.stats)
            differences += sign * np.sum(weights(side, runs) * runs.metric(totals), axis=1)
        observed += a.observed() - b.observed()
    count = len(pairs)
    a, b = pairs[0]
    return _comparison(observed / count, differences / count, confidence, (a.pretraining_seeds, b.pretraining_seeds), a.stats.shape[1])
