"""Downstream task data: readers for the standard files, labels, and encoding into model features.

Readers (each record remembers `where` it came from, "file:line", for error messages):
  read_tsv      GLUE-style TSV (single sentences or pairs; columns by header name or index)
  read_conll    CoNLL-2003 style: `word ... tag` per line, blank line between sentences, -DOCSTART- skipped
  read_conllu   CoNLL-U (Universal Dependencies): one column of tags; multiword (1-2) and empty (1.1) nodes skipped
  read_squad    SQuAD v1.1/v2.0 JSON (also XQuAD); answers whose offset does not match their text are counted
  read_tfds     'tfds:NAME[:SPLIT]' through tfds.data_source (needs the data set prepared or reachable)

Every file is read the same way (`read_lines`): UTF-8 with or without a BOM, any line ends (CRLF and
CR become LF); bytes that are not UTF-8 (a Latin-1 file) are replaced by U+FFFD, counted and logged;
an empty or binary file is an error. A bad row, column or label is a TaskDataError naming the file,
the line and the config key to change.

Encoders turn records into dicts of fixed-shape numpy arrays the fine-tuning step takes:
  input_ids, token_type_ids, attention_mask [N, S] int32, plus
  label [N] (int32 class id, float32 for regression), or
  tag_ids [N, S] (tag id on the first piece of each word, -1 elsewhere), or
  start_position, end_position [N] (0 = [CLS], "no answer in this window").
Question generation (family seq2seq, `encode_question_generation`) turns a SQuAD record around: the
answer and its passage are the source, the question the target; `split_by_passage` splits one SQuAD
file into parts that share no passage.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import re
from collections.abc import Iterable, Sequence

import numpy as np
import tqdm

from bertjax.errors import UserError

log = logging.getLogger(__name__)


class TaskDataError(UserError, ValueError):
    """Unusable task data; the message names the file and line (or key)."""


@dataclasses.dataclass(frozen=True)
class TextExample:
    texts: tuple[str, ...]  # one text, or the two of a pair
    label: str | None
    where: str


@dataclasses.dataclass(frozen=True)
class TaggedSentence:
    words: tuple[str, ...]
    tags: tuple[str, ...] | None
    where: str


@dataclasses.dataclass(frozen=True)
class QAExample:
    qid: str
    question: str
    context: str
    answers: tuple[str, ...]  # empty: unanswerable (SQuAD v2.0)
    answer_starts: tuple[int, ...]  # character offsets of `answers` in `context`; -1 where the file's offset was wrong
    where: str


# ---------------------------------------------------------------------------------------------
# Readers


def read_lines(path) -> list[str]:
    """The lines of a text file, without line ends (see the module docstring for what is repaired and what refused)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise TaskDataError(f"{path} is a directory: give a file (it holds {sorted(p.name for p in path.iterdir())[:5]})")
    raw = path.read_bytes()
    if not raw.strip():
        raise TaskDataError(f"{path} is empty")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TaskDataError(f"{path} is UTF-16: re-save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)")
    nul = raw.find(b"\x00", 0, 65536)
    if nul >= 0:
        raise TaskDataError(f"{path} is not a text file (a NUL byte at offset {nul}): give a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        text = raw.decode("utf-8-sig", errors="replace")
        replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
        log.warning(
            "%s:%d: not UTF-8; replaced %d undecodable byte sequence(s) with U+FFFD (a Latin-1 file? re-save it as UTF-8: iconv -f latin1 -t utf-8)",
            path,
            raw.count(b"\n", 0, error.start) + 1,
            replaced,
        )
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _column_index(column, header: list[str] | None, path, key: str, first_line: str) -> int:
    if isinstance(column, int):
        return column
    if isinstance(column, str) and column.lstrip("-").isdigit():
        return int(column)
    if header is None:
        raise TaskDataError(
            f"{path}: column {column!r} (config data.{key}) is a name but data.header=false; give a 0-based column index "
            f"(line 1 has {len(first_line.split(chr(9)))} fields: {first_line[:80]!r})"
        )
    if column not in header:
        raise TaskDataError(
            f"{path}:1: no column {column!r} (config data.{key}); the header line has {header}: "
            f"set --config.data.{key} to one of them, or, if that line is data, --config.data.header=false and column indices"
        )
    return header.index(column)


def read_tsv(path, text_a, text_b=None, label=None, header: bool = True) -> list[TextExample]:
    """Rows of a tab-separated file; columns are header names or 0-based indices.

    GLUE files are read without quote handling (a `"` is text), as GLUE's own readers do.
    """
    path = pathlib.Path(path)
    lines = read_lines(path)
    header_fields = lines[0].split("\t") if header else None
    columns = [_column_index(text_a, header_fields, path, "text_a", lines[0])]
    if text_b not in (None, ""):
        columns.append(_column_index(text_b, header_fields, path, "text_b", lines[0]))
    label_column = _column_index(label, header_fields, path, "label", lines[0]) if label not in (None, "") else None
    configured = ", ".join(f"data.{key}={value!r}" for key, value in (("text_a", text_a), ("text_b", text_b), ("label", label)) if value not in (None, ""))
    needed = max(columns + ([label_column] if label_column is not None else [])) + 1
    examples = []
    for line_number, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < needed:
            is_header = " (if it is a header line, set --config.data.header=true and name the columns)" if line_number == 1 else ""
            raise TaskDataError(f"{path}:{line_number}: {len(fields)} tab-separated field(s), but {configured} need at least {needed}: {line[:80]!r}{is_header}")
        examples.append(
            TextExample(
                texts=tuple(fields[column].strip() for column in columns),
                label=fields[label_column].strip() if label_column is not None else None,
                where=f"{path}:{line_number}",
            )
        )
    return examples


def _read_blocks(path, is_comment) -> Iterable[tuple[int, list[tuple[int, list[str]]]]]:
    """(first line number, [(line number, whitespace fields)]) for each blank-line separated block."""
    block, start = [], None
    for line_number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            if block:
                yield start, block
            block, start = [], None
            continue
        if is_comment(line):
            continue
        start = start or line_number
        block.append((line_number, line.split("\t") if "\t" in line else line.split()))
    if block:
        yield start, block


def read_conll(path, word_column: int = 0, tag_column: int = -1) -> list[TaggedSentence]:
    """CoNLL-2003 style columns (`EU NNP B-NP B-ORG`); -DOCSTART- lines are document markers, skipped.

    Every line has as many columns as the file's first word line: a line with fewer or more (a word
    with a space in it, a missing tag) would shift the tag column, so it is an error naming the line.
    """
    path = pathlib.Path(path)
    sentences, first = [], None
    for start, block in _read_blocks(path, lambda line: line.startswith("-DOCSTART-")):
        words, tags = [], []
        for line_number, fields in block:
            if len(fields) < 2 or len(fields) <= max(word_column, tag_column if tag_column >= 0 else -tag_column - 1):
                raise TaskDataError(f"{path}:{line_number}: expected a word and a tag column (config data.label={tag_column}), got {fields!r}")
            first = first or (line_number, len(fields))
            if len(fields) != first[1]:
                raise TaskDataError(
                    f"{path}:{line_number}: {len(fields)} columns {fields!r}, but line {first[0]} (the first word line) has {first[1]}; "
                    "every word line needs the same columns"
                )
            words.append(fields[word_column])
            tags.append(fields[tag_column])
        sentences.append(TaggedSentence(tuple(words), tuple(tags), f"{path}:{start}"))
    return sentences


_CONLLU_WORD_ID = re.compile(r"^\d+$")
_CONLLU_SKIPPED_ID = re.compile(r"^\d+(-\d+|\.\d+)$")


def read_conllu(path, tag_column: int = 3) -> list[TaggedSentence]:
    """CoNLL-U sentences with the tag in `tag_column` (3 = UPOS, 4 = XPOS).

    Multiword-token lines (`1-2 didn't`) and empty nodes (`8.1`) are not words of the tagged
    sequence: the syntactic words that follow (or precede) them are, as in UD's own scoring.
    """
    path = pathlib.Path(path)
    sentences = []
    for start, block in _read_blocks(path, lambda line: line.startswith("#")):
        words, tags = [], []
        for line_number, fields in block:
            if len(fields) != 10:
                raise TaskDataError(f"{path}:{line_number}: a CoNLL-U line has 10 tab-separated fields, this one {len(fields)}")
            if _CONLLU_SKIPPED_ID.match(fields[0]):
                continue
            if not _CONLLU_WORD_ID.match(fields[0]):
                raise TaskDataError(f"{path}:{line_number}: bad word id {fields[0]!r}")
            words.append(fields[1])
            tags.append(fields[tag_column])
        sentences.append(TaggedSentence(tuple(words), tuple(tags), f"{path}:{start}"))
    return sentences


def _nearest(context: str, text: str, offset: int) -> int:
    """The start of the occurrence of `text` in `context` nearest to `offset`; -1 if there is none."""
    starts, start = [], context.find(text)
    while start >= 0:
        starts.append(start)
        start = context.find(text, start + 1)
    return min(starts, key=lambda s: (abs(s - offset), s)) if starts else -1


def read_squad(path) -> list[QAExample]:
    """Every question of a SQuAD v1.1/v2.0 JSON file.

    An answer whose `answer_start` does not point at its text is repaired: it moves to the occurrence
    of its text nearest the given offset. An answer whose text is not in its passage at all is kept
    for scoring (scoring uses the text only) with answer_starts -1, so training skips it. Both are
    counted and logged.
    """
    path = pathlib.Path(path)
    text = "\n".join(read_lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TaskDataError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}); is the file truncated?") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise TaskDataError(f'{path}: not a SQuAD file: expected {{"data": [{{"paragraphs": [{{"context": ..., "qas": [...]}}]}}]}}')
    examples, moved, missing = [], [], []
    where = f"{path}: data"
    try:
        for article_number, article in enumerate(data["data"]):
            where = f"{path}: data[{article_number}]"
            for paragraph_number, paragraph in enumerate(article.get("paragraphs", [])):
                where = f"{path}: data[{article_number}].paragraphs[{paragraph_number}]"
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    where = f"{path}: data[{article_number}].paragraphs[{paragraph_number}] question {qa.get('id')!r}"
                    texts, starts = [], []
                    for answer in [] if qa.get("is_impossible") else qa.get("answers", []):
                        answer_text, given = answer["text"], int(answer["answer_start"])
                        answer_start = given
                        if context[given : given + len(answer_text)] != answer_text:
                            answer_start = _nearest(context, answer_text, given)
                            (moved if answer_start >= 0 else missing).append(f"{where} (answer_start {given}, text {answer_text!r})")
                        texts.append(answer_text)
                        starts.append(answer_start)
                    examples.append(QAExample(str(qa["id"]), qa["question"], context, tuple(texts), tuple(starts), where))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        detail = f"no key {error}" if isinstance(error, KeyError) else str(error)
        raise TaskDataError(
            f"{where}: not SQuAD ({detail}); articles hold 'paragraphs' of 'context' and 'qas', each with 'id', 'question' and 'answers' [{{'text', 'answer_start'}}]"
        ) from None
    if moved:
        log.warning("%s: %d answers' answer_start did not point at their text: moved to the nearest occurrence of the text; first: %s", path, len(moved), moved[0])
    if missing:
        log.warning("%s: %d answers' text does not occur in their passage: kept for scoring, not trained on; first: %s", path, len(missing), missing[0])
    return examples


