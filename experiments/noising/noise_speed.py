"""Examples per CPU second of bertjax/data/noising.py at 128 positions, batches of 32.

Synthetic documents (random ids in an 8,192-piece vocabulary, every third piece continuing a word,
sentences of 8-24 tokens filling up to 126 tokens), so the figure is the corruption's own cost, not
the reading of a corpus. CPU seconds rather than wall clock: the machine this was written on was
shared (a load of 10-16 on 2 cores).

    .venv/bin/python experiments/noising/noise_speed.py
"""

import time
import types

import numpy as np

from bertjax.data import noising

VOCAB, BATCH, EXAMPLES = 8192, 32, 2048


def main():
    is_special = np.zeros(VOCAB, bool)
    is_special[:5] = True
    word_start = np.ones(VOCAB, bool)
    word_start[5::3] = False
    tokenizer = types.SimpleNamespace(pad_id=0, cls_id=2, sep_id=3, mask_id=4, is_special=is_special, word_start=word_start)
    rng = np.random.default_rng(0)
    documents = []
    for _ in range(EXAMPLES):
        lengths = rng.integers(8, 25, size=8)
        lengths = lengths[np.cumsum(lengths) <= 126]
        documents.append((rng.integers(5, VOCAB, size=lengths.sum()).astype(np.int32), lengths))
    for settings in (dict(infilling=0.3, permutation=1.0), dict(masking=0.3), dict(deletion=0.3), dict(rotation=1.0)):
        noiser = noising.Noiser(noising.NoisingSpec(**settings), tokenizer, 128)
        start = time.process_time()
        for begin in range(0, EXAMPLES, BATCH):
            noiser(documents[begin : begin + BATCH], 0, np.arange(begin, begin + BATCH))
        seconds = time.process_time() - start
        print(f"{settings}: {EXAMPLES / seconds:,.0f} examples per CPU second")


if __name__ == "__main__":
    main()
