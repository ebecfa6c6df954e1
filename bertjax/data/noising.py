"""BART's five corruptions for seq2seq denoising, as a pure function of (seed, epoch, example index).

A document (its tokens and sentence lengths) becomes a pair: the source, the corrupted text the
encoder reads, and the target, the original text the decoder restores; both `[BOS] ... [EOS]` with the
tokenizer's [CLS] and [SEP] as BOS and EOS. The corruptions (Lewis et al., 2020, section 2.2), each
under `config.data.noising` with a rate where 0 turns it off, any of them combinable:

  permutation  the document's sentences are shuffled: `permutation` x sentences (rounded up, as in
               fairseq) are chosen and permuted among their places (1.0: a full shuffle, BART's);
  masking      `masking` x units are replaced by [MASK], one [MASK] per token (BERT-style, no 80/10/10);
  deletion     `deletion` x units are removed: the model must find where input is missing;
  infilling    spans with Poisson(`poisson_lambda`) lengths cover `infilling` x units; each span
               becomes ONE [MASK] (the model must also find how much is missing) and a 0-length span
               inserts a [MASK];
  rotation     with probability `rotation` the document is rotated to start at a uniformly chosen
               token (never the first): the model must find the start.

A unit is a whole word (a word-start piece and its continuation pieces; every sentence starts a
word) when `whole_word`, as BART masks with GPT-2's word boundaries, else a token. Every [MASK] the
corruptions emit becomes a random non-special token with probability `mask_random` (fairseq's
--mask-random; 0.1 in BART's released runs, 0 here by default).

Where this follows fairseq's `DenoisingDataset` (permute -> mask -> insert -> rotate; span lengths
drawn until they cover the budget, the last one trimmed to fit it), and where it deviates, on purpose:
  - Spans never overlap. fairseq draws span starts independently, so overlapping spans merge and the
    realised infilled fraction falls below the configured one (27.3% of the words at 30% on Pride
    and Prejudice at 128 tokens, 30.0% here: experiments/noising/fairseq_infilling.py); here K spans of total
    length M are placed uniformly at random among the U - M other units (stars and bars), so the
    realised fraction is the configured one. 0-length spans are placed the same way, which is what
    fairseq's separate insertion noise does.
  - The token corruptions take disjoint shares of the document (masking + deletion + infilling <= 1),
    so combining them is well defined and each realised rate is its own setting. fairseq has one
    masking mode per run (--replace-length -1 / 0 / 1 is masking / deletion / infilling).
  - Budgets are rounded stochastically (floor(rate x U + u), u ~ U[0, 1)), not up as fairseq's
    ceil: the realised rate equals the configured one in expectation at every document length,
    where ceil masks a third of a three-word document at 30%.
  - A rotation always moves the start (fairseq's offset can be 1, the identity).

Bad input is repaired and counted in each example's `record` (see `realised_stats`): an empty
document gives `[BOS] [EOS]` on both sides; a single-sentence document cannot be permuted; a
document longer than `max_length - 2` tokens is cut at its end (source and target alike); a source
that outgrows `max_length` (0-length spans insert tokens) loses its tail. An invalid setting is a
one-line ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from bertjax.config import CORRUPTIONS, ConfigError
from bertjax.data.masking import EVAL_SEED, uniform

# masking.uniform's streams (masking's own are 1-4): one per random choice.
_STREAMS = 0xB0A7 << 8
_STREAM_PERMUTE, _STREAM_BUDGET, _STREAM_SPAN_LENGTH, _STREAM_SPAN_ORDER, _STREAM_SPAN_PLACE = range(_STREAMS, _STREAMS + 5)
_STREAM_CHOOSE, _STREAM_RANDOM, _STREAM_REPLACEMENT, _STREAM_ROTATE = range(_STREAMS + 5, _STREAMS + 9)
TOKEN_CORRUPTIONS = ("masking", "deletion", "infilling")
_KEEP, _MASK, _DELETE, _SPAN = 0, 1, 2, 3
_NONE = np.zeros(0, np.int64)
# What `Noiser.example` did to a document; every key is present in every record.
_EMPTY_RECORD = dict(
    tokens=0,  # after the cut
    cut_tokens=0,  # cut from a document longer than max_length - 2
    empty=False,
    sentences=0,
    single_sentence=False,  # permutation was on but the document has one sentence
    permuted=False,
    moved_sentences=0,
    sentence_order=_NONE,  # source sentence k is target sentence sentence_order[k] (when permuted)
    units=0,  # words (whole_word) or tokens
    masked_units=0,
    masked_tokens=0,
    deleted_units=0,
    deleted_tokens=0,
    infilled_units=0,
    infilled_tokens=0,
    span_starts=_NONE,  # in units of the permuted document
    span_lengths=_NONE,  # in units, the last drawn one trimmed to the budget
    span_draws=_NONE,  # the Poisson draws, untrimmed
    random_replacements=0,
    rotation_offset=0,  # the source starts at this token of the unrotated source (0: not rotated)
    unrotatable=False,  # rotation was drawn but the source has fewer than 2 tokens
    source_tokens=0,  # the source's tokens between [BOS] and [EOS]
    source_cut_tokens=0,  # cut from a source that outgrew max_length
)


@dataclasses.dataclass(frozen=True)
class NoisingSpec:
    """Rates of the five corruptions (0 = off) and their shared settings; see the module docstring."""

    masking: float = 0.0
    deletion: float = 0.0
    infilling: float = 0.0
    permutation: float = 0.0
    rotation: float = 0.0
    poisson_lambda: float = 3.0
    whole_word: bool = True
    mask_random: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for key in (*CORRUPTIONS, "mask_random"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ConfigError(f"config.data.noising.{key}={value!r}: must be in [0, 1]")
        total = sum(getattr(self, key) for key in TOKEN_CORRUPTIONS)
        if total > 1.0 + 1e-9:
            raise ConfigError(
                f"config.data.noising: masking + deletion + infilling = {total:g} but they take disjoint shares of a document: "
                "their sum must be at most 1"
            )
        if not (isinstance(self.poisson_lambda, (int, float)) and self.poisson_lambda > 0):
            raise ConfigError(f"config.data.noising.poisson_lambda={self.poisson_lambda!r}: must be positive")

    @classmethod
    def from_config(cls, config, split: str = "train") -> "NoisingSpec":
        """The spec of `config.data.noising`: with the data seed for training; for evaluation with a
        fixed seed (masking.EVAL_SEED, use epoch 0), so held-out sources are the same for every data seed."""
        noising = config.data.noising
        known = [f.name for f in dataclasses.fields(cls) if f.name != "seed"]
        unknown = sorted(set(noising.keys()) - set(known))
        if unknown:
            raise ConfigError(f"config.data.noising has unknown keys {unknown}: the keys are {known}")
        objective = config.data.get("sentence_objective", "none")
        if objective != "none":
            raise ConfigError(
                f"config.data.sentence_objective={objective!r}: a seq2seq (data.noising) example is one chunk of whole sentences; set it to 'none'"
            )
        return cls(**noising.to_dict(), seed=config.data.seed if split == "train" else EVAL_SEED)


@dataclasses.dataclass(frozen=True)
class _Noised:
    """A corrupted batch: padded sources and targets with their lengths, and what was done per row."""

    source: np.ndarray
    source_length: np.ndarray
    target: np.ndarray
    target_length: np.ndarray
    stats: dict  # per-row arrays, the records' scalar keys (and `spans`: the spans per row)
    order: np.ndarray | None  # the permuted rows' sentence orders
    spans: dict | None  # starts, lengths, draws: [B, K] each, the first `spans` of a row real


@dataclasses.dataclass(frozen=True)
class Example:
    """One corrupted document: source and target int32 ids ([BOS] ... [EOS]), and what was done."""

    source: np.ndarray
    target: np.ndarray
    record: dict


def segment(tokens: np.ndarray, sentence_offsets: np.ndarray, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [start, start + length) of a flat token array and the lengths of the sentences (or
    their parts) in it, given the array's sentence offsets (pretraining.py's layout)."""
    end = start + length
    inside = sentence_offsets[np.searchsorted(sentence_offsets, start, "right") : np.searchsorted(sentence_offsets, end, "left")]
    return np.asarray(tokens[start:end]), np.diff(np.concatenate([[start], inside, [end]]))


