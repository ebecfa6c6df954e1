"""The dev-set metrics the field reports for BERT fine-tuning, in numpy.

accuracy (SST-2, MNLI, QNLI, RTE, WNLI, POS tagging), binary F1 (MRPC, QQP), Matthews correlation
(CoLA), Pearson and Spearman correlation (STS-B) and entity-level F1 for NER with seqeval's
(conlleval's) chunking of IOB1/IOB2/IOBES tags. SQuAD's exact match and F1 live in `squad.py`.
`compute(names, predictions, references)` is what the fine-tuning loop calls. Generated text
(question generation) is scored with corpus BLEU (sacrebleu) and ROUGE-L F (rouge-score), imported
when first used.
"""

from __future__ import annotations

from collections.abc import Sequence

import re
import unicodedata

import numpy as np


def accuracy(predictions, references) -> float:
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape:
        raise ValueError(f"accuracy: {predictions.shape} predictions for {references.shape} references")
    return float(np.mean(predictions == references)) if references.size else 0.0


def f1(predictions, references, positive=1) -> float:
    """Binary F1 of the `positive` class (GLUE's MRPC and QQP score class 1)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    true_positive = np.sum((predictions == positive) & (references == positive))
    predicted, actual = np.sum(predictions == positive), np.sum(references == positive)
    return _f1_from_counts(true_positive, predicted, actual)


def _f1_from_counts(correct, predicted, actual) -> float:
    if correct == 0:
        return 0.0
    precision, recall = correct / predicted, correct / actual
    return float(2 * precision * recall / (precision + recall))


def matthews_corrcoef(predictions, references) -> float:
    """Matthews correlation, the multi-class form (Gorodkin, 2004) that sklearn computes; 0 when undefined."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    classes = np.union1d(predictions, references)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (np.searchsorted(classes, references), np.searchsorted(classes, predictions)), 1)
    actual, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    samples, correct = confusion.sum(), np.trace(confusion)
    covariance = correct * samples - actual @ predicted
    denominator = np.sqrt((samples**2 - predicted @ predicted) * (samples**2 - actual @ actual))
    return float(covariance / denominator) if denominator else 0.0


def pearson(predictions, references) -> float:
    x = np.asarray(predictions, dtype=np.float64) - np.mean(predictions)
    y = np.asarray(references, dtype=np.float64) - np.mean(references)
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator else 0.0


def _average_ranks(values) -> np.ndarray:
    """Ranks 1..n with ties given the mean of the ranks they span (what Spearman's rho needs)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Each run of equal values gets the mean of its positions.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(predictions, references) -> float:
    return pearson(_average_ranks(predictions), _average_ranks(references))


def _split_tag(tag: str) -> tuple[str, str]:
    if tag in ("O", ""):
        return "O", ""
    prefix, _, entity_type = tag.partition("-")
    return prefix, entity_type or "_"


def _chunk_ends(prev_prefix, prefix, prev_type, entity_type) -> bool:
    if prev_prefix in ("E", "S"):
        return True
    if prev_prefix in ("B", "I") and prefix in ("B", "S", "O"):
        return True
    return prev_prefix != "O" and prev_type != entity_type


def _chunk_starts(prev_prefix, prefix, prev_type, entity_type) -> bool:
    if prefix in ("B", "S"):
        return True
    if prefix in ("E", "I") and prev_prefix in ("E", "S", "O"):
        return True
    return prefix != "O" and prev_type != entity_type


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) of each entity in one sentence's tags, chunked as conlleval/seqeval do.

    An I- tag after O or after another type opens an entity, which is what makes IOB1 files
    (CoNLL-2003's original tagging) and IOB2 files both read correctly.
    """
    found = set()
    prev_prefix, prev_type, begin = "O", "", 0
    for position, tag in enumerate(list(tags) + ["O"]):
        prefix, entity_type = _split_tag(tag)
        if _chunk_ends(prev_prefix, prefix, prev_type, entity_type):
            found.add((prev_type, begin, position - 1))
        if _chunk_starts(prev_prefix, prefix, prev_type, entity_type):
            begin = position
        prev_prefix, prev_type = prefix, entity_type
    return found


