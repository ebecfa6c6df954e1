"""Text corpora -> documents of sentences -> token ids, prepared once as a TFDS data set (array_record).

`config.data.corpus` names the text:
  - a path, a directory (every file in it), a glob, or several of these separated by commas;
  - 'tfds:NAME' for any TFDS text data set (the text feature is `data.tfds_text_key`);
  - 'python-docs': the docstrings of the running interpreter's standard library, one document per
    module, read with `ast` (every machine with Python has it; no download, nothing copied).

`config.data.corpus_format` says how a file splits into documents and sentences:
  - 'sentences': one sentence a line, a blank line between documents (the original BERT format);
  - 'documents': one document a line;
  - 'paragraphs': hard-wrapped paragraphs separated by blank lines (Project Gutenberg books): the
    Gutenberg header and footer are removed, chapter/book/part headings start documents;
  - 'wikitext': ` = Title = ` lines start articles, one paragraph a line, ` = = Heading = = ` dropped;
  - 'auto' (default) decides per file: Gutenberg markers -> paragraphs; ` = Title = ` lines -> wikitext;
    no blank line at all -> documents; blank lines and most lines ending a sentence -> sentences;
    otherwise paragraphs. The choice is logged.
Paragraphs and one-line documents are split into sentences at sentence-final punctuation.

`prepare(config, tokenizer)` tokenizes every document once and stores it (token ids and sentence
lengths) as a TFDS data set under `cache_root(config)/corpora/KEY`, KEY hashing the corpus files
(names, sizes, modification times), the format, the eval split and the tokenizer file; a second run
reads the stored set (and says so). Evaluation documents are `data.eval_corpus`, or the
`data.eval_fraction` of the documents whose text hashes lowest (a choice that does not depend on
the order or number of files).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import sysconfig
import tempfile
from typing import Iterator

import numpy as np
import tqdm

from bertjax.errors import UserError

FORMATS = ("auto", "sentences", "documents", "paragraphs", "wikitext")
PYTHON_DOCS = "python-docs"
PREPARED_VERSION = "1.0.0"

log = logging.getLogger(__name__)

Document = list  # of sentences (str)

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Mt|vs|etc|e\.g|i\.e|cf|No|Vol|Fig)\.[\"')\]]*$", re.IGNORECASE)
_HEADING = re.compile(r"^(CHAPTER|Chapter|BOOK|Book|PART|Part|VOLUME|Volume|SECTION|Section|EPILOGUE|Epilogue)\b.{0,80}$|^[IVXLC]+\.?$")
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")
_WIKITEXT_HEADING = re.compile(r"^ = = .* = = $")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE)
_GUTENBERG_END_LINE = re.compile(r"^End of (the )?Project Gutenberg", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE)


class CorpusError(UserError, ValueError):
    """Corpus input that cannot be used; the message names the file (and line) or the config key."""


def read_text(path) -> str:
    """A file's text: UTF-8 (BOM dropped), line ends normalised; other bytes replaced, counted and logged."""
    raw = pathlib.Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        text = raw.decode("utf-8-sig", errors="replace")
        replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
        log.warning("%s is not valid UTF-8 (first bad byte at offset %d): replaced %d undecodable byte sequence(s) with U+FFFD", path, error.start, replaced)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph (lines joined), split after . ! ? before a capital, digit or quote."""
    paragraph = " ".join(paragraph.split())
    if not paragraph:
        return []
    sentences: list[str] = []
    for piece in _SENTENCE_END.split(paragraph):
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return sentences


def _blocks(text: str) -> list[list[str]]:
    """Runs of non-blank lines."""
    blocks, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def detect_format(text: str) -> str:
    head = text[: 1 << 18]
    if _GUTENBERG_START.search(head):
        return "paragraphs"
    lines = head.strip("\n").split("\n")
    if any(_WIKITEXT_TITLE.match(line) for line in lines):
        return "wikitext"
    non_blank = [line.rstrip() for line in lines if line.strip()]
    if len(non_blank) == len(lines):
        return "documents"
    ending = sum(line.endswith((".", "!", "?", '"', "'", "\u201d", ")")) for line in non_blank)
    return "sentences" if ending >= 0.6 * max(len(non_blank), 1) else "paragraphs"


def _sentences_format(text: str, name: str) -> list[Document]:
    blocks = _blocks(text)
    if len(blocks) == 1 and len(blocks[0]) > 1:
        log.warning(
            "%s has no blank line between documents: read as ONE document of %d sentences "
            "(set data.corpus_format=documents if each line is a document)",
            name,
            len(blocks[0]),
        )
    return [[line.strip() for line in block] for block in blocks]


def _documents_format(text: str, name: str) -> list[Document]:
    return [split_sentences(line) for line in text.split("\n") if line.strip()]


def _paragraphs_format(text: str, name: str) -> list[Document]:
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start:
        text = text[start.end() : end.start() if end and end.start() > start.end() else len(text)]
        log.info("%s: removed the Project Gutenberg header%s", name, " and footer" if end else "")
    documents: list[Document] = [[]]
    for block in _blocks(text):
        # A heading is a short block (its title may take a second line) starting with a heading word.
        if len(block) <= 2 and _HEADING.match(block[0].strip()):
            documents.append([])
            continue
        if _GUTENBERG_END_LINE.match(block[0]):
            continue
        documents[-1].extend(split_sentences(" ".join(block)))
    return [document for document in documents if document]


def _wikitext_format(text: str, name: str) -> list[Document]:
    documents: list[Document] = [[]]
    for line in text.split("\n"):
        if _WIKITEXT_TITLE.match(line):
            documents.append([])
        elif line.strip() and not _WIKITEXT_HEADING.match(line):
            documents[-1].extend(split_sentences(line))
    return [document for document in documents if document]


_READERS = {
    "sentences": _sentences_format,
    "documents": _documents_format,
    "paragraphs": _paragraphs_format,
    "wikitext": _wikitext_format,
}


def parse(text: str, corpus_format: str, name: str = "<text>") -> list[Document]:
    """Documents (lists of sentences) of one file's text in `corpus_format` ('auto' detects it)."""
    if corpus_format not in FORMATS:
        raise CorpusError(f"config.data.corpus_format={corpus_format!r}: choose one of {FORMATS}")
    if corpus_format == "auto":
        corpus_format = detect_format(text)
        log.info("%s: read as corpus_format=%s (auto)", name, corpus_format)
    return _READERS[corpus_format](text, name)