def read_tfds(spec: str, family: str, default_split: str, fields) -> list:
    """Records of 'tfds:NAME[:SPLIT]' (e.g. tfds:glue/sst2) via tfds.data_source; `fields` maps our names to TFDS features."""
    import tensorflow_datasets as tfds

    name, _, split = spec.removeprefix("tfds:").partition(":")
    split = split or default_split
    source = tfds.data_source(name, split=split)
    features = source.dataset_info.features
    label_feature = features[fields.label] if fields.label and fields.label in features else None

    def label_name(value):
        return label_feature.int2str(int(value)) if hasattr(label_feature, "int2str") else str(value)

    def text(value):
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    records = []
    for index in range(len(source)):
        record, where = source[index], f"{spec}[{index}]"
        if family == "span":
            answers = record["answers"]
            records.append(
                QAExample(
                    text(record["id"]),
                    text(record["question"]),
                    text(record["context"]),
                    tuple(text(answer) for answer in answers["text"]),
                    tuple(int(start) for start in answers["answer_start"]),
                    where,
                )
            )
        elif family == "tagging":
            tag_feature = features[fields.label].feature
            records.append(
                TaggedSentence(tuple(text(word) for word in record[fields.text_a]), tuple(tag_feature.int2str(int(t)) for t in record[fields.label]), where)
            )
        else:
            names = [fields.text_a] + ([fields.text_b] if fields.text_b else [])
            records.append(TextExample(tuple(text(record[n]) for n in names), label_name(record[fields.label]), where))
    return records