def entity_f1(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """Micro-averaged entity F1 over sentences (seqeval's default `f1_score`)."""
    if len(predictions) != len(references):
        raise ValueError(f"entity_f1: {len(predictions)} predicted sentences for {len(references)} references")
    correct = predicted = actual = 0
    for index, (predicted_tags, gold_tags) in enumerate(zip(predictions, references)):
        if len(predicted_tags) != len(gold_tags):
            raise ValueError(f"entity_f1: sentence {index} has {len(predicted_tags)} predicted tags for {len(gold_tags)} words")
        predicted_entities, gold_entities = entities(predicted_tags), entities(gold_tags)
        correct += len(predicted_entities & gold_entities)
        predicted += len(predicted_entities)
        actual += len(gold_entities)
    return _f1_from_counts(correct, predicted, actual)


def token_accuracy(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """Accuracy over all words of all sentences (POS tagging)."""
    flat_predictions = [tag for sentence in predictions for tag in sentence]
    flat_references = [tag for sentence in references for tag in sentence]
    return accuracy(np.array(flat_predictions, dtype=object), np.array(flat_references, dtype=object))


# Metrics of whole label sequences (tagging); the others take one label or score per example.
SEQUENCE_METRICS = {"entity_f1": entity_f1, "accuracy": token_accuracy}
EXAMPLE_METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(names: Sequence[str], predictions, references, tagging: bool = False, positive=1, text: bool = False, tokenize: str = "auto") -> dict[str, float]:
    """{name: value} for each metric name; `positive` is the class binary F1 scores; `text`: the
    predictions and references are generated and gold texts (TEXT_METRICS, defined below), split
    into words by `tokenize` (TOKENIZATIONS)."""
    table = TEXT_METRICS if text else SEQUENCE_METRICS if tagging else EXAMPLE_METRICS
    kind = "text " if text else "tagging " if tagging else ""
    results = {}
    for name in names:
        if name not in table:
            raise ValueError(f"unknown {kind}metric {name!r}; choose from {sorted(table)}")
        if text:
            results[name] = table[name](predictions, references, tokenize=text_tokenization(references, tokenize))
        else:
            results[name] = table[name](predictions, references, positive=positive) if name == "f1" else table[name](predictions, references)
    return results


# Generated text (question generation): corpus BLEU and ROUGE-L, by the reference implementations.


# How generated and gold texts are split into words before BLEU and ROUGE-L count them: '13a' is the
# field's default (sacrebleu's 13a; rouge-score's own tokeniser, which keeps only [a-z0-9] runs);
# 'intl' (sacrebleu's Unicode-punctuation tokeniser; for ROUGE-L, runs of Unicode letters and digits)
# is for scripts rouge-score's tokeniser deletes (Cyrillic, Greek, Arabic, ...); 'zh' (sacrebleu's
# Chinese tokeniser; for ROUGE-L, each CJK character is a word) is for Chinese and Japanese text, which has
# no spaces between words. 'auto' picks one from the references (`text_tokenization`).
TOKENIZATIONS = ("auto", "13a", "intl", "zh")
_CJK = "\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # radicals, kana, bopomofo, ideographs
_CJK_CHAR = re.compile(f"[{_CJK}]")
_UNICODE_WORD = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+")


def text_tokenization(references: Sequence[str], requested: str = "auto") -> str:
    """The tokenisation to score these references with: `requested`, or for 'auto' 'zh' when more than
    a tenth of the references' letters are CJK characters, 'intl' when more than a tenth are letters of
    another non-Latin script, else '13a'. Latin letters with diacritics stay on '13a', the reference
    implementations' default (rouge-score splits "Temüjin" into "tem jin" in predictions and
    references alike), and so does English text that quotes a few Greek or Chinese characters."""
    if requested not in TOKENIZATIONS:
        raise ValueError(f"unknown text tokenization {requested!r}; choose from {TOKENIZATIONS}")
    if requested != "auto":
        return requested
    letters = cjk = other = 0
    for text in references:
        for char in text:
            if char.isalpha():
                letters += 1
                if ord(char) > 127:
                    if _CJK_CHAR.match(char):
                        cjk += 1
                    elif not unicodedata.name(char, "").startswith("LATIN"):
                        other += 1
    return "zh" if cjk > 0.1 * letters else "intl" if other > 0.1 * letters else "13a"


def bleu(predictions: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """Corpus BLEU (0-100) of the predictions against one reference each by sacrebleu, exponential
    smoothing: with '13a' the number the field reports as `sacreBLEU` (see TOKENIZATIONS)."""
    _same_count("bleu", predictions, references)
    return float(bleu_scorer(references, tokenize, sentence=False).corpus_score(list(predictions), [list(references)]).score)


def bleu_scorer(references: Sequence[str], tokenize: str = "13a", sentence: bool = False):
    """sacrebleu's BLEU with this tokenisation ('auto' resolved against the references); `sentence`:
    for per-segment statistics (effective order)."""
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=text_tokenization(references, tokenize), effective_order=sentence)


def rouge_l(predictions: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """ROUGE-L F-measure (0-1), the mean over examples of `rouge_l_scores`."""
    scores = rouge_l_scores(predictions, references, tokenize)
    return float(np.mean(scores)) if scores else 0.0


class _UnicodeWords:
    """rouge-score's tokeniser for scripts its own deletes: lower-cased runs of Unicode letters and
    digits, each CJK character a word of its own."""

    def tokenize(self, text: str) -> list[str]:
        return _UNICODE_WORD.findall(text.lower())


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> list[float]:
    """Each example's ROUGE-L F-measure (0-1) by Google's rouge-score, no stemming: the longest common
    subsequence of words, split by rouge-score's default tokeniser for '13a' and by `_UnicodeWords`
    for 'intl' and 'zh'."""
    from rouge_score import rouge_scorer

    _same_count("rougeL", predictions, references)
    unicode_words = text_tokenization(references, tokenize) != "13a"
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_UnicodeWords() if unicode_words else None)
    return [scorer.score(reference, prediction)["rougeL"].fmeasure for prediction, reference in zip(predictions, references)]


def _same_count(name: str, predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{name}: {len(predictions)} predictions for {len(references)} references")


TEXT_METRICS = {"bleu": bleu, "rougeL": rouge_l}