def _docstring_paragraphs(docstring: str) -> Iterator[str]:
    for block in _blocks(docstring):
        # Doctests, option tables and code samples are not prose.
        if block[0].lstrip().startswith((">>>", "...", "$", "-", "=", "+", "|", ":")) or block[0].startswith((" ", "\t")):
            continue
        yield " ".join(line.strip() for line in block)


def _python_docs_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    return sorted(path for path in root.rglob("*.py") if not skip & set(path.relative_to(root).parts))


def _python_docs_document(path: pathlib.Path) -> Document:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return []
    sentences: Document = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring:
                for paragraph in _docstring_paragraphs(docstring):
                    sentences.extend(split_sentences(paragraph))
    return sentences


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One corpus spec resolved to its files (or a TFDS name), readable as documents."""

    spec: str
    corpus_format: str = "auto"
    tfds_text_key: str = "text"
    tfds_data_dir: str = ""

    @classmethod
    def from_config(cls, config, spec: str | None = None) -> "Corpus":
        data = config.data
        return cls(data.corpus if spec is None else spec, data.corpus_format, data.tfds_text_key, data.get("tfds_data_dir", ""))

    @property
    def description(self) -> str:
        return f"corpus {self.spec!r}"

    def files(self) -> list[pathlib.Path]:
        if not self.spec.strip():
            raise CorpusError("config.data.corpus is empty: give a path, a glob, 'tfds:NAME' or 'python-docs'")
        if self.spec == PYTHON_DOCS:
            return _python_docs_files()
        if self.spec.startswith("tfds:"):
            return []
        files: list[pathlib.Path] = []
        for pattern in (part.strip() for part in self.spec.split(",") if part.strip()):
            path = pathlib.Path(pattern).expanduser()
            if path.is_dir():
                matches = sorted(p for p in path.rglob("*") if p.is_file())
            else:
                matches = sorted(pathlib.Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
            if not matches:
                raise CorpusError(f"config.data.corpus: {pattern!r} matches no file")
            files.extend(matches)
        return files

    def fingerprint(self) -> list:
        """What identifies the text: file names, sizes and modification times (or the TFDS name)."""
        if self.spec.startswith("tfds:"):
            return [self.spec, self.tfds_text_key]
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files()]
        return [self.spec if self.spec == PYTHON_DOCS else "files", self.corpus_format, sys.version if self.spec == PYTHON_DOCS else "", stats]

    def documents(self) -> list[Document]:
        """Every non-empty document, in a fixed order; raises CorpusError when there is none.

        Local text is read once per process (training a tokenizer and preparing the token cache both
        need it); the key includes the files' sizes and modification times.
        """
        if self.spec.startswith("tfds:"):
            documents = [d for d in self._documents() if d]
        else:
            documents = _cached_documents(self, json.dumps(self.fingerprint()))
        if not documents:
            raise CorpusError(f"{self.description} holds no text (empty files?)")
        return documents

    def _documents(self) -> Iterator[Document]:
        if self.spec.startswith("tfds:"):
            yield from self._tfds_documents(self.spec[len("tfds:") :])
            return
        files = self.files()
        progress = tqdm.tqdm(files, desc=f"reading {self.description}", unit=" files", mininterval=2, disable=len(files) < 20)
        for path in progress:
            if self.spec == PYTHON_DOCS:
                yield _python_docs_document(path)
            else:
                yield from parse(read_text(path), self.corpus_format, str(path))

    def _tfds_documents(self, name: str) -> Iterator[Document]:
        import tensorflow_datasets as tfds

        source = tfds.data_source(name, split="train", data_dir=self.tfds_data_dir or None)
        for index in tqdm.trange(len(source), desc=f"reading tfds:{name}", unit=" docs", mininterval=2):
            record = source[index]
            if self.tfds_text_key not in record:
                raise CorpusError(f"tfds:{name} has no feature {self.tfds_text_key!r} (config.data.tfds_text_key); it has {sorted(record)}")
            text = record[self.tfds_text_key]
            text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
            yield [sentence for line in text.split("\n") for sentence in split_sentences(line)]

    def sentences(self) -> Iterator[str]:
        for document in self.documents():
            yield from document


@functools.lru_cache(maxsize=4)
def _cached_documents(corpus: Corpus, fingerprint: str) -> list[Document]:
    return [document for document in corpus._documents() if document]


def cache_root(config) -> pathlib.Path:
    """`data.data_dir`, else $BERTJAX_DATA_DIR, else ~/.cache/bertjax."""
    root = config.data.data_dir or os.environ.get("BERTJAX_DATA_DIR") or pathlib.Path.home() / ".cache" / "bertjax"
    return pathlib.Path(root).expanduser()


@dataclasses.dataclass(frozen=True)
class TokenizedDocuments:
    """Documents as flat arrays: tokens[sentence_offsets[s]:sentence_offsets[s+1]] is sentence s;
    sentences document_offsets[d]:document_offsets[d+1] make document d."""

    tokens: np.ndarray  # int32 [num_tokens]
    sentence_offsets: np.ndarray  # int64 [num_sentences + 1]
    document_offsets: np.ndarray  # int64 [num_documents + 1]

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1

    @property
    def sentence_lengths(self) -> np.ndarray:
        return np.diff(self.sentence_offsets)

    @classmethod
    def from_records(cls, records: list[tuple[np.ndarray, np.ndarray]]) -> "TokenizedDocuments":
        """From (tokens, sentence_lengths) per document."""
        tokens = np.concatenate([r[0] for r in records]).astype(np.int32) if records else np.zeros(0, np.int32)
        lengths = np.concatenate([r[1] for r in records]).astype(np.int64) if records else np.zeros(0, np.int64)
        sentences_per_document = np.array([len(r[1]) for r in records], np.int64)
        return cls(
            tokens=tokens,
            sentence_offsets=np.concatenate([[0], np.cumsum(lengths)]),
            document_offsets=np.concatenate([[0], np.cumsum(sentences_per_document)]),
        )


def tokenize_documents(documents: list[Document], tokenizer, description: str = "documents") -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, sentence_lengths) of each document; sentences with no tokens are left out (they hold no text)."""
    records = []
    chunk = 512
    with tqdm.tqdm(total=len(documents), desc=f"tokenizing {description}", unit=" docs", mininterval=2) as progress:
        for begin in range(0, len(documents), chunk):
            batch = documents[begin : begin + chunk]
            ids = tokenizer.encode_many([sentence for document in batch for sentence in document])
            cursor = 0
            for document in batch:
                pieces = [piece for piece in ids[cursor : cursor + len(document)] if piece]
                cursor += len(document)
                if pieces:
                    records.append((np.concatenate(pieces).astype(np.int32), np.array([len(p) for p in pieces], np.int32)))
            progress.update(len(batch))
    return records


