"""Documents -> pretraining instances (segments A/B and a sentence label) -> fixed-shape token arrays.

Instances follow the original BERT's `create_instances_from_document`: sentences are gathered into
chunks up to a target length (`max_seq_length` minus the special tokens; with probability
`short_seq_prob` a shorter random target, for every objective so ablation arms differ only in the
objective), then
  - 'nsp': A = the chunk's first k sentences; half the time B = the rest (label 0), half the time a
    segment of a different document (label 1 = random), the unused sentences going back to the pool;
  - 'sop': A and B as in the real-next case; half the time swapped (label 1 = swapped), as in ALBERT;
  - 'none': the whole chunk as one segment (RoBERTa's doc-sentences), no label.
A pair that is too long loses tokens from its longer segment, at the front or the back (seeded).

The instance table is computed once from the token cache and the data seed (cheap: a pass over the
sentence lengths); an instance is only offsets into the token array, so a batch is assembled with a
few vectorised gathers (`assemble`).
"""

from __future__ import annotations

import array
import bisect
import dataclasses
from typing import Iterator

import numpy as np

from bertjax.config import SENTENCE_OBJECTIVES as OBJECTIVES
from bertjax.data.corpus import CorpusError, TokenizedDocuments


@dataclasses.dataclass(frozen=True)
class Instances:
    """Per instance: token offsets and lengths of segments A and B (B empty for 'none'), the label,
    and the documents A and B come from."""

    objective: str
    a_start: np.ndarray
    a_length: np.ndarray
    b_start: np.ndarray
    b_length: np.ndarray
    label: np.ndarray
    a_document: np.ndarray
    b_document: np.ndarray

    def __len__(self) -> int:
        return len(self.a_start)


# Documents whose sentences create_instances holds as Python ints at a time.
_BLOCK_DOCUMENTS = 4096


class _Draws:
    """Uniform draws from `rng`, a buffer at a time: scalar draws in a Python loop at list speed."""

    def __init__(self, rng: np.random.Generator, size: int = 1 << 16):
        self.rng, self.size, self.buffer = rng, size, []

    def random(self) -> float:
        if not self.buffer:
            self.buffer = self.rng.random(self.size).tolist()
        return self.buffer.pop()

    def integers(self, low: int, high: int) -> int:
        """An integer in [low, high)."""
        return low + int(self.random() * (high - low))


def num_special_tokens(objective: str) -> int:
    return 2 if objective == "none" else 3


