"""Per-example sufficient statistics of the fine-tuning metrics, so that a bootstrap can recompute
MCC or entity F1 on a resample of the examples without the model.

A metric like accuracy is a mean over examples, but MCC, binary F1 and entity F1 are not: they are
functions of *totals* (a confusion matrix; correct, predicted and gold entity counts). Each example
therefore gets a small vector of counts whose sum over any multiset of examples gives those totals,
and `metric(kind, name, ...)` maps totals back to the metric. A resample is then a weighted sum
(`stats.multi_bootstrap`), one matrix product for all resamples.

  kind 'confusion' (classification): the example's one-hot cell of the C x C (gold, predicted) matrix
  kind 'tagging':  [correct words, words, correct entities, predicted entities, gold entities]
  kind 'moments' (regression): [x, y, x*x, y*y, x*y, 1] (Pearson; Spearman's ranks are not totals)
  kind 'text' (generated text): [ROUGE-L F, 1, then sacrebleu's segment statistics: hypothesis length,
      reference length, matched 1..4-grams, hypothesis 1..4-grams]. Corpus ROUGE-L is the mean of the
      first column; corpus BLEU is sacrebleu's formula on the summed statistics (as sacrebleu itself sums
      them), so a resample's BLEU is exact, not an average of sentence BLEUs.

SQuAD (span) metrics are not covered: `statistics` returns None and no comparison is made.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bertjax.eval import metrics as metrics_lib

METRICS = {"confusion": ("accuracy", "f1", "mcc"), "tagging": ("accuracy", "entity_f1"), "moments": ("pearson",), "text": ("rougeL", "bleu")}
BLEU_ORDER = 4  # sacrebleu's default max n-gram order


def statistics(
    family: str, regression: bool, predictions: Sequence, references: Sequence, classes: Sequence[str] | None, tokenize: str = "auto"
) -> dict | None:
    """{'kind', 'classes', 'rows'}: one row of counts per example (JSON-ready), or None for span tasks;
    `tokenize`: how generated texts are split into words (metrics.TOKENIZATIONS)."""
    if family == "span":
        return None
    if family == "seq2seq":
        return dict(kind="text", classes=None, rows=_text_rows(list(predictions), list(references), tokenize))
    if family == "tagging":
        rows = []
        for predicted, gold in zip(predictions, references):
            predicted_entities, gold_entities = metrics_lib.entities(predicted), metrics_lib.entities(gold)
            correct_words = sum(p == g for p, g in zip(predicted, gold))
            rows.append([correct_words, len(gold), len(predicted_entities & gold_entities), len(predicted_entities), len(gold_entities)])
        return dict(kind="tagging", classes=None, rows=rows)
    if regression:
        x, y = np.asarray(predictions, np.float64), np.asarray(references, np.float64)
        return dict(kind="moments", classes=None, rows=np.stack([x, y, x * x, y * y, x * y, np.ones_like(x)], axis=1).tolist())
    index = {name: i for i, name in enumerate(classes)}
    size = len(classes)
    rows = []
    for predicted, gold in zip(predictions, references):
        row = [0] * (size * size)
        row[index[gold] * size + index[predicted]] = 1
        rows.append(row)
    return dict(kind="confusion", classes=list(classes), rows=rows)


def _text_rows(predictions: list[str], references: list[str], tokenize: str = "auto") -> list[list[float]]:
    tokenize = metrics_lib.text_tokenization(references, tokenize)  # once, for all the rows
    bleu = metrics_lib.bleu_scorer(references, tokenize, sentence=True)  # segment scores; corpus_bleu sums their statistics
    rouge = metrics_lib.rouge_l_scores(predictions, references, tokenize)
    rows = []
    for score, prediction, reference in zip(rouge, predictions, references):
        segment = bleu.sentence_score(prediction, [reference])
        rows.append([score, 1.0, segment.sys_len, segment.ref_len, *segment.counts, *segment.totals])
    return rows


def corpus_bleu(totals: np.ndarray) -> np.ndarray:
    """sacrebleu's corpus BLEU (0-100; exponential smoothing, order 4) from summed 'text' statistics
    [..., 12], for any number of resamples at once (sacrebleu's `BLEU.compute_bleu`, vectorised)."""
    totals = np.asarray(totals, np.float64)
    sys_len, ref_len = totals[..., 2], totals[..., 3]
    correct, total = totals[..., 4 : 4 + BLEU_ORDER], totals[..., 4 + BLEU_ORDER : 4 + 2 * BLEU_ORDER]
    brevity = np.where(sys_len < ref_len, np.exp(1 - _ratio(ref_len, sys_len)) * (sys_len > 0), 1.0)
    log_sum = np.zeros(sys_len.shape)
    smooth = np.ones(sys_len.shape)
    alive = np.ones(sys_len.shape, bool)  # sacrebleu stops at the first order with no n-grams (precision 0)
    for n in range(BLEU_ORDER):
        alive &= total[..., n] > 0
        matched = correct[..., n] > 0
        smooth = np.where(alive & ~matched, smooth * 2, smooth)
        precision = np.where(matched, 100.0 * _ratio(correct[..., n], total[..., n]), 100.0 / (smooth * np.maximum(total[..., n], 1)))
        log_sum += np.where(alive, np.log(np.where(alive, precision, 1.0)), -np.inf)
    score = brevity * np.exp(log_sum / BLEU_ORDER)
    return np.where(correct.sum(-1) > 0, score, 0.0)


def _ratio(numerator, denominator):
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64), where=denominator != 0)