def chunks(documents, instances, index: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, sentence lengths) of pretraining instances `index` of objective 'none' (each one
    chunk of whole sentences, segment A) in `documents` (a TokenizedDocuments): the documents a
    seq2seq batch corrupts."""
    starts, lengths = instances.a_start[index].tolist(), instances.a_length[index].tolist()
    return [segment(documents.tokens, documents.sentence_offsets, start, length) for start, length in zip(starts, lengths)]


class BatchBuilder:
    """Turns a [B, 2] array of (instance id, epoch) into a seq2seq batch: the map function of
    `loader.batches` for a config with `data.noising` (as loader.BatchBuilder is for masked LM)."""

    def __init__(self, documents, instances, noiser: "Noiser"):
        self.documents = documents
        self.instances = instances
        self.noiser = noiser

    def __call__(self, ids_and_epochs: np.ndarray) -> dict[str, np.ndarray]:
        index, epoch = ids_and_epochs[:, 0], ids_and_epochs[:, 1]
        return self.noiser(chunks(self.documents, self.instances, index), epoch, index)


class Noiser:
    """Applies a NoisingSpec with one tokenizer's special ids and word starts, at one `max_length`.

    A batch is corrupted at once, in [B, max_length - 2] arrays (a row per document). Every random
    number is masking.uniform's counter-based hash of (seed, epoch, example index, stream, column),
    so an example's corruption does not depend on the batch it is in or on the other examples."""

    def __init__(self, spec: NoisingSpec, tokenizer, max_length: int, decoder_start_id: int | None = None):
        if max_length < 3:
            raise ConfigError(f"config.data.max_seq_length={max_length}: a seq2seq example needs at least 3 positions ([BOS] x [EOS])")
        self.spec = spec
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id, self.mask_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id
        # BART starts decoding from [EOS] (HF's decoder_start_token_id = eos_token_id = 2).
        self.decoder_start_id = self.eos_id if decoder_start_id is None else decoder_start_id
        self.word_start = np.asarray(tokenizer.word_start, np.bool_)
        self.replacement_ids = np.flatnonzero(~np.asarray(tokenizer.is_special, np.bool_)).astype(np.int32)
        # Poisson(lambda) by inversion of its distribution function, tabled until the tail is negligible.
        lam = spec.poisson_lambda
        k = np.arange(int(lam + 12 * math.sqrt(lam) + 30))
        self.poisson_cdf = np.cumsum(np.exp(k * math.log(lam) - lam - np.array([math.lgamma(x + 1.0) for x in k])))
        self.poisson_cdf[-1] = 1.0

    def example(self, tokens, sentence_lengths, epoch: int, index: int) -> Example:
        """The source and target of one document (tokens and its sentence lengths, which sum to its length)."""
        return self.examples([(tokens, sentence_lengths)], [epoch], [index])[0]

    def examples(self, documents: Sequence[tuple[np.ndarray, np.ndarray]], epoch, index) -> list[Example]:
        """The source, target and record of each (tokens, sentence lengths) document, given its epoch
        (one for all, or one each) and its example index."""
        if len(documents) == 0:
            return []
        noised = self._noise(documents, epoch, index)
        examples = []
        for row in range(len(documents)):
            record = dict(_EMPTY_RECORD, **{key: value[row].item() for key, value in noised.stats.items()})
            record["empty"] = record["tokens"] == 0
            if record["permuted"]:
                record["sentence_order"] = noised.order[row, : record["sentences"]]
            if noised.spans is not None:
                k = record.pop("spans")
                record.update({f"span_{key}": value[row, :k] for key, value in noised.spans.items()})
            source = noised.source[row, : noised.source_length[row]]
            target = noised.target[row, : noised.target_length[row]]
            examples.append(Example(source=source, target=target, record=record))
        return examples

    def __call__(self, documents: Sequence[tuple[np.ndarray, np.ndarray]], epoch, index) -> dict[str, np.ndarray]:
        """The seq2seq batch of `documents` (see `collate`)."""
        noised = self._noise(documents, epoch, index)
        return self._batch(noised.source, noised.source_length, noised.target, noised.target_length)

    def collate(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        """The seq2seq batch contract: int32 arrays of shape [B, max_length]
          input_ids               the sources, padded with [PAD]
          attention_mask          1 on the source's tokens
          decoder_input_ids       the targets shifted right, starting with the decoder start token ([EOS], as BART)
          decoder_attention_mask  1 on the decoder's inputs
          labels                  the targets ([BOS] original [EOS]), padded with [PAD]
          label_weights           1 where a label counts in the loss (the padding is ignored)
        """
        rows = []
        for name in ("source", "target"):
            length = np.array([len(getattr(e, name)) for e in examples], np.int64)
            padded = np.full((len(examples), self.max_length), self.pad_id, np.int32)
            padded[np.arange(self.max_length)[None, :] < length[:, None]] = np.concatenate([getattr(e, name) for e in examples])
            rows += [padded, length]
        return self._batch(*rows)

    def _batch(self, source, source_length, target, target_length) -> dict[str, np.ndarray]:
        """`collate`'s arrays from the padded [B, max_length] sources and targets and their lengths."""
        position = np.arange(self.max_length)[None, :]
        label_weights = (position < target_length[:, None]).astype(np.int32)
        decoder_input_ids = np.concatenate([np.full((len(target), 1), self.decoder_start_id, np.int32), target[:, :-1]], axis=1)
        return dict(
            input_ids=source,
            attention_mask=(position < source_length[:, None]).astype(np.int32),
            decoder_input_ids=np.where(label_weights == 1, decoder_input_ids, self.pad_id).astype(np.int32),
            decoder_attention_mask=label_weights,
            labels=target,
            label_weights=label_weights,
        )

    def _noise(self, documents, epoch, index) -> "_Noised":
        """The corruption of a batch of documents, as padded rows."""
        count, width = len(documents), self.max_length - 2
        epoch = np.broadcast_to(np.asarray(epoch, np.int64), (count,))
        index = np.asarray(index, np.int64)
        # The documents as rows cut at `width` tokens, their sentence starts marked.
        sentence_lengths = [np.asarray(lengths, np.int64) for _, lengths in documents]
        size = np.array([len(tokens) for tokens, _ in documents], np.int64)
        all_lengths = np.concatenate(sentence_lengths)
        document_of = np.repeat(np.arange(count), [len(lengths) for lengths in sentence_lengths])
        wrong = np.flatnonzero(np.bincount(document_of, weights=all_lengths, minlength=count) != size)
        if len(wrong):
            raise ValueError(f"the sentence lengths of document {wrong[0]} of the batch do not sum to its {size[wrong[0]]} tokens")
        first = np.cumsum(all_lengths) - all_lengths - np.repeat(np.cumsum(size) - size, [len(lengths) for lengths in sentence_lengths])
        lengths = np.minimum(size, width)
        real = np.arange(width)[None, :] < lengths[:, None]
        original = np.zeros((count, width), np.int32)
        original[real] = np.concatenate([np.asarray(tokens[:width], np.int32) for tokens, _ in documents])
        marked = (first < width) & (all_lengths > 0)
        sentence_start = np.zeros((count, width), np.bool_)
        sentence_start[document_of[marked], first[marked]] = True
        draw = functools.partial(uniform, self.spec.seed, epoch, index)
        stats = dict(tokens=lengths, cut_tokens=size - lengths, sentences=sentence_start.sum(1))
        tokens, sentence_start, order = self._permute(original, sentence_start, real, draw, stats)
        body, body_length, spans = tokens, lengths, None
        if any(getattr(self.spec, key) > 0 for key in TOKEN_CORRUPTIONS):
            body, body_length, spans = self._corrupt_tokens(tokens, sentence_start, real, draw, stats)
        body = self._rotate(body, body_length, lengths, draw, stats)
        kept = np.minimum(body_length, width)
        stats.update(source_tokens=kept, source_cut_tokens=body_length - kept)
        return _Noised(
            source=self._framed(body, kept),
            source_length=kept + 2,
            target=self._framed(original, lengths),
            target_length=lengths + 2,
            stats=stats,
            order=order,
            spans=spans,
        )

    def _framed(self, body, length):
        """[BOS] body[:length] [EOS] [PAD]... per row: int32 [B, max_length]."""
        position = np.arange(self.max_length)[None, :]
        column = np.minimum(np.maximum(position - 1, 0), body.shape[1] - 1)
        rows = np.where((position >= 1) & (position <= length[:, None]), np.take_along_axis(body, np.broadcast_to(column, (len(body), self.max_length)), axis=1), self.pad_id)
        rows[:, 0] = self.bos_id
        rows[np.arange(len(body)), length + 1] = self.eos_id
        return rows.astype(np.int32)

    def _permute(self, tokens, sentence_start, real, draw, stats):
        """Sentence permutation: in each row with two sentences or more, ceil(rate x sentences) of
        them are chosen (the smallest keys) and put back into their places in a random order."""
        count, width = tokens.shape
        rate, sentences = self.spec.permutation, stats["sentences"]
        stats.update(permuted=(rate > 0) & (sentences >= 2), single_sentence=(rate > 0) & (sentences == 1), moved_sentences=np.zeros(count, np.int64))
        if not stats["permuted"].any():
            return tokens, sentence_start, None
        slot = np.arange(width)[None, :]
        valid = slot < sentences[:, None]
        chosen_count = np.where(stats["permuted"], np.ceil(sentences * rate), 0).astype(np.int64)
        keys = draw(_STREAM_PERMUTE, 2 * width)
        rank = np.argsort(np.argsort(np.where(valid, keys[:, :width], 2.0), axis=1), axis=1)
        chosen = rank < chosen_count[:, None]
        places = np.argsort(~chosen, axis=1, kind="stable")  # the chosen sentences' places first, in order
        movers = np.argsort(np.where(chosen, keys[:, width:], 2.0), axis=1)  # the chosen sentences, shuffled
        order = np.broadcast_to(slot, (count, width)).copy()
        np.put_along_axis(order, places, np.where(slot < chosen_count[:, None], movers, places), axis=1)
        stats["moved_sentences"] = ((order != slot) & valid).sum(1)
        # New sentence s is old sentence order[s]: each position reads its sentence's old start + offset.
        sentence_id = np.maximum(np.cumsum(sentence_start, axis=1) - 1, 0)
        length = np.bincount((np.arange(count)[:, None] * width + sentence_id)[real], minlength=count * width).reshape(count, width)
        new_length = np.take_along_axis(length, order, axis=1)
        new_start = np.cumsum(new_length, axis=1) - new_length
        new_sentence_start = np.zeros((count, width), np.bool_)
        rows, columns = np.nonzero(valid)
        new_sentence_start[rows, new_start[rows, columns]] = True
        new_id = np.maximum(np.cumsum(new_sentence_start, axis=1) - 1, 0)
        old_start = np.take_along_axis(np.cumsum(length, axis=1) - length, np.take_along_axis(order, new_id, axis=1), axis=1)
        gather = np.where(real, old_start + slot - np.take_along_axis(new_start, new_id, axis=1), 0)
        return np.take_along_axis(tokens, gather, axis=1), new_sentence_start & real, order

    def _corrupt_tokens(self, tokens, sentence_start, real, draw, stats):
        """Masking, deletion and infilling on disjoint units of each row; returns the corrupted rows,
        their lengths and the spans (starts in units, lengths, and the Poisson draws, per row)."""
        spec = self.spec
        count, width = tokens.shape
        rows, slot = np.arange(count), np.arange(width)[None, :]
        starts = real & (self.word_start[tokens] | sentence_start) if spec.whole_word else real
        unit_of = np.maximum(np.cumsum(starts, axis=1) - 1, 0)
        units = starts.sum(1)
        unit_tokens = np.bincount((rows[:, None] * width + unit_of)[real], minlength=count * width).reshape(count, width)
        rounding = draw(_STREAM_BUDGET, 3)

        def budget(rate, column):
            return np.floor(rate * units + rounding[:, column]).astype(np.int64) if rate > 0 else np.zeros(count, np.int64)

        state = np.full((count, width), _KEEP, np.int8)
        inserts = np.zeros((count, width + 1), np.int64)  # 0-length spans before unit u (u = units: at the end)
        opens = np.zeros((count, width), np.bool_)  # the first unit of a span of length >= 1
        span_budget = budget(spec.infilling, 0)
        spans = dict(starts=np.zeros((count, 0), np.int64), lengths=np.zeros((count, 0), np.int64), draws=np.zeros((count, 0), np.int64))
        span_count = np.zeros(count, np.int64)
        if spec.infilling > 0:
            # Poisson draws until they cover the budget (2 x width units on average: never short in practice).
            draws_width = int(2 * width / spec.poisson_lambda) + 16
            column = np.arange(draws_width)[None, :]
            draws = np.searchsorted(self.poisson_cdf, draw(_STREAM_SPAN_LENGTH, draws_width), side="right")
            total = np.cumsum(draws, axis=1)
            span_budget = np.minimum(span_budget, total[:, -1])
            last = np.argmax(total >= span_budget[:, None], axis=1)  # the first draw that reaches the budget
            span_count = np.where(span_budget > 0, last + 1, 0)
            drawn = column < span_count[:, None]
            lengths = np.where(drawn, draws, 0)
            lengths[rows, last] = np.where(span_count > 0, span_budget - total[rows, last] + draws[rows, last], 0)
            lengths = np.take_along_axis(lengths, np.argsort(np.where(drawn, draw(_STREAM_SPAN_ORDER, draws_width), 2.0), axis=1), axis=1)
            # Stars and bars: which of the (units - budget) free units and the spans' places hold spans,
            # uniformly; span k then starts after the free units and the spans before it.
            items = units - span_budget + span_count
            item_keys = draw(_STREAM_SPAN_PLACE, width + draws_width)
            picks = np.argsort(np.where(np.arange(width + draws_width)[None, :] < items[:, None], item_keys, 2.0), axis=1)[:, :draws_width]
            place = np.sort(np.where(drawn, picks, width + draws_width), axis=1)
            first_unit = np.where(drawn, place - column + np.cumsum(lengths, axis=1) - lengths, width)
            boundary = np.zeros((count, width + 1), np.int64)
            covering = drawn & (lengths > 0)
            span_rows = np.nonzero(covering)[0]
            np.add.at(boundary, (span_rows, first_unit[covering]), 1)
            np.add.at(boundary, (span_rows, (first_unit + lengths)[covering]), -1)
            state[np.cumsum(boundary, axis=1)[:, :width] > 0] = _SPAN
            opens[span_rows, first_unit[covering]] = True
            empty = drawn & (lengths == 0)
            np.add.at(inserts, (np.nonzero(empty)[0], first_unit[empty]), 1)
            spans = dict(starts=first_unit, lengths=lengths, draws=draws)
        free = (slot < units[:, None]) & (state == _KEEP)
        free_count = free.sum(1)
        mask_budget = np.minimum(budget(spec.masking, 1), free_count)
        delete_budget = np.minimum(budget(spec.deletion, 2), free_count - mask_budget)
        if (mask_budget + delete_budget).any():
            rank = np.argsort(np.argsort(np.where(free, draw(_STREAM_CHOOSE, width), 2.0), axis=1), axis=1)
            state[free & (rank < mask_budget[:, None])] = _MASK
            state[free & (rank >= mask_budget[:, None]) & (rank < (mask_budget + delete_budget)[:, None])] = _DELETE
        in_unit = slot < units[:, None]
        stats.update(
            units=units,
            masked_units=mask_budget,
            masked_tokens=np.where(in_unit & (state == _MASK), unit_tokens, 0).sum(1),
            deleted_units=delete_budget,
            deleted_tokens=np.where(in_unit & (state == _DELETE), unit_tokens, 0).sum(1),
            infilled_units=span_budget,
            infilled_tokens=np.where(in_unit & (state == _SPAN), unit_tokens, 0).sum(1),
            spans=span_count,
        )
        # Each token emits the [MASK]s of the 0-length spans before its unit, then its id, a [MASK]
        # (masked, or the first token of a span) or nothing (deleted, or inside a span); a last
        # column emits the 0-length spans at the end.
        token_state = np.take_along_axis(state, unit_of, axis=1)
        emit = real & ((token_state <= _MASK) | (np.take_along_axis(opens, unit_of, axis=1) & starts))
        before = np.where(starts, np.take_along_axis(inserts, unit_of, axis=1), 0)
        per_token = np.concatenate([before + emit, inserts[rows, units][:, None]], axis=1)
        emit = np.concatenate([emit, np.zeros((count, 1), np.bool_)], axis=1)
        value = np.concatenate([np.where(token_state == _KEEP, tokens, self.mask_id), np.full((count, 1), self.mask_id)], axis=1)
        body_length = per_token.sum(1)
        body = np.full((count, max(int(body_length.max()), 1)), self.mask_id, np.int32)
        emit_rows, emit_columns = np.nonzero(emit)
        body[emit_rows, (np.cumsum(per_token, axis=1) - 1)[emit_rows, emit_columns]] = value[emit_rows, emit_columns]
        if spec.mask_random > 0:
            out_width = body.shape[1]
            replace = (body == self.mask_id) & (np.arange(out_width)[None, :] < body_length[:, None])
            replace &= draw(_STREAM_RANDOM, out_width) < spec.mask_random
            random_ids = self.replacement_ids[(draw(_STREAM_REPLACEMENT, out_width) * len(self.replacement_ids)).astype(np.int64)]
            body = np.where(replace, random_ids, body)
            stats["random_replacements"] = replace.sum(1)
        return body, body_length, spans

    def _rotate(self, body, body_length, lengths, draw, stats):
        """With probability `rotation`, a row starts at a uniformly chosen token other than its first."""
        count = len(body)
        stats.update(rotation_offset=np.zeros(count, np.int64), unrotatable=np.zeros(count, np.bool_))
        if self.spec.rotation == 0:
            return body
        coin = draw(_STREAM_ROTATE, 2)
        rotate = (coin[:, 0] < self.spec.rotation) & (lengths > 0)
        stats["unrotatable"] = rotate & (body_length < 2)
        rotate &= body_length >= 2
        offset = np.where(rotate, 1 + np.floor(coin[:, 1] * (body_length - 1)).astype(np.int64), 0)
        stats["rotation_offset"] = offset
        column = np.arange(body.shape[1])[None, :]
        return np.take_along_axis(body, (column + offset[:, None]) % np.maximum(body_length, 1)[:, None], axis=1)


def realised_stats(records: Sequence[dict]) -> dict:
    """What the corruptions did over a sample of examples' records (one JSON-able dict), for
    `bertjax data stats`: each corruption's realised share of the tokens (and of the units its budget
    counts), the spans' lengths, and the counted repairs.

    span_draw_mean pools the Poisson draws, untrimmed: by Wald's identity it estimates lambda;
    span_nonzero_draw_mean estimates lambda / (1 - exp(-lambda)), the mean of the spans that cover a
    unit; span_mean is the realised mean (the last span of a document trimmed to the budget).
    """
    def total(key):
        return int(sum(int(r[key]) for r in records))

    def ratio(numerator, denominator):
        return numerator / denominator if denominator else None

    tokens, units = total("tokens"), total("units")
    draws = np.concatenate([np.asarray(r["span_draws"], np.int64) for r in records]) if records else _NONE
    spans = np.concatenate([np.asarray(r["span_lengths"], np.int64) for r in records]) if records else _NONE
    permutable = len(records) - total("empty") - total("single_sentence") if records else 0
    return dict(
        examples=len(records),
        tokens=tokens,
        units=units,
        masked_fraction=ratio(total("masked_tokens"), tokens),
        masked_unit_fraction=ratio(total("masked_units"), units),
        deleted_fraction=ratio(total("deleted_tokens"), tokens),
        deleted_unit_fraction=ratio(total("deleted_units"), units),
        infilled_fraction=ratio(total("infilled_tokens"), tokens),
        infilled_unit_fraction=ratio(total("infilled_units"), units),
        spans_per_example=ratio(len(spans), len(records)),
        span_mean=float(spans.mean()) if len(spans) else None,
        zero_length_span_fraction=float((spans == 0).mean()) if len(spans) else None,
        span_draw_mean=float(draws.mean()) if len(draws) else None,
        span_nonzero_draw_mean=float(draws[draws > 0].mean()) if (draws > 0).any() else None,
        random_replacements=total("random_replacements"),
        permuted_fraction=ratio(total("permuted"), permutable),
        moved_sentence_fraction=ratio(total("moved_sentences"), total("sentences")),
        rotated_fraction=ratio(sum(r["rotation_offset"] > 0 for r in records), len(records)),
        source_to_target_length=ratio(total("source_tokens"), tokens),
        empty_documents=total("empty"),
        single_sentence_documents=total("single_sentence"),
        unrotatable_documents=total("unrotatable"),
        cut_documents=sum(r["cut_tokens"] > 0 for r in records),
        cut_tokens=total("cut_tokens"),
        source_cut_tokens=total("source_cut_tokens"),
    )