def _block_offsets(documents: TokenizedDocuments, block_ids: np.ndarray, max_tokens: int) -> tuple[list[int], np.ndarray, int]:
    """The token offsets of the documents `block_ids`' sentences, each document's followed by its end
    (as Python ints, for the loop), with sentences longer than `max_tokens` cut into pieces; where each
    document's first piece and its end are in that list ([documents, 2]); and how many sentences were cut.

    Only the block's own documents are gathered: the held-out split's documents are scattered through
    the corpus, and the span from its first to its last would be most of it."""
    first, end = documents.document_offsets[block_ids], documents.document_offsets[block_ids + 1]
    entries = end - first + 1  # a document's sentences and its end
    positions = np.concatenate([[0], np.cumsum(entries)])
    sentence = np.repeat(first - positions[:-1], entries) + np.arange(positions[-1])
    offsets = documents.sentence_offsets[sentence]
    is_end = np.zeros(len(offsets), np.bool_)
    is_end[positions[1:] - 1] = True
    lengths = np.diff(offsets, append=offsets[-1:])
    pieces = np.where(is_end, 1, np.maximum(1, -(-lengths // max_tokens)))
    first_piece = np.concatenate([[0], np.cumsum(pieces)])
    cut = int((pieces > 1).sum())
    if cut:
        offsets = np.repeat(offsets, pieces) + max_tokens * (np.arange(first_piece[-1]) - np.repeat(first_piece[:-1], pieces))
    bounds = np.stack([first_piece[positions[:-1]], first_piece[positions[1:] - 1]], 1)
    return offsets.tolist(), bounds, cut


def create_instances(
    documents: TokenizedDocuments, max_seq_length: int, short_seq_prob: float, objective: str, seed: int, name: str = "this split"
) -> tuple[Instances, dict]:
    """The instance table of `documents` and a report of what could not be used (and why).

    Documents too few or too short for the objective are a CorpusError naming `name` (e.g. "the eval
    split of corpus 'x.txt'"); bertjax.data.corpus.pseudo_documents makes this rare for real text.
    """
    report: dict = {}
    blocks = list(instance_blocks(documents, max_seq_length, short_seq_prob, objective, seed, name, report))
    arrays = {field.name: np.concatenate([getattr(block, field.name) for block in blocks]) for field in dataclasses.fields(Instances) if field.name != "objective"}
    return Instances(objective=objective, **arrays), report


def instance_blocks(
    documents: TokenizedDocuments, max_seq_length: int, short_seq_prob: float, objective: str, seed: int, name: str, report: dict
) -> Iterator[Instances]:
    """`create_instances` a block of documents at a time (so that a caller can store a large table
    without holding it); `report` is filled in after the last block."""
    if objective not in OBJECTIVES:
        raise ValueError(f"config.data.sentence_objective={objective!r}: choose one of {OBJECTIVES}")
    max_tokens = max_seq_length - num_special_tokens(objective)
    if max_tokens < 2:
        raise ValueError(f"config.data.max_seq_length={max_seq_length} leaves no room for two segments")
    ids = documents.ids
    num_documents = len(ids)
    if objective == "nsp" and num_documents < 2:
        raise CorpusError(
            f"objective 'nsp' needs at least two documents (its random segments come from another document) "
            f"but {name} has {num_documents}: give a larger data.eval_fraction, a data.eval_corpus, a corpus with more "
            "documents, or data.sentence_objective=sop"
        )
    sentence_offsets, document_offsets = documents.sentence_offsets, documents.document_offsets
    long_sentences = 0
    paired = objective != "none"
    rng = np.random.default_rng([seed, 0x1A57])
    draw = _Draws(rng)
    counts = dict(instances=0, label_1=0, single=0, leftover=0)
    minimum_sentences = 2 if paired else 1

    def target_length() -> int:
        return draw.integers(2, max_tokens + 1) if draw.random() < short_seq_prob else max_tokens

    # Documents are walked a block at a time with their sentence offsets as Python ints (sentences
    # longer than a segment cut into pieces); a chunk ends at the first sentence that fills the target
    # (a bisection), with at least two sentences for a pair where the document has them. NSP's random
    # segments come from anywhere: they are located in the whole array after each block.
    for block in range(0, num_documents, _BLOCK_DOCUMENTS):
        rows = array.array("q")  # a_start, a_length, b_start, b_length, label, a_document, b_document
        randoms: list[tuple[int, int, float]] = []  # NSP's random B segments: (row, tokens wanted, draw)
        block_ids = ids[block : block + _BLOCK_DOCUMENTS]
        offsets, bounds, cut = _block_offsets(documents, block_ids, max_tokens)
        long_sentences += cut
        bounds = bounds.tolist()
        for position, document, (first, end) in zip(range(block, block + len(block_ids)), block_ids.tolist(), bounds):
            if paired and end - first < 2:
                counts["single"] += 1
                continue
            chunk_start = first
            while chunk_start < end:
                target = target_length()
                filled = bisect.bisect_left(offsets, offsets[chunk_start] + target, chunk_start + 1, end)
                chunk_end = min(end, max(filled, chunk_start + minimum_sentences))
                next_start = chunk_end
                if not paired:
                    a_start, a_length = offsets[chunk_start], offsets[chunk_end] - offsets[chunk_start]
                    rows.extend((a_start, a_length, a_start, 0, 0, document, document))
                elif chunk_end - chunk_start < 2:
                    counts["leftover"] += 1
                else:
                    a_end = draw.integers(chunk_start + 1, chunk_end)
                    a_start, a_length = offsets[chunk_start], offsets[a_end] - offsets[chunk_start]
                    if objective == "nsp" and num_documents > 1 and draw.random() < 0.5:
                        # B: from a random sentence of another document, as many sentences as fill the
                        # target (at least one); located after the block, all at once.
                        other = draw.integers(0, num_documents - 1)
                        randoms.append((len(rows) // 7, target - a_length, draw.random()))
                        rows.extend((a_start, a_length, 0, 0, 1, document, other + (other >= position)))
                        next_start = a_end  # the real continuation was not used: it starts the next chunk
                    else:
                        b_start, b_length = offsets[a_end], offsets[chunk_end] - offsets[a_end]
                        if objective == "sop" and draw.random() < 0.5:
                            rows.extend((b_start, b_length, a_start, a_length, 1, document, document))
                        else:
                            rows.extend((a_start, a_length, b_start, b_length, 0, document, document))
                chunk_start = next_start
        if not rows:
            continue
        table = np.frombuffer(rows, np.int64).reshape(-1, 7).copy()
        if randoms:
            row, need, u = (np.array(column) for column in zip(*randoms))
            other = ids[table[row, 6]]
            other_first, other_end = document_offsets[other], document_offsets[other + 1]
            b_first = other_first + (u * (other_end - other_first)).astype(np.int64)
            b_start = sentence_offsets[b_first]
            b_last = np.clip(np.searchsorted(sentence_offsets, b_start + need), b_first + 1, other_end)
            table[row, 2], table[row, 3], table[row, 6] = b_start, sentence_offsets[b_last] - b_start, other
        a_start, a_length, b_start, b_length = _truncate(table[:, 0], table[:, 1], table[:, 2], table[:, 3], max_tokens, rng)
        counts["instances"] += len(table)
        counts["label_1"] += int(table[:, 4].sum())
        yield Instances(
            objective=objective,
            a_start=a_start,
            a_length=a_length.astype(np.int32),
            b_start=b_start,
            b_length=b_length.astype(np.int32),
            label=table[:, 4].astype(np.int32),
            a_document=table[:, 5].astype(np.int32),
            b_document=table[:, 6].astype(np.int32),
        )
    if not counts["instances"]:
        raise CorpusError(
            f"no pretraining instance in {name}: {num_documents} documents, {counts['single']} of them with a single "
            f"sentence (objective {objective!r} needs two sentences in a document; 'none' does not)"
        )
    report.update(
        instances=counts["instances"],
        documents=num_documents,
        sentences=int(document_offsets[ids + 1].sum() - document_offsets[ids].sum()),
        long_sentences_split=long_sentences,
        single_sentence_documents_unused=counts["single"] if paired else 0,
        trailing_single_sentences_unused=counts["leftover"],
        label_1_fraction=counts["label_1"] / counts["instances"] if paired else None,
    )


def _truncate(a_start, a_length, b_start, b_length, max_tokens: int, rng):
    """Trim the longer segment first until A + B fits; each trimmed segment loses its front or its back."""
    excess = np.maximum(a_length + b_length - max_tokens, 0)
    longer_a = a_length >= b_length
    # Remove from the longer side down to the shorter one's length, then alternately from both.
    gap = np.abs(a_length - b_length)
    first_pass = np.minimum(excess, gap)
    rest = excess - first_pass
    cut_a = np.where(longer_a, first_pass, 0) + (rest + np.where(longer_a, 1, 0)) // 2
    cut_b = excess - cut_a
    front_a = rng.random(len(a_start)) < 0.5
    front_b = rng.random(len(a_start)) < 0.5
    a_start = a_start + np.where(front_a, cut_a, 0)
    b_start = b_start + np.where(front_b, cut_b, 0)
    return a_start, a_length - cut_a, b_start, b_length - cut_b


def assemble(tokens: np.ndarray, instances: Instances, index: np.ndarray, max_seq_length: int, tokenizer) -> dict[str, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` (or `[CLS] A [SEP]`) for the instances `index`, padded: int32 [B, S]."""
    a_start = instances.a_start[index][:, None]
    a_length = instances.a_length[index][:, None].astype(np.int64)
    b_start = instances.b_start[index][:, None]
    b_length = instances.b_length[index][:, None].astype(np.int64)
    paired = instances.objective != "none"
    position = np.arange(max_seq_length)[None, :]
    in_a = (position >= 1) & (position <= a_length)
    b_first = a_length + 2
    in_b = (position >= b_first) & (position < b_first + b_length)
    source = np.where(in_a, a_start + position - 1, b_start + position - b_first)
    inside = in_a | in_b
    input_ids = np.full(source.shape, tokenizer.pad_id, np.int32)
    input_ids[inside] = tokens[source[inside]]  # only the segments' tokens are read (a lazy store reads them from disk)
    total = a_length + 2 + (b_length + 1 if paired else 0)
    input_ids[:, 0] = tokenizer.cls_id
    input_ids = np.where(position == a_length + 1, tokenizer.sep_id, input_ids)
    if paired:
        input_ids = np.where(position == total - 1, tokenizer.sep_id, input_ids)
    batch = dict(
        input_ids=input_ids.astype(np.int32),
        token_type_ids=((position >= b_first) & (position < total)).astype(np.int32),
        attention_mask=(position < total).astype(np.int32),
    )
    if paired:
        batch["sentence_label"] = instances.label[index].astype(np.int32)
    return batch