READERS = ("tsv", "conll", "conllu", "squad")


def read(source: str, data_config, family: str, default_split: str) -> list:
    """The records of a task file (by data_config.format) or of 'tfds:NAME[:SPLIT]'; never none."""
    key = "data.train" if default_split == "train" else "data.dev"
    if not source:
        raise TaskDataError(f"config {key} is empty: give a task file (--config.{key}=PATH) or tfds:NAME[:SPLIT]")
    if source.startswith("tfds:"):
        records = read_tfds(source, family, default_split, data_config)
    else:
        if not pathlib.Path(source).exists():
            shared = "" if os.environ.get("BERTJAX_SHARED_DATA") else "; the shipped configs look for the shared data sets in $BERTJAX_SHARED_DATA, unset: ../shared/data"
            raise TaskDataError(f"task data file {source} does not exist (config {key}): give --config.{key}=PATH{shared}")
        data_format = data_config.format
        if data_format not in READERS:
            raise TaskDataError(f"config data.format={data_format!r}: choose one of {READERS}")
        if data_format in ("conll", "conllu") and not str(data_config.label).lstrip("-").isdigit():
            raise TaskDataError(f"config data.label={data_config.label!r}: for data.format={data_format} it is the tag column's index, e.g. -1 or 3")
        if data_format == "conllu" and not -10 <= int(data_config.label) < 10:
            raise TaskDataError(f"config data.label={data_config.label!r}: a CoNLL-U file has 10 columns (3 = UPOS, 4 = XPOS)")
        if data_format == "tsv":
            records = read_tsv(source, data_config.text_a, data_config.text_b, data_config.label, data_config.header)
        elif data_format == "conll":
            records = read_conll(source, tag_column=int(data_config.label))
        elif data_format == "conllu":
            records = read_conllu(source, tag_column=int(data_config.label))
        else:
            records = read_squad(source)
    if not records:
        raise TaskDataError(f"{source} (config {key}) holds no examples")
    return records


