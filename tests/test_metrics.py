"""Fine-tuning metrics against hand-computed cases and the reference libraries (sklearn, scipy, seqeval)."""

import math

import numpy as np
import pytest

from bertjax.eval import metrics, squad


def test_classification_metrics_by_hand():
    predictions = [1, 1, 0, 0, 1, 0]
    references = [1, 0, 0, 1, 1, 0]
    assert metrics.accuracy(predictions, references) == pytest.approx(4 / 6)
    # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3.
    assert metrics.f1(predictions, references) == pytest.approx(2 / 3)
    # tp=2 tn=2 fp=1 fn=1: (4 - 1) / sqrt(3*3*3*3) = 1/3.
    assert metrics.matthews_corrcoef(predictions, references) == pytest.approx(1 / 3)
    assert metrics.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # undefined -> 0, as sklearn
    assert metrics.f1([0, 0], [0, 0]) == 0.0


def test_correlations_by_hand():
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # Monotone but not linear: Spearman 1, Pearson below 1.
    assert metrics.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9
    # Ties get the mean rank: ranks [1.5, 1.5, 3] vs [1, 2, 3] -> r = sqrt(3)/2.
    assert metrics.spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)


def test_against_sklearn_and_scipy():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        references = rng.integers(0, 3, size=200)
        predictions = np.where(rng.random(200) < 0.6, references, rng.integers(0, 3, size=200))
        assert metrics.accuracy(predictions, references) == pytest.approx(sklearn_metrics.accuracy_score(references, predictions))
        assert metrics.matthews_corrcoef(predictions, references) == pytest.approx(sklearn_metrics.matthews_corrcoef(references, predictions))
        binary_references, binary_predictions = references % 2, predictions % 2
        assert metrics.f1(binary_predictions, binary_references) == pytest.approx(sklearn_metrics.f1_score(binary_references, binary_predictions))
        scores = np.round(rng.normal(size=100), 1)  # rounding makes ties
        targets = scores + rng.normal(size=100)
        assert metrics.pearson(scores, targets) == pytest.approx(stats.pearsonr(scores, targets)[0])
        assert metrics.spearman(scores, targets) == pytest.approx(stats.spearmanr(scores, targets)[0])


def test_entity_f1_by_hand_iob2_and_iob1():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG"]]
    # 2 of 3 predicted entities right, 2 of 3 gold found.
    assert metrics.entity_f1(predicted, gold) == pytest.approx(2 / 3)
    # IOB1: an I- tag after O opens an entity; B- only separates two adjacent entities of one type.
    assert metrics.entities(["I-PER", "I-PER", "B-PER", "O", "I-LOC"]) == {("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4)}
    # A type change inside a run of I- tags starts a new entity.
    assert metrics.entities(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}
    assert metrics.token_accuracy([["A", "B"], ["C"]], [["A", "X"], ["C"]]) == pytest.approx(2 / 3)


def test_entity_f1_against_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = np.random.default_rng(1)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    for _ in range(20):
        lengths = rng.integers(1, 12, size=8)
        gold = [list(rng.choice(tags, size=n)) for n in lengths]
        predicted = [[tag if rng.random() < 0.7 else str(rng.choice(tags)) for tag in sentence] for sentence in gold]
        assert metrics.entity_f1(predicted, gold) == pytest.approx(seqeval.f1_score(gold, predicted))


def test_compute_names_and_errors():
    results = metrics.compute(["accuracy", "f1"], [0, 2, 2], [0, 2, 1], positive=2)
    assert results == {"accuracy": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3)}
    assert metrics.compute(["entity_f1", "accuracy"], [["B-X"]], [["B-X"]], tagging=True) == {"entity_f1": 1.0, "accuracy": 1.0}
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        metrics.compute(["bleu"], [0], [0])


def test_squad_scores_official_normalisation():
    assert squad.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert squad.exact_match("the Broncos.", "Broncos") == 1.0
    # "denver broncos" vs "broncos won": overlap 1, precision 1/2, recall 1/2.
    assert squad.f1("Denver Broncos", "Broncos won") == pytest.approx(0.5)
    predictions = {"q1": "Denver Broncos", "q2": "Paris", "q3": ""}
    gold = {"q1": ["Broncos won", "Denver Broncos"], "q2": ["London"], "q3": [], "q4": ["x"]}
    scores = squad.evaluate(predictions, gold)
    # q1 exact via its second gold answer, q3 an unanswerable question answered "", q2 and q4 wrong.
    assert scores == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(50.0)}