def metric(kind: str, name: str, classes: Sequence[str] | None = None, positive: str | None = None):
    """totals [..., K] -> the metric [...]; None when `name` cannot be computed from `kind`'s totals."""
    if name not in METRICS.get(kind, ()):
        return None
    if kind == "tagging":
        if name == "accuracy":
            return lambda t: _ratio(t[..., 0], t[..., 1])
        return lambda t: _ratio(2.0 * t[..., 2], t[..., 3] + t[..., 4])  # F1 = 2c / (predicted + gold)
    if kind == "text":
        return (lambda t: _ratio(t[..., 0], t[..., 1])) if name == "rougeL" else corpus_bleu
    if kind == "moments":

        def pearson(t):
            n = t[..., 5]
            sxy = t[..., 4] - _ratio(t[..., 0] * t[..., 1], n)
            sxx = t[..., 2] - _ratio(t[..., 0] ** 2, n)
            syy = t[..., 3] - _ratio(t[..., 1] ** 2, n)
            return _ratio(sxy, np.sqrt(np.maximum(sxx * syy, 0.0)))

        return pearson
    size = len(classes)

    def confusion(t):
        return t.reshape(t.shape[:-1] + (size, size))  # [..., gold, predicted]

    if name == "accuracy":
        return lambda t: _ratio(np.trace(confusion(t), axis1=-2, axis2=-1), t.sum(-1))
    if name == "f1":
        if positive not in classes:
            return None
        p = list(classes).index(positive)
        return lambda t: _ratio(2.0 * confusion(t)[..., p, p], confusion(t)[..., :, p].sum(-1) + confusion(t)[..., p, :].sum(-1))

    def mcc(t):
        # Gorodkin's multi-class form, as metrics.matthews_corrcoef computes it.
        m = confusion(t)
        actual, predicted = m.sum(-1), m.sum(-2)
        samples, correct = t.sum(-1), np.trace(m, axis1=-2, axis2=-1)
        covariance = correct * samples - np.sum(actual * predicted, -1)
        denominator = np.sqrt((samples**2 - np.sum(predicted**2, -1)) * (samples**2 - np.sum(actual**2, -1)))
        return _ratio(covariance, denominator)

    return mcc