def _eval_choice(documents: list[Document], fraction: float) -> np.ndarray:
    """Which documents are held out: the `fraction` whose text hashes lowest.

    At least two when the corpus has four or more documents, so that NSP's random segments in the eval
    split can come from another document (with one, every eval pair would be a real continuation).
    """
    if fraction <= 0 or len(documents) < 2:
        return np.zeros(len(documents), np.bool_)
    digests = np.array([int.from_bytes(hashlib.sha1("\n".join(d).encode()).digest()[:8], "little") for d in documents], np.uint64)
    at_least = 2 if len(documents) >= 4 else 1
    count = min(max(at_least, int(round(fraction * len(documents)))), len(documents) - 1)
    chosen = np.zeros(len(documents), np.bool_)
    chosen[np.argsort(digests, kind="stable")[:count]] = True
    return chosen


def _builder_class():
    import tensorflow_datasets as tfds

    class BertjaxTokenizedCorpus(tfds.core.GeneratorBasedBuilder):
        """Documents as token ids and sentence lengths (built by bertjax.data.corpus.prepare)."""

        VERSION = tfds.core.Version(PREPARED_VERSION)

        # TFDS looks for checksum files beside a builder's source; this one downloads nothing, and
        # resolving its module's path fails for some installs (editable, namespace packages).
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def __init__(self, *, splits=None, **kwargs):
            self._records_by_split = splits or {}
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Tokenized pretraining documents: flat token ids and the length of each sentence.",
                # Keep the corpus order: documents stay where the user put them (and tests can find them).
                disable_shuffling=True,
                features=tfds.features.FeaturesDict(
                    {
                        "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                        "sentence_lengths": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(records) for name, records in self._records_by_split.items()}

        def _generate_examples(self, records):
            for index, (tokens, lengths) in enumerate(records):
                yield index, {"tokens": tokens, "sentence_lengths": lengths}

    return BertjaxTokenizedCorpus


_BUILDER = None


def _builder(data_dir, splits=None):
    global _BUILDER
    if _BUILDER is None:
        _BUILDER = _builder_class()
    return _BUILDER(data_dir=str(data_dir), splits=splits, file_format="array_record")


def prepare(config, tokenizer) -> dict[str, TokenizedDocuments]:
    """The 'train' and 'eval' documents of `config.data` as token ids, built once and cached."""
    data = config.data
    train_corpus = Corpus.from_config(config)
    eval_corpus = Corpus.from_config(config, data.eval_corpus) if data.eval_corpus else None
    tokenizer_digest = hashlib.sha256(pathlib.Path(tokenizer.path).read_bytes()).hexdigest()
    key_parts = [
        PREPARED_VERSION,
        train_corpus.fingerprint(),
        eval_corpus.fingerprint() if eval_corpus else data.eval_fraction,
        tokenizer_digest,
    ]
    key = hashlib.sha256(json.dumps(key_parts, default=str).encode()).hexdigest()[:16]
    directory = cache_root(config) / "corpora" / key
    if (directory / "done").exists():
        log.info("reusing the prepared %s in %s", train_corpus.description, directory)
    else:
        _build(directory, train_corpus, eval_corpus, data.eval_fraction, tokenizer)
    builder = _builder(directory)
    return {split: _read_split(builder, split) for split in ("train", "eval")}


def _build(directory: pathlib.Path, train_corpus: Corpus, eval_corpus: Corpus | None, eval_fraction: float, tokenizer) -> None:
    documents = train_corpus.documents()
    if eval_corpus is None:
        held_out = _eval_choice(documents, eval_fraction)
        train_documents = [d for d, h in zip(documents, held_out) if not h]
        eval_documents = [d for d, h in zip(documents, held_out) if h]
    else:
        train_documents, eval_documents = documents, eval_corpus.documents()
    splits = {
        "train": tokenize_documents(train_documents, tokenizer, f"{train_corpus.description} (train)"),
        "eval": tokenize_documents(eval_documents, tokenizer, "eval documents"),
    }
    if not splits["train"]:
        raise CorpusError(f"{train_corpus.description}: no document has any token")
    log.info(
        "preparing %s: %d train documents (%d tokens), %d eval documents (%d tokens)",
        train_corpus.description,
        len(splits["train"]),
        sum(len(t) for t, _ in splits["train"]),
        len(splits["eval"]),
        sum(len(t) for t, _ in splits["eval"]),
    )
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        _builder(scratch, {name: records for name, records in splits.items() if records}).download_and_prepare()
        (scratch / "done").write_text(json.dumps({name: len(records) for name, records in splits.items()}))
        if directory.exists() and not (directory / "done").exists():
            shutil.rmtree(directory)  # left by an interrupted run of an older version
        publish(scratch, directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish(scratch, directory: pathlib.Path) -> None:
    """Move a finished scratch directory into place; when another process got there first, keep theirs."""
    try:
        os.replace(scratch, directory)
    except OSError:
        if not directory.exists():
            raise
        log.info("%s was prepared by another process meanwhile; using that", directory)


def _read_split(builder, split: str) -> TokenizedDocuments:
    if split not in builder.info.splits:
        return TokenizedDocuments.from_records([])
    source = builder.as_data_source(split)
    records = []
    step = 1024
    for begin in range(0, len(source), step):
        for record in source.__getitems__(range(begin, min(begin + step, len(source)))):
            records.append((record["tokens"], record["sentence_lengths"]))
    return TokenizedDocuments.from_records(records)
