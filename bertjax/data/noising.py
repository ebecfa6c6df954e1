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
import math
from typing import Sequence

import numpy as np

from bertjax.config import CORRUPTIONS, ConfigError
from bertjax.data.masking import EVAL_SEED

_TAG = 0xB0A7  # the noising stream of the (seed, epoch, index) generators: unlike any other module's
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
    """Applies a NoisingSpec with one tokenizer's special ids and word starts, at one `max_length`."""

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
        self._token_noise = any(getattr(spec, key) > 0 for key in TOKEN_CORRUPTIONS)

    def example(self, tokens, sentence_lengths, epoch: int, index: int) -> Example:
        """The source and target of one document (tokens and its sentence lengths, which sum to its length)."""
        tokens = np.asarray(tokens, np.int32)
        lengths = np.asarray(sentence_lengths, np.int64)
        if lengths.sum() != len(tokens):
            raise ValueError(f"sentence lengths sum to {lengths.sum()} but the document has {len(tokens)} tokens")
        rng = np.random.default_rng([self.spec.seed, int(epoch), int(index), _TAG])
        keep = self.max_length - 2
        record = dict(_EMPTY_RECORD, cut_tokens=max(len(tokens) - keep, 0))
        if record["cut_tokens"]:
            tokens = tokens[:keep]
            lengths = np.diff(np.minimum(np.concatenate([[0], np.cumsum(lengths)]), keep))
        lengths = lengths[lengths > 0]
        record.update(tokens=len(tokens), sentences=len(lengths), empty=len(tokens) == 0)
        body = tokens
        if len(tokens):
            body, lengths = self._permute(body, lengths, rng, record)
            if self._token_noise:
                body = self._corrupt_tokens(body, lengths, rng, record)
            body = self._rotate(body, rng, record)
        record.update(source_tokens=min(len(body), keep), source_cut_tokens=max(len(body) - keep, 0))
        source = np.concatenate([[self.bos_id], body[:keep], [self.eos_id]]).astype(np.int32)
        target = np.concatenate([[self.bos_id], tokens, [self.eos_id]]).astype(np.int32)
        return Example(source=source, target=target, record=record)

    def examples(self, documents: Sequence[tuple[np.ndarray, np.ndarray]], epoch, index) -> list[Example]:
        """`example` of each (tokens, sentence lengths) document, with its epoch and example index."""
        epoch = np.broadcast_to(np.asarray(epoch), (len(documents),))
        return [self.example(tokens, lengths, e, i) for (tokens, lengths), e, i in zip(documents, epoch.tolist(), np.asarray(index).tolist())]

    def __call__(self, documents: Sequence[tuple[np.ndarray, np.ndarray]], epoch, index) -> dict[str, np.ndarray]:
        """The seq2seq batch of `documents` (see `collate`)."""
        return self.collate(self.examples(documents, epoch, index))

    def collate(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        """The seq2seq batch contract: int32 arrays of shape [B, max_length]
          input_ids               the sources, padded with [PAD]
          attention_mask          1 on the source's tokens
          decoder_input_ids       the targets shifted right, starting with the decoder start token ([EOS], as BART)
          decoder_attention_mask  1 on the decoder's inputs
          labels                  the targets ([BOS] original [EOS]), padded with [PAD]
          label_weights           1 where a label counts in the loss (the padding is ignored)
        """
        batch, width = len(examples), self.max_length
        input_ids = np.full((batch, width), self.pad_id, np.int32)
        labels = np.full((batch, width), self.pad_id, np.int32)
        source_length = np.array([len(e.source) for e in examples], np.int64)
        target_length = np.array([len(e.target) for e in examples], np.int64)
        position = np.arange(width)[None, :]
        input_ids[position < source_length[:, None]] = np.concatenate([e.source for e in examples])
        labels[position < target_length[:, None]] = np.concatenate([e.target for e in examples])
        label_weights = (position < target_length[:, None]).astype(np.int32)
        decoder_input_ids = np.concatenate([np.full((batch, 1), self.decoder_start_id, np.int32), labels[:, :-1]], axis=1)
        return dict(
            input_ids=input_ids,
            attention_mask=(position < source_length[:, None]).astype(np.int32),
            decoder_input_ids=np.where(label_weights == 1, decoder_input_ids, self.pad_id).astype(np.int32),
            decoder_attention_mask=label_weights,
            labels=labels,
            label_weights=label_weights,
        )

    def _permute(self, tokens, lengths, rng, record):
        """Sentence permutation: ceil(rate x sentences) of them shuffled among their places."""
        if self.spec.permutation == 0:
            return tokens, lengths
        count = len(lengths)
        if count < 2:
            record["single_sentence"] = True
            return tokens, lengths
        chosen = rng.permutation(count)[: math.ceil(count * self.spec.permutation)]
        order = np.arange(count)
        order[chosen] = chosen[rng.permutation(len(chosen))]
        new_lengths = lengths[order]
        gather = np.repeat((np.cumsum(lengths) - lengths)[order] - (np.cumsum(new_lengths) - new_lengths), new_lengths) + np.arange(len(tokens))
        record.update(permuted=True, moved_sentences=int((order != np.arange(count)).sum()), sentence_order=order)
        return tokens[gather], new_lengths

    def _budget(self, rate: float, units: int, rng) -> int:
        """rate x units, rounded stochastically (unbiased at every length)."""
        return int(math.floor(rate * units + rng.random())) if rate > 0 else 0

    def _spans(self, budget: int, rng) -> tuple[np.ndarray, np.ndarray]:
        """Poisson span lengths drawn until they cover `budget` units, the last one trimmed to fit (as
        fairseq does); returns (the lengths used, the draws). The draws are a sample with a stopping
        rule, so pooled over documents sum(draws) / count(draws) -> lambda (Wald's identity)."""
        lam = self.spec.poisson_lambda
        draws = np.zeros(0, np.int64)
        while draws.sum() < budget:
            draws = np.concatenate([draws, rng.poisson(lam, size=max(8, int(2 * budget / lam) + 8))])
        total = np.cumsum(draws)
        last = int(np.searchsorted(total, budget))  # the first draw that reaches the budget
        draws = draws[: last + 1]
        lengths = draws.copy()
        lengths[last] = budget - (total[last - 1] if last > 0 else 0)
        return lengths, draws

    def _corrupt_tokens(self, tokens, lengths, rng, record):
        """Masking, deletion and infilling on disjoint units of the (permuted) document."""
        spec = self.spec
        n = len(tokens)
        starts = self.word_start[tokens] if spec.whole_word else np.ones(n, np.bool_)
        starts = starts.copy()
        starts[np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)] = True  # a sentence starts a word
        unit_of = np.cumsum(starts) - 1
        units = int(starts.sum())
        unit_tokens = np.bincount(unit_of, minlength=units)
        state = np.full(units, _KEEP, np.int8)
        span_budget = self._budget(spec.infilling, units, rng)
        spans, draws = self._spans(span_budget, rng) if span_budget else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        spans = spans[rng.permutation(len(spans))]
        # Stars and bars: which of the (units - span_budget) free units and the K spans' places hold
        # spans, uniformly; span k then starts after the free units and the spans before it.
        place = np.sort(rng.choice(units - span_budget + len(spans), size=len(spans), replace=False))
        first_unit = place - np.arange(len(spans)) + np.cumsum(spans) - spans
        state[np.repeat(first_unit - np.cumsum(spans) + spans, spans) + np.arange(span_budget)] = _SPAN
        free_units = np.flatnonzero(state == _KEEP)
        mask_budget = min(self._budget(spec.masking, units, rng), len(free_units))
        delete_budget = min(self._budget(spec.deletion, units, rng), len(free_units) - mask_budget)
        chosen = free_units[rng.permutation(len(free_units))[: mask_budget + delete_budget]]
        state[chosen[:mask_budget]] = _MASK
        state[chosen[mask_budget:]] = _DELETE
        tokens_in = np.bincount(state, weights=unit_tokens, minlength=4).astype(np.int64).tolist()
        record.update(
            units=units,
            masked_units=mask_budget,
            masked_tokens=tokens_in[_MASK],
            deleted_units=delete_budget,
            deleted_tokens=tokens_in[_DELETE],
            infilled_units=span_budget,
            infilled_tokens=tokens_in[_SPAN],
            span_starts=first_unit,
            span_lengths=spans,
            span_draws=draws,
        )
        # Each token emits the [MASK]s of the 0-length spans before its unit, then its id, a [MASK]
        # (masked, or the first token of a span) or nothing (deleted, or inside a span).
        inserts = np.bincount(first_unit[spans == 0], minlength=units + 1)
        opens = np.zeros(units, np.bool_)
        opens[first_unit[spans > 0]] = True
        token_state = state[unit_of]
        emit = (token_state <= _MASK) | (opens[unit_of] & starts)  # kept, masked, or opening a span
        per_token = np.where(starts, inserts[unit_of], 0) + emit
        out = np.full(int(per_token.sum()) + int(inserts[units]), self.mask_id, np.int32)
        out[(np.cumsum(per_token) - 1)[emit]] = np.where(token_state == _KEEP, tokens, self.mask_id)[emit]
        if spec.mask_random > 0:
            replace = (out == self.mask_id) & (rng.random(len(out)) < spec.mask_random)
            out[replace] = self.replacement_ids[rng.integers(len(self.replacement_ids), size=int(replace.sum()))]
            record["random_replacements"] = int(replace.sum())
        return out

    def _rotate(self, body, rng, record):
        """With probability `rotation`, start the source at a uniformly chosen token other than the first."""
        if self.spec.rotation == 0 or rng.random() >= self.spec.rotation:
            return body
        if len(body) < 2:
            record["unrotatable"] = True
            return body
        offset = int(rng.integers(1, len(body)))
        record["rotation_offset"] = offset
        return np.roll(body, -offset)


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