# ---------------------------------------------------------------------------------------------
# Labels


def _label_sort_key(label: str):
    # Numeric labels sort by value ("2" before "10"), others alphabetically; numbers first.
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


class Labels:
    """The label vocabulary: id order is the declared order, else sorted; saved as labels.json with a run."""

    def __init__(self, names: Sequence[str], declared: bool = False):
        self.names = list(names)
        self.declared = declared  # from config.task.labels, not from the training data
        self._ids = {name: index for index, name in enumerate(self.names)}

    @classmethod
    def from_records(cls, labels: Iterable[str], declared: Sequence[str] = ()) -> Labels:
        return cls(list(declared), declared=True) if declared else cls(sorted(set(labels), key=_label_sort_key))

    def encode(self, label: str, where: str) -> int:
        if label not in self._ids:
            if self.declared:
                raise TaskDataError(f"{where}: label {label!r} is not one of config.task.labels {self.names}: fix the file or add it to task.labels")
            raise TaskDataError(
                f"{where}: label {label!r} does not occur in the training data (data.train has {self.names}): "
                "fix the label, check that data.label names the label column, or declare every label with --config.task.labels"
            )
        return self._ids[label]

    def get(self, label: str) -> int:
        """The label's id, -1 for a label the vocabulary lacks."""
        return self._ids.get(label, -1)

    def __len__(self) -> int:
        return len(self.names)

    def save(self, path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.names, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path) -> Labels:
        return cls(json.loads(pathlib.Path(path).read_text(encoding="utf-8")))


def record_labels(records: Sequence) -> list[str]:
    """Every label string in the records (one per example, or one per word for tagging)."""
    if records and isinstance(records[0], TaggedSentence):
        return [tag for sentence in records for tag in sentence.tags]
    return [example.label for example in records]


