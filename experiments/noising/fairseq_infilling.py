"""How much text does BART's text infilling cover: fairseq's loop against bertjax/data/noising.py.

fairseq's `DenoisingDataset.add_whole_word_mask` (--mask 0.3 --mask-length span-poisson
--replace-length 1 --poisson-lambda 3) draws each span's start word independently, so spans overlap
and merge; noising.py places spans without overlap. This script ports fairseq's loop to numpy
(its Poisson table, ceil budget, span extension word by word) and runs both on the same documents:
Pride and Prejudice, 4 paragraphs a document, cut at 126 tokens, a 1,000-piece unigram tokenizer.

    .venv/bin/python experiments/noising/fairseq_infilling.py   # BERTJAX_SHARED_DATA, else ../shared/data
"""

import math
import os
import pathlib
import tempfile

import numpy as np

from bertjax.data import corpus, noising
from bertjax.data import tokenizer as tokenizer_lib

RATE, LAMBDA, MAX_TOKENS, EPOCHS = 0.3, 3.0, 126, 5


def documents():
    shared = pathlib.Path(os.environ.get("BERTJAX_SHARED_DATA", "../shared/data"))
    text = corpus.read_text(shared / "corpus" / "pride-and-prejudice.txt")
    start = text.index("It is a truth universally acknowledged")
    paragraphs = [corpus.split_sentences(p) for p in text[start : start + 400_000].split("\n\n") if p.strip()]
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = tokenizer_lib.load(tokenizer_lib.train_from_sentences((s for p in paragraphs for s in p), 1000, scratch))
        docs = []
        for begin in range(0, len(paragraphs), 4):
            ids = [piece for piece in tokenizer.encode_many([s for p in paragraphs[begin : begin + 4] for s in p]) if piece]
            if ids:
                docs.append((np.concatenate(ids).astype(np.int32), np.array([len(piece) for piece in ids])))
    return tokenizer, docs


def fairseq_covered(word_start: np.ndarray, rng) -> np.ndarray:
    """Which tokens fairseq's span-poisson infilling covers (its loop, over [BOS] tokens [EOS])."""
    probabilities = np.array([math.exp(-LAMBDA) * LAMBDA**k / math.factorial(k) for k in range(128)])
    probabilities = probabilities[: int(np.argmax(probabilities < 1e-7)) + 1]
    probabilities /= probabilities.sum()
    is_word_start = np.concatenate([[0], word_start, [0]]).astype(np.int64)
    budget = math.ceil(is_word_start.sum() * RATE)
    covered = np.zeros(len(is_word_start), bool)
    if budget == 0:
        return covered[1:-1]
    lengths = rng.choice(len(probabilities), size=budget, p=probabilities)
    while lengths.sum() < budget:
        lengths = np.concatenate([lengths, rng.choice(len(probabilities), size=budget, p=probabilities)])
    total = np.cumsum(lengths)
    last = int(np.searchsorted(total, budget))
    lengths[last] = budget - (total[last - 1] if last else 0)
    lengths = lengths[: last + 1]
    lengths = lengths[lengths > 0]  # 0-length spans become insertions: they cover nothing
    starts = np.flatnonzero(is_word_start)
    indices = starts[rng.permutation(len(starts))[: len(lengths)]]
    covered[indices] = True
    is_word_start[-1] = 255  # a span never runs over the end
    lengths = lengths - 1
    while len(indices):
        lengths = lengths - is_word_start[indices + 1]
        going = lengths >= 0
        indices, lengths = indices[going] + 1, lengths[going]
        covered[indices] = True
    return covered[1:-1]


def main():
    tokenizer, docs = documents()
    rng = np.random.default_rng(0)
    words = covered_words = 0
    for _ in range(EPOCHS):
        for tokens, _ in docs:
            word_start = tokenizer.word_start[tokens[:MAX_TOKENS]]
            covered = fairseq_covered(word_start, rng)
            words += int(word_start.sum())
            covered_words += int((covered & word_start).sum())
    noiser = noising.Noiser(noising.NoisingSpec(infilling=RATE, poisson_lambda=LAMBDA), tokenizer, MAX_TOKENS + 2)
    records = [e.record for epoch in range(EPOCHS) for e in noiser.examples(docs, epoch, np.arange(len(docs)))]
    stats = noising.realised_stats(records)
    print(f"{len(docs)} documents x {EPOCHS} epochs, infilling {RATE:.0%}, lambda {LAMBDA:g}: words covered")
    print(f"  fairseq (overlapping spans, ceil budget): {covered_words / words:.4f}")
    print(f"  bertjax (disjoint spans, unbiased budget): {stats['infilled_unit_fraction']:.4f}")


if __name__ == "__main__":
    main()
