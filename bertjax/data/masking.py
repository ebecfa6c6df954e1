"""Masked-LM targets for a batch, in numpy, as a pure function of (seed, epoch, example index).

Every random number comes from a counter-based hash (splitmix64) of (seed, epoch, example index,
stream, position), so an example's mask does not depend on the batch it lands in, the number of
processes, or what came before: re-running gives the same masks, a new epoch new ones, and two
ablation arms that share the data seed see the same examples (their masks differ only where their
masking settings do).

Selection: round(rate x real tokens) positions (at least one, at most `max_predictions`) among the
non-special, non-padding tokens; with `whole_word` every piece of a chosen word (words are taken in
a random order while they fit the budget); with `span` SpanBERT-style spans of whole words with
geometric lengths (mean `span_mean` words, at most `span_max`). Each chosen position becomes [MASK]
with probability `mask`, a random non-special token with probability `random`, and stays with `keep`.

Chinese words are not a property of the vocabulary (each character is a piece, and which characters
form a word depends on its neighbours), so with `whole_word` or `span` the runs of Chinese characters
in each row are segmented into words by jieba (its dictionary, without HMM guesses), as HF's
run_mlm_wwm does with a segmenter: all the characters of a word are masked together. The
segmentation is a function of the row's ids, so masks stay a pure function of (seed, epoch, index).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np

from bertjax.data import tokenizer as tokenizer_lib

EVAL_SEED = 20181011  # the day BERT appeared on arXiv; any fixed number would do
_STREAM_SELECT, _STREAM_ACTION, _STREAM_REPLACEMENT, _STREAM_SPAN = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    rate: float = 0.15
    mask: float = 0.8
    random: float = 0.1
    keep: float = 0.1
    max_predictions: int = 20
    whole_word: bool = False
    span: bool = False
    span_mean: float = 3.0
    span_max: int = 10
    seed: int = 0

    def __post_init__(self):
        if abs(self.mask + self.random + self.keep - 1.0) > 1e-6:
            raise ValueError(
                f"config.data.masking: mask + random + keep must sum to 1 (mask={self.mask}, random={self.random}, keep={self.keep})"
            )
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"config.data.masking.rate={self.rate}: must be in (0, 1)")

    @classmethod
    def from_config(cls, config, split: str = "train") -> "MaskingSpec":
        """Training masking from `config.data.masking`; evaluation masking is fixed: token-level
        at `eval_rate`, 80/10/10, a fixed seed, whatever the training settings are."""
        data = config.data
        if data.max_predictions > data.max_seq_length:
            raise ValueError(f"config.data.max_predictions={data.max_predictions} is larger than config.data.max_seq_length={data.max_seq_length}")
        masking = data.masking
        if split == "eval":
            return cls(rate=masking.eval_rate, max_predictions=data.max_predictions, seed=EVAL_SEED)
        return cls(
            rate=masking.rate,
            mask=masking.mask,
            random=masking.random,
            keep=masking.keep,
            max_predictions=data.max_predictions,
            whole_word=masking.whole_word,
            span=masking.span,
            span_mean=masking.span_mean,
            span_max=masking.span_max,
            seed=data.seed,
        )


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, epoch: np.ndarray, example: np.ndarray, stream: int, width: int) -> np.ndarray:
    """Uniform [0, 1) float64 of shape [B, width], a pure function of (seed, epoch[b], example[b], stream, column)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + golden)
        key = _mix(key ^ (np.asarray(epoch, np.uint64) * np.uint64(0xD6E8FEB86659FD93)))
        key = _mix(key ^ (np.asarray(example, np.uint64) + golden))
        key = _mix(key ^ np.uint64(stream) * golden)
        bits = _mix(key[:, None] + (np.arange(1, width + 1, dtype=np.uint64) * golden)[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class Masker:
    """Applies a MaskingSpec with one tokenizer's special ids and word starts."""

    def __init__(self, spec: MaskingSpec, tokenizer):
        self.spec = spec
        self.mask_id = tokenizer.mask_id
        self.is_special = np.asarray(tokenizer.is_special, np.bool_)
        self.word_start = np.asarray(tokenizer.word_start, np.bool_)
        self.replacement_ids = np.flatnonzero(~self.is_special).astype(np.int32)
        # Chinese characters (the piece's character, '' for other pieces), when words are masked whole.
        pieces = getattr(tokenizer, "pieces", None) if (spec.whole_word or spec.span) else None
        characters = [_ideograph(piece) for piece in pieces] if pieces is not None else []
        self.characters = characters if any(characters) else None
        if self.characters is not None:
            self.is_ideograph = np.array([bool(c) for c in characters], np.bool_)
            self.is_cjk = np.asarray(tokenizer.is_cjk, np.bool_) | self.is_ideograph

    def __call__(self, input_ids: np.ndarray, epoch: np.ndarray, example: np.ndarray) -> dict[str, np.ndarray]:
        """Masked `input_ids` and the targets: masked_positions, masked_ids, masked_weights (int32 [B, P])."""
        spec = self.spec
        batch, length = input_ids.shape
        candidate = ~self.is_special[input_ids]
        budget = np.floor(spec.rate * candidate.sum(1) + 0.5).astype(np.int64)
        budget = np.where(candidate.any(1), np.clip(budget, 1, spec.max_predictions), 0)
        position = np.broadcast_to(np.arange(length), (batch, length))
        # A word starts at a word-start piece, or wherever the previous position is not a candidate.
        previous_candidate = np.concatenate([np.zeros((batch, 1), np.bool_), candidate[:, :-1]], axis=1)
        starts = candidate & (self.word_start[input_ids] | ~previous_candidate if (spec.whole_word or spec.span) else True)
        if self.characters is not None:
            starts = self._chinese_words(input_ids, candidate, starts)
        word_first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
        select = uniform(spec.seed, epoch, example, _STREAM_SELECT, length)
        if spec.span:
            chosen = self._spans(starts, candidate, budget, epoch, example)
        else:
            chosen = self._words(select, starts, candidate, word_first, budget)
        action = uniform(spec.seed, epoch, example, _STREAM_ACTION, length)
        replacement = uniform(spec.seed, epoch, example, _STREAM_REPLACEMENT, length)
        random_ids = self.replacement_ids[(replacement * len(self.replacement_ids)).astype(np.int64)]
        masked = np.where(chosen & (action < spec.mask), self.mask_id, input_ids)
        masked = np.where(chosen & (action >= spec.mask) & (action < spec.mask + spec.random), random_ids, masked)
        order = np.argsort(~chosen, axis=1, kind="stable")[:, : spec.max_predictions]
        weights = np.take_along_axis(chosen, order, axis=1)
        if order.shape[1] < spec.max_predictions:
            pad = spec.max_predictions - order.shape[1]
            order = np.pad(order, ((0, 0), (0, pad)))
            weights = np.pad(weights, ((0, 0), (0, pad)))
        return dict(
            input_ids=masked.astype(np.int32),
            masked_positions=np.where(weights, order, 0).astype(np.int32),
            masked_ids=np.where(weights, np.take_along_axis(input_ids, order, axis=1), 0).astype(np.int32),
            masked_weights=weights.astype(np.int32),
        )

    def _chinese_words(self, input_ids, candidate, starts):
        """`starts` where each run of Chinese characters starts a word only where jieba starts one,
        and a piece right after a CJK piece starts a word (no space separates them)."""
        chinese = candidate & self.is_ideograph[input_ids]
        after_cjk = np.concatenate([np.zeros((len(input_ids), 1), np.bool_), self.is_cjk[input_ids[:, :-1]]], axis=1)
        starts = starts | (candidate & after_cjk)
        for row in np.flatnonzero(chinese.any(1)):
            positions = np.flatnonzero(chinese[row])
            ids = input_ids[row].tolist()
            for run in np.split(positions, np.flatnonzero(np.diff(positions) != 1) + 1):
                starts[row, run] = False
                starts[row, run[list(chinese_word_starts("".join(self.characters[ids[k]] for k in run.tolist())))]] = True
        return starts

    @staticmethod
    def _words(select, starts, candidate, word_first, budget):
        """Whole units (single tokens, or words) in a random order, while the budget holds them."""
        batch, length = candidate.shape
        position = np.arange(length)[None, :]
        if np.array_equal(starts, candidate):
            # Token-level units: every candidate is a unit of one piece, chosen in the order of its own key.
            order_key = np.where(candidate, (select * (1 << 40)).astype(np.int64) * length + position, np.iinfo(np.int64).max)
            rank = np.empty_like(order_key)
            np.put_along_axis(rank, np.argsort(order_key, axis=1), np.broadcast_to(np.arange(length), (batch, length)), axis=1)
            return candidate & (rank < budget[:, None])
        # Every piece of a word shares its first piece's random key; ties are broken by position,
        # so the pieces of a word stay together in the order.
        key = np.take_along_axis(select, word_first, axis=1)
        order_key = np.where(candidate, (key * (1 << 40)).astype(np.int64) * length + position, np.iinfo(np.int64).max)
        rank = np.empty_like(order_key)
        np.put_along_axis(rank, np.argsort(order_key, axis=1), np.broadcast_to(np.arange(length), (batch, length)), axis=1)
        word_id = np.cumsum(starts, axis=1) - 1
        flat_word = (np.arange(batch)[:, None] * length + word_id)[candidate]
        word_length = np.zeros(batch * length, np.int64)
        np.add.at(word_length, flat_word, 1)
        piece_word_length = np.where(candidate, word_length[np.clip(np.arange(batch)[:, None] * length + word_id, 0, None)], 0)
        first_rank = rank - (position - word_first)
        return candidate & (first_rank + piece_word_length <= budget[:, None])

    def _spans(self, starts, candidate, budget, epoch, example):
        """SpanBERT: spans of whole words, geometric length in words (clipped), random start word,
        accepted when they overlap nothing chosen and fit the budget."""
        spec = self.spec
        batch, length = candidate.shape
        draws = 4 * spec.max_predictions
        span_draw = uniform(spec.seed, epoch, example, _STREAM_SPAN, 2 * draws)
        p = 1.0 / spec.span_mean
        if p >= 1.0:
            span_words = np.ones((batch, draws), np.int64)
        else:
            span_words = 1 + np.floor(np.log1p(-span_draw[:, :draws]) / np.log1p(-p)).astype(np.int64)
        span_words = np.minimum(span_words, spec.span_max)
        start_draw = span_draw[:, draws:]
        chosen = np.zeros((batch, length), np.bool_)
        for row in range(batch):
            row_budget = int(budget[row])
            if row_budget == 0:
                continue
            word_starts = np.flatnonzero(starts[row])
            # A word ends where the next one starts or where the candidates stop ([SEP], padding);
            # a span never runs past the candidates' end either.
            not_candidate = np.append(np.flatnonzero(~candidate[row]), length)
            run_end = not_candidate[np.searchsorted(not_candidate, word_starts)]
            word_ends = np.minimum(np.append(word_starts[1:], length), run_end).tolist()
            first_words = (start_draw[row] * len(word_starts)).astype(np.int64).tolist()
            word_starts, run_end = word_starts.tolist(), run_end.tolist()
            count, taken = 0, chosen[row]
            for first_word, words in zip(first_words, span_words[row].tolist()):
                last_word = min(first_word + words, len(word_starts)) - 1
                begin, end = word_starts[first_word], min(word_ends[last_word], run_end[first_word])
                if count + end - begin > row_budget or taken[begin:end].any():
                    continue
                taken[begin:end] = True
                count += end - begin
                if count == row_budget:
                    break
        return chosen


def _ideograph(piece: str) -> str:
    """The CJK ideograph a piece is ('貓', or '▁貓' from tokenizers that split text per ideograph), else ''."""
    piece = piece.removeprefix("\u2581")
    return piece if len(piece) == 1 and tokenizer_lib.CJK_IDEOGRAPH.match(piece) else ""


@functools.cache
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # not "Building prefix dict..." on stderr at every start
    segmenter = jieba.Tokenizer()
    segmenter.initialize()
    return segmenter


# An instance's text recurs every epoch: a cache of 2**18 runs (~50 MB) holds an epoch of ~30k
# instances; uncached, jieba takes ~35 ms of CPU for a batch of 32 x 128 Chinese characters.
@functools.lru_cache(maxsize=1 << 18)
def chinese_word_starts(text: str) -> tuple[int, ...]:
    """Offsets in `text` (Chinese characters only) where jieba's words start."""
    offsets, position = [], 0
    for word in _jieba().cut(text, HMM=False):
        offsets.append(position)
        position += len(word)
    return tuple(offsets)