# ---------------------------------------------------------------------------------------------
# Encoding


def _pack(tokenizer, segments: Sequence[Sequence[int]], max_seq_length: int) -> tuple[list[int], list[int]]:
    """[CLS] a [SEP] (b [SEP]): ids and segment ids."""
    ids, types = [tokenizer.cls_id], [0]
    for segment_index, segment in enumerate(segments):
        ids += list(segment) + [tokenizer.sep_id]
        types += [segment_index] * (len(segment) + 1)
    assert len(ids) <= max_seq_length
    return ids, types


def _truncate_longest_first(segments: list[list[int]], budget: int) -> list[list[int]]:
    segments = [list(segment) for segment in segments]
    while sum(map(len, segments)) > budget:
        longest = max(range(len(segments)), key=lambda i: len(segments[i]))
        segments[longest].pop()
    return segments


def _to_arrays(rows: list[tuple[list[int], list[int]]], max_seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    count = len(rows)
    input_ids = np.full((count, max_seq_length), pad_id, dtype=np.int32)
    token_type_ids = np.zeros((count, max_seq_length), dtype=np.int32)
    attention_mask = np.zeros((count, max_seq_length), dtype=np.int32)
    for row, (ids, types) in enumerate(rows):
        input_ids[row, : len(ids)] = ids
        token_type_ids[row, : len(types)] = types
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


def encode_texts(tokenizer, texts: Sequence[Sequence[str]], max_seq_length: int) -> dict[str, np.ndarray]:
    """One text or a pair per example -> [CLS] a [SEP] b [SEP], longest text truncated first."""
    columns = [tokenizer.encode_many(column) for column in zip(*texts)]
    rows = []
    for segments in zip(*columns):
        segments = _truncate_longest_first(segments, max_seq_length - 1 - len(segments))
        rows.append(_pack(tokenizer, segments, max_seq_length))
    return _to_arrays(rows, max_seq_length, tokenizer.pad_id)


def encode_classification(tokenizer, examples: Sequence[TextExample], max_seq_length: int, labels: Labels | None) -> dict[str, np.ndarray]:
    """Features with `label`: the class id, or the float score when `labels` is None (regression)."""
    features = encode_texts(tokenizer, [example.texts for example in examples], max_seq_length)
    if labels is None:
        try:
            features["label"] = np.array([float(example.label) for example in examples], dtype=np.float32)
        except ValueError:
            bad = next(example for example in examples if not _is_number(example.label))
            raise TaskDataError(f"{bad.where}: regression label {bad.label!r} is not a number") from None
    else:
        features["label"] = np.array([labels.encode(example.label, example.where) for example in examples], dtype=np.int32)
    return features


def _is_number(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _word_pieces(tokenizer, words: Sequence[str]) -> list[list[int]]:
    # A word that encodes to nothing (e.g. a control character) still needs a position to carry its tag.
    return [pieces or [tokenizer.unk_id] for pieces in tokenizer.encode_many(words)]


def encode_tagging(tokenizer, sentences: Sequence[TaggedSentence], max_seq_length: int, labels: Labels | None) -> dict[str, np.ndarray]:
    """Each word tokenised on its own; its tag sits on its first piece (tag_ids -1 on the others).

    word_positions [N, W] gives the first-piece position of each word (-1 for words cut off by
    max_seq_length, which predictions fill with a default tag).

    A tag the label vocabulary lacks (a dev tag the training data never has, common with rare tags
    and small training sets) gets tag id -1: it stays the gold tag for scoring, where the model
    cannot predict it, and is left out of the loss. Such words are counted and logged.
    """
    all_pieces = iter(_word_pieces(tokenizer, [word for sentence in sentences for word in sentence.words]))
    rows, tag_rows, position_rows = [], [], []
    unseen, first_unseen = collections.Counter(), None
    for sentence in sentences:
        ids, tag_ids, positions = [], [], []
        sentence_pieces = [next(all_pieces) for _ in sentence.words]
        for word_index, pieces in enumerate(sentence_pieces):
            if len(ids) + len(pieces) > max_seq_length - 2:
                break
            positions.append(1 + len(ids))
            tag_id = labels.get(sentence.tags[word_index]) if labels and sentence.tags else -1
            if tag_id < 0 and labels and sentence.tags:
                unseen[sentence.tags[word_index]] += 1
                first_unseen = first_unseen or sentence.where
            tag_ids += [tag_id] + [-1] * (len(pieces) - 1)
            ids += pieces
        rows.append(_pack(tokenizer, [ids], max_seq_length))
        tag_rows.append(tag_ids)
        position_rows.append(positions)
    if unseen:
        log.warning(
            "%d words carry tags the label set %s lacks (%s; first in the sentence at %s): scored as gold (the model cannot predict them), left out of the loss",
            sum(unseen.values()),
            labels.names,
            ", ".join(f"{tag} x{count}" for tag, count in unseen.most_common()),
            first_unseen,
        )
    features = _to_arrays(rows, max_seq_length, tokenizer.pad_id)
    features["tag_ids"] = np.full((len(rows), max_seq_length), -1, dtype=np.int32)
    max_words = max([len(sentence.words) for sentence in sentences] + [1])
    features["word_positions"] = np.full((len(rows), max_words), -1, dtype=np.int32)
    for row, (tag_ids, positions) in enumerate(zip(tag_rows, position_rows)):
        features["tag_ids"][row, 1 : 1 + len(tag_ids)] = tag_ids
        features["word_positions"][row, : len(positions)] = positions
    return features


def _piece_spans(tokenizer, words: Sequence[str]) -> list[list[tuple[int, int, int]]]:
    """(piece id, first char, end char) of each piece of each word, offsets within the word.

    Sentencepiece and HuggingFace tokenizers report where each piece came from, so a predicted
    answer can start or end inside a word ("1996" in "1996-08-30"); any other tokenizer gives
    every piece its whole word's span.
    """
    processor, backend = getattr(tokenizer, "processor", None), getattr(tokenizer, "backend", None)
    spans = []
    if processor is not None:
        for word, proto in zip(words, processor.encode(list(words), return_type="proto")):
            # Sentencepiece offsets count UTF-8 bytes; map them to characters.
            char_at_byte = [index for index, char in enumerate(word) for _ in char.encode("utf-8")] + [len(word)]
            pieces = [proto.pieces[k] for k in tokenizer.kept_positions([piece.id for piece in proto.pieces])]  # as `encode` gives them
            spans.append([(piece.id, char_at_byte[piece.begin], char_at_byte[max(piece.end - 1, piece.begin)] + (piece.end > piece.begin)) for piece in pieces])
    elif backend is not None:
        for encoding in backend.encode_batch(list(words), add_special_tokens=False):
            spans.append([(piece, start, end) for piece, (start, end) in zip(encoding.ids, encoding.offsets)])
    else:
        spans = [[(piece, 0, len(word)) for piece in pieces] for word, pieces in zip(words, tokenizer.encode_many(words))]
    return [word_spans or [(tokenizer.unk_id, 0, len(word))] for word, word_spans in zip(words, spans)]


_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")


def split_words(text: str) -> list[tuple[str, int, int]]:
    """(word, first char, end char) for each whitespace-separated word; each CJK character is a word.

    Words are tokenised one by one so that each piece's characters in the passage are known.
    """
    words = []
    for match in re.finditer(r"\S+", text):
        start = match.start()
        for part in _CJK.split(match.group()):
            if part:
                words.append((part, start, start + len(part)))
                start += len(part)
    return words


def _passage_pieces(tokenizer, passage: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The passage's piece ids and each piece's (first char, end char) in the passage."""
    pieces, spans = [], []
    words = split_words(passage)
    for (_, word_start, _), word_spans in zip(words, _piece_spans(tokenizer, [word for word, _, _ in words])):
        for piece, start, end in word_spans:
            pieces.append(piece)
            spans.append((word_start + start, word_start + end))
    return pieces, spans


def _max_context(window_start: int, window_length: int, position: int) -> float:
    left, right = position - window_start, window_start + window_length - 1 - position
    return min(left, right) + 0.01 * window_length


def encode_squad(tokenizer, examples: Sequence[QAExample], max_seq_length: int, doc_stride: int, max_query_length: int) -> dict[str, np.ndarray]:
    """[CLS] question [SEP] passage window [SEP] features, several windows per long passage.

    Besides the model inputs: start_position/end_position (the first answer's first and last
    piece, 0 when the window does not contain it or the question has none), example_index [F],
    offsets [F, S, 2] (character span of each passage piece, -1 elsewhere) and max_context
    [F, S] for `bertjax.eval.squad.answers`.
    """
    rows, starts, ends, example_index, offset_rows, context_rows = [], [], [], [], [], []
    passages = {}  # SQuAD asks several questions about each passage: tokenise it once
    for index, example in enumerate(tqdm.tqdm(examples, desc="encoding QA examples", unit=" questions", mininterval=5, disable=len(examples) < 5000)):
        question = tokenizer.encode(example.question)[:max_query_length]
        if example.context not in passages:
            passages[example.context] = _passage_pieces(tokenizer, example.context)
        pieces, piece_spans = passages[example.context]
        answer_pieces = None
        if example.answers and example.answer_starts[0] >= 0:
            answer_start = example.answer_starts[0]
            answer_end = answer_start + len(example.answers[0])
            covered = [i for i, (start, end) in enumerate(piece_spans) if start < answer_end and end > answer_start]
            if covered:
                answer_pieces = (covered[0], covered[-1])
        window_length = max_seq_length - len(question) - 3
        if window_length <= 0:
            raise TaskDataError(f"{example.where}: max_seq_length={max_seq_length} leaves no room for the passage after the question")
        window_starts = [0]
        while window_starts[-1] + window_length < len(pieces):
            window_starts.append(window_starts[-1] + doc_stride)
        for window_start in window_starts:
            window = pieces[window_start : window_start + window_length]
            ids, types = _pack(tokenizer, [question, window], max_seq_length)
            first = len(question) + 2  # position of the window's first piece
            offsets = np.full((max_seq_length, 2), -1, dtype=np.int32)
            is_max_context = np.zeros(max_seq_length, dtype=bool)
            for j in range(len(window)):
                offsets[first + j] = piece_spans[window_start + j]
                position = window_start + j
                best = max(
                    (other for other in window_starts if other <= position < other + window_length),
                    key=lambda other: _max_context(other, min(window_length, len(pieces) - other), position),
                )
                is_max_context[first + j] = best == window_start
            start_position = end_position = 0
            if answer_pieces and window_start <= answer_pieces[0] and answer_pieces[1] < window_start + len(window):
                start_position, end_position = first + answer_pieces[0] - window_start, first + answer_pieces[1] - window_start
            rows.append((ids, types))
            starts.append(start_position)
            ends.append(end_position)
            example_index.append(index)
            offset_rows.append(offsets)
            context_rows.append(is_max_context)
    features = _to_arrays(rows, max_seq_length, tokenizer.pad_id)
    features["start_position"] = np.array(starts, dtype=np.int32)
    features["end_position"] = np.array(ends, dtype=np.int32)
    features["example_index"] = np.array(example_index, dtype=np.int32)
    features["offsets"] = np.stack(offset_rows) if offset_rows else np.zeros((0, max_seq_length, 2), np.int32)
    features["max_context"] = np.stack(context_rows) if context_rows else np.zeros((0, max_seq_length), bool)
    return features


# ---------------------------------------------------------------------------------------------
# Question generation (seq2seq): a passage and an answer in, the question out


def split_by_passage(examples: Sequence[QAExample], fractions: Sequence[float], seed: int) -> list[list[QAExample]]:
    """The questions grouped by passage, the passages shuffled with `seed` and cut into parts of the
    given fractions (the last part takes the rest): no passage, and so no question about it, is in two
    parts. Each part keeps file order. SQuAD asks several questions about each passage; splitting the
    questions instead would put the same passage in training and test, and a generator could learn it."""
    if not fractions or any(f <= 0 for f in fractions) or sum(fractions) >= 1:
        raise TaskDataError(f"config data.passage_split={tuple(fractions)}: give positive fractions that sum to less than 1 (the rest is the last part)")
    passages = list(dict.fromkeys(example.context for example in examples))
    order = np.random.default_rng(seed).permutation(len(passages))
    bounds = np.round(np.cumsum(fractions) * len(passages)).astype(int)
    part_of = {passages[index]: int(np.searchsorted(bounds, rank, side="right")) for rank, index in enumerate(order)}
    parts = [[] for _ in range(len(fractions) + 1)]
    for example in examples:
        parts[part_of[example.context]].append(example)
    empty = [index for index, part in enumerate(parts) if not part]
    if empty:
        raise TaskDataError(
            f"config data.passage_split={tuple(fractions)}: part {empty[0]} of the {len(passages)} passages is empty; give larger fractions or more data"
        )
    return parts


def _answer_window(left: list[int], answer: list[int], right: list[int], budget: int) -> list[int]:
    """The answer's pieces in the passage with as much context on each side as `budget` allows, split
    evenly (a side that runs out gives its share to the other)."""
    answer = answer[:budget]
    room = budget - len(answer)
    take_left = min(len(left), max(room // 2, room - len(right)))
    take_right = min(len(right), room - take_left)
    return left[len(left) - take_left :] + answer + right[:take_right]


def encode_question_generation(
    tokenizer, examples: Sequence[QAExample], max_source_length: int, max_target_length: int, max_answer_length: int, decoder_start_id: int
) -> dict[str, np.ndarray]:
    """Seq2seq features of question generation: source `[CLS] answer [SEP] passage window [SEP]`,
    target `[CLS] question [SEP]`.

    The answer comes first, cut to `max_answer_length` pieces, so that truncation never loses it; the
    passage window is centred on the answer's occurrence (its first answer's `answer_starts`), so the
    sentence it sits in survives a passage longer than the source. This is BERT's pair layout, and
    needs no new token: a highlight marker would be a piece the pretrained vocabulary lacks.

    Arrays ([N, max_source_length] and [N, max_target_length], int32) as the seq2seq pretraining
    batches have them (bertjax.data.noising.Noiser.collate): input_ids, attention_mask,
    decoder_input_ids (the target shifted right after `decoder_start_id`), decoder_attention_mask,
    labels (the target) and label_weights (1 on the target's tokens). An example without a located
    answer (answer_starts -1, or none) gets the whole passage from its start and an empty answer.
    """
    if max_source_length < 8 or max_target_length < 3:
        raise TaskDataError(f"config data.max_seq_length={max_source_length}, data.max_target_length={max_target_length}: too short for a passage or a question")
    parts = []
    for example in examples:
        located = bool(example.answers) and example.answer_starts[0] >= 0
        start = example.answer_starts[0] if located else 0
        end = start + len(example.answers[0]) if located else 0
        parts += [example.answers[0] if example.answers else "", example.context[:start], example.context[start:end], example.context[end:], example.question]
    pieces = tokenizer.encode_many(parts)
    count = len(examples)
    arrays = {"input_ids": np.full((count, max_source_length), tokenizer.pad_id, np.int32), "attention_mask": np.zeros((count, max_source_length), np.int32)}
    target = np.full((count, max_target_length), tokenizer.pad_id, np.int32)
    target_length = np.zeros(count, np.int64)
    for row in range(count):
        answer, left, in_passage, right, question = pieces[5 * row : 5 * row + 5]
        answer = answer[:max_answer_length]
        window = _answer_window(left, in_passage, right, max_source_length - 3 - len(answer))
        source = [tokenizer.cls_id, *answer, tokenizer.sep_id, *window, tokenizer.sep_id]
        arrays["input_ids"][row, : len(source)] = source
        arrays["attention_mask"][row, : len(source)] = 1
        framed = [tokenizer.cls_id, *question[: max_target_length - 2], tokenizer.sep_id]
        target[row, : len(framed)] = framed
        target_length[row] = len(framed)
    label_weights = (np.arange(max_target_length)[None, :] < target_length[:, None]).astype(np.int32)
    shifted = np.concatenate([np.full((count, 1), decoder_start_id, np.int32), target[:, :-1]], axis=1)
    arrays.update(
        decoder_input_ids=np.where(label_weights == 1, shifted, tokenizer.pad_id).astype(np.int32),
        decoder_attention_mask=label_weights,
        labels=target,
        label_weights=label_weights,
    )
    return arrays
