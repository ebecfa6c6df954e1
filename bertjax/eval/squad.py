"""Extractive QA: from start/end logits over doc-stride windows to answer text, and SQuAD's scores.

`answers(...)` turns per-window logits into one answer per question (n-best spans scored by
start + end logit, mapped back to the passage through each token's character span; SQuAD v2.0
answers "" when the no-answer score beats the best span by more than a threshold).
`exact_match`/`f1`/`evaluate` follow the official SQuAD v1.1/v2.0 evaluation script: answers are
normalised (lower case, punctuation and the articles a/an/the removed, whitespace collapsed) and
each prediction takes its best score over the gold answers.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    predicted_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted_tokens or not gold_tokens:
        # v2.0: an empty answer is right only when the gold answer is empty too.
        return float(predicted_tokens == gold_tokens)
    common = collections.Counter(predicted_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def evaluate(predictions: Mapping[str, str], gold_answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """{'exact_match', 'f1'} in percent, over every question in `gold_answers` (a missing prediction scores 0).

    A question with no gold answer (SQuAD v2.0 unanswerable) has gold [""]: only "" scores.
    """
    exact_total = f1_total = 0.0
    for qid, golds in gold_answers.items():
        golds = list(golds) or [""]
        if qid not in predictions:
            continue
        prediction = predictions[qid]
        exact_total += max(exact_match(prediction, gold) for gold in golds)
        f1_total += max(f1(prediction, gold) for gold in golds)
    count = max(len(gold_answers), 1)
    return {"exact_match": 100.0 * exact_total / count, "f1": 100.0 * f1_total / count}


def answers(
    contexts: Sequence[str],
    example_index: np.ndarray,
    offsets: np.ndarray,
    max_context: np.ndarray,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
    allow_no_answer: bool = False,
    null_threshold: float = 0.0,
) -> list[str]:
    """The answer text for each context, from the logits of all of its windows.

    example_index: [F] which context each window (feature) belongs to.
    offsets: [F, S, 2] character span of each token in its context, -1 for question/special/pad tokens.
    max_context: [F, S] True where this window gives the token its most context (a span must start there,
      so that an answer seen by two overlapping windows is scored where it is best read).
    start_logits, end_logits: [F, S]; position 0 ([CLS]) is the no-answer position.
    """
    best = [(-np.inf, "") for _ in contexts]
    null_score = np.full(len(contexts), np.inf)
    for feature in range(len(example_index)):
        example = int(example_index[feature])
        start, end = start_logits[feature], end_logits[feature]
        null_score[example] = min(null_score[example], float(start[0] + end[0]))
        # The n best among passage tokens only: question, special and padding positions can never
        # be part of an answer, and an undertrained model may score them highest.
        passage = np.flatnonzero(offsets[feature, :, 0] >= 0)
        top_starts = passage[np.argsort(-start[passage], kind="stable")[:n_best]]
        top_ends = passage[np.argsort(-end[passage], kind="stable")[:n_best]]
        for start_position in top_starts:
            if not max_context[feature, start_position]:
                continue
            for end_position in top_ends:
                if end_position < start_position:
                    continue
                if end_position - start_position + 1 > max_answer_length:
                    continue
                score = float(start[start_position] + end[end_position])
                if score > best[example][0]:
                    text = contexts[example][offsets[feature, start_position, 0] : offsets[feature, end_position, 1]]
                    best[example] = (score, text)
    results = []
    for example, (score, text) in enumerate(best):
        if allow_no_answer and (not np.isfinite(score) or null_score[example] - score > null_threshold):
            text = ""
        results.append(text)
    return results
