"""Text corpora -> documents of sentences -> token ids, prepared once as a TFDS data set (array_record).

`config.data.corpus` names the text:
  - a path, a directory (every file in it but hidden ones), a glob, or several of these separated by
    commas;
  - 'tfds:NAME' for any TFDS text data set (the text feature is `data.tfds_text_key`);
  - 'python-docs': the docstrings of the running interpreter's standard library, one document per
    module, read with `ast` (every machine with Python has it; no download, nothing copied).

`config.data.corpus_format` says how a file splits into documents and sentences:
  - 'sentences': one sentence a line, a blank line between documents (the original BERT format);
  - 'documents': one document a line;
  - 'paragraphs': hard-wrapped paragraphs separated by blank lines (Project Gutenberg books, plays,
    most plain text): each book's Gutenberg header and footer are removed (a file may hold several
    books; all are kept), chapter/book/part headings start documents;
  - 'wikitext': ` = Title = ` lines start articles, one paragraph a line, ` = = Heading = = ` dropped;
  - 'auto' (default) decides per file: Gutenberg markers -> paragraphs; ` = Title = ` lines -> wikitext;
    no blank line at all -> documents; blank lines and most lines ending a sentence -> sentences;
    otherwise paragraphs. The choice and the counts (books, documents, sentences) are logged.
Paragraphs and one-line documents are split into sentences at sentence-final punctuation.

What a file's structure does not give is repaired, counted and logged, never fatal:
  - a paragraph longer than MAX_PARAGRAPH_CHARS (a 50 MB dump on one line) is cut at whitespace
    before sentence splitting, and a sentence longer than MAX_SENTENCE_CHARS (text without
    punctuation) into pseudo-sentences, so no string is too long to tokenize or train a tokenizer on;
  - a corpus with too few documents for NSP and the eval split (a play, a book without chapter
    headings: one document) gets its long documents cut into pseudo-documents of consecutive
    sentences (`pseudo_documents`; the rule is in its docstring and the README).
Bad input is a one-line CorpusError naming it: a glob or directory without a text file, a corpus with
no text, a binary file named explicitly (binary files a directory or glob matches are skipped and
counted). Text that is not UTF-8 is read as Windows-1252/Latin-1 when it has no UTF-8 beyond ASCII,
else decoded with replacement; either way it is logged with counts.

`prepare(config, tokenizer)` tokenizes every document once and stores it (token ids and sentence
lengths) as a TFDS data set under `cache_root(config)/corpora/KEY`, KEY hashing the corpus files
(names, sizes, modification times), the format, the eval split and the tokenizer file; a second run
reads the stored set (and says so). Evaluation documents are `data.eval_corpus`, or the
`data.eval_fraction` of the documents whose text hashes lowest (a choice that does not depend on
the order or number of files).
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
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
PREPARED_VERSION = "1.1.0"
# Bumped when reading a file gives other documents or sentences; part of every cache key (tokenizer, tokens).
PARSE_VERSION = 2
# Longest paragraph given to the sentence splitter in one piece, and longest sentence kept whole (in
# characters; 5,000 CJK characters are 15 KB, under sentencepiece's 16 KB sentence limit).
MAX_PARAGRAPH_CHARS = 1 << 16
MAX_SENTENCE_CHARS = 5000
# A pseudo-document holds at least this many sentences, so that it still makes sentence pairs.
MIN_PSEUDO_DOCUMENT_SENTENCES = 8
# How much of a file's start decides whether it is text: NUL bytes, or more control bytes than this fraction.
_SNIFF_BYTES = 1 << 16
_MAX_CONTROL_FRACTION = 0.05

log = logging.getLogger(__name__)

Document = list  # of sentences (str)

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Mt|vs|etc|e\.g|i\.e|cf|No|Vol|Fig)\.[\"')\]]*$", re.IGNORECASE)
# Chinese sentences end at a run of 。！？；… (or of . ! ? ; after an ideograph, as typed in reviews) and
# the closing quotes or brackets after it; neither a space nor a capital follows. The end is never
# split from its closers.
_CJK_ENDS = "\u3002\uff01\uff1f\uff1b\u2026"
_CJK_CLOSERS = "\u201d\u2019\u300d\u300f\u300b\uff09)\"'"
_CJK_SENTENCE_END = re.compile(
    f"(?:[{_CJK_ENDS}]|(?<=[\u3400-\u9fff\uf900-\ufaff])[.!?;])[{_CJK_ENDS}.!?;]*[{_CJK_CLOSERS}]*"
    f"(?=\\s*[^\\s{_CJK_ENDS}.!?;{_CJK_CLOSERS}])"
)
_HEADING = re.compile(r"^(CHAPTER|Chapter|BOOK|Book|PART|Part|VOLUME|Volume|SECTION|Section|EPILOGUE|Epilogue)\b.{0,80}$|^[IVXLC]+\.?$")
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")
_WIKITEXT_HEADING = re.compile(r"^ = = .* = = $")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE)
_GUTENBERG_END_LINE = re.compile(r"^End of (the )?Project Gutenberg", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE)


class CorpusError(UserError, ValueError):
    """Corpus input that cannot be used; the message names the file (and line) or the config key."""


_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\v\f\r\x1b")
_NON_ASCII_TEXT = re.compile("[^\x00-\x7f\ufffd]")
_LINE_END = re.compile("\r\n?")


def binary_reason(sample: bytes) -> str | None:
    """Why a file's first bytes are not text (NUL bytes, many control bytes), or None for text."""
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None  # UTF-16 with a byte order mark
    if b"\0" in sample:
        return "it has NUL bytes"
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    if controls > _MAX_CONTROL_FRACTION * len(sample):
        return f"{controls / len(sample):.0%} of its first {len(sample):,} bytes are control characters"
    return None


def _decode_legacy(raw: bytes) -> tuple[str, str]:
    try:
        return raw.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:  # bytes cp1252 leaves undefined (0x81, 0x8d, ...): Latin-1 maps every byte
        return raw.decode("latin-1"), "Latin-1"


def read_text(path) -> str:
    """A file's text with line ends normalised to \\n; a binary file is refused with a CorpusError.

    UTF-8 (a BOM dropped) and UTF-16 with a BOM are read as such. Text that is not valid UTF-8 and
    has no UTF-8 character beyond ASCII is an 8-bit legacy file: it is read as Windows-1252 (Latin-1
    where that fails) and logged. Otherwise the bad bytes are replaced by U+FFFD, counted and logged.
    At most two copies of the file (its bytes and a string, or two strings) are held at a time.
    """
    raw = pathlib.Path(path).read_bytes()
    reason = binary_reason(raw[:_SNIFF_BYTES])
    if reason:
        raise CorpusError(f"{path} is not a text file ({reason}): remove it from config.data.corpus")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            text = raw.decode("utf-8-sig", errors="replace")
            if _NON_ASCII_TEXT.search(text):
                replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
                log.warning(
                    "%s is not valid UTF-8 (first bad byte at offset %d): replaced %d undecodable byte sequence(s) with U+FFFD",
                    path,
                    error.start,
                    replaced,
                )
            else:
                del text
                text, encoding = _decode_legacy(raw)
                log.warning(
                    "%s is not UTF-8 and has no UTF-8 character beyond ASCII: read as %s (%d non-ASCII bytes); "
                    "convert it to UTF-8 (iconv -f ENCODING -t UTF-8) if that is not its encoding",
                    path,
                    encoding,
                    len(raw.translate(None, bytes(range(128)))),
                )
    del raw
    return _LINE_END.sub("\n", text) if "\r" in text else text


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph (lines joined), split after . ! ? before a capital, digit or quote,
    and after Chinese sentence-final punctuation (。！？；…) and its closing quotes."""
    paragraph = " ".join(paragraph.split())
    if not paragraph:
        return []
    sentences: list[str] = []
    for piece in _SENTENCE_END.split(paragraph):
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return [part for sentence in sentences for part in _split_chinese(sentence)]


def _split_chinese(text: str) -> list[str]:
    cuts = [match.end() for match in _CJK_SENTENCE_END.finditer(text)]
    if not cuts:
        return [text]
    return [part for part in (text[begin:end].strip() for begin, end in zip([0, *cuts], [*cuts, len(text)])) if part]


def _lines(text: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    """The lines of text[start:end], one at a time: a large file is never held as a list of its lines."""
    end = len(text) if end is None else end
    while start < end:
        stop = text.find("\n", start, end)
        stop = end if stop < 0 else stop
        yield text[start:stop]
        start = stop + 1


def _blank(line: str) -> bool:
    return not line or line.isspace()


def _blocks(text: str, start: int = 0, end: int | None = None) -> Iterator[list[str]]:
    """Runs of non-blank lines of text[start:end]."""
    current: list[str] = []
    for line in _lines(text, start, end):
        if not _blank(line):
            current.append(line)
        elif current:
            yield current
            current = []
    if current:
        yield current


def _cut(text: str, limit: int) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters, each cut at the last space in the second half of
    its window (a hard cut where there is none, as in text written without spaces); made one at a time."""
    start = 0
    while len(text) - start > limit:
        cut = max(text.rfind(space, start + limit // 2, start + limit) for space in " \t\n")
        piece = text[start : cut if cut >= 0 else start + limit].strip()
        if piece:
            yield piece
        start = cut + 1 if cut >= 0 else start + limit
    last = text[start:].strip()
    if last:
        yield last


def _cut_sentence(sentence: str, counts: collections.Counter) -> list[str]:
    """A sentence, or pseudo-sentences of at most MAX_SENTENCE_CHARS where it is longer (counted)."""
    if len(sentence) <= MAX_SENTENCE_CHARS:
        return [sentence]
    pieces = list(_cut(sentence, MAX_SENTENCE_CHARS))
    counts["long sentences"] += 1
    counts["pseudo-sentences"] += len(pieces)
    return pieces


def _sentences(paragraph: str, counts: collections.Counter) -> list[str]:
    """`split_sentences`, with a paragraph or sentence too long to tokenize cut at spaces (counted)."""
    if len(paragraph) > MAX_PARAGRAPH_CHARS:
        counts["long paragraphs"] += 1
        windows: Iterator[str] | list[str] = _cut(paragraph, MAX_PARAGRAPH_CHARS)
    else:
        windows = [paragraph]
    return [piece for window in windows for sentence in split_sentences(window) for piece in _cut_sentence(sentence, counts)]


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


def _sentences_format(text: str, name: str, counts: collections.Counter) -> list[Document]:
    blocks = [[piece for line in block for piece in _cut_sentence(line.strip(), counts)] for block in _blocks(text)]
    if len(blocks) == 1 and len(blocks[0]) > 1:
        log.warning(
            "%s has no blank line between documents: read as ONE document of %d sentences "
            "(set data.corpus_format=documents if each line is a document)",
            name,
            len(blocks[0]),
        )
    return blocks


def _documents_format(text: str, name: str, counts: collections.Counter) -> list[Document]:
    return [_sentences(line, counts) for line in _lines(text) if not _blank(line)]


def gutenberg_books(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of the body of each Project Gutenberg book in `text`: from its START line to
    its END line (to the next book's START, or the end of the text, where the END line is missing)."""
    starts = list(_GUTENBERG_START.finditer(text))
    books = []
    for index, start in enumerate(starts):
        limit = starts[index + 1].start() if index + 1 < len(starts) else len(text)
        end = _GUTENBERG_END.search(text, start.end(), limit)
        books.append((start.end(), end.start() if end else limit))
    return books


def _paragraphs_format(text: str, name: str, counts: collections.Counter) -> list[Document]:
    books = gutenberg_books(text)
    counts["books"] = len(books)
    documents: list[Document] = []
    for start, end in books or [(0, len(text))]:
        documents.append([])  # a book starts a document
        for block in _blocks(text, start, end):
            # A heading is a short block (its title may take a second line) starting with a heading word.
            if len(block) <= 2 and len(block[0]) < 200 and _HEADING.match(block[0].strip()):
                documents.append([])
                continue
            if _GUTENBERG_END_LINE.match(block[0]):
                continue
            documents[-1].extend(_sentences(" ".join(block), counts))
    return [document for document in documents if document]


def _wikitext_format(text: str, name: str, counts: collections.Counter) -> list[Document]:
    documents: list[Document] = [[]]
    for line in _lines(text):
        if _WIKITEXT_TITLE.match(line):
            documents.append([])
        elif not _blank(line) and not _WIKITEXT_HEADING.match(line):
            documents[-1].extend(_sentences(line, counts))
    return [document for document in documents if document]


_READERS = {
    "sentences": _sentences_format,
    "documents": _documents_format,
    "paragraphs": _paragraphs_format,
    "wikitext": _wikitext_format,
}


def parse(text: str, corpus_format: str, name: str = "<text>") -> list[Document]:
    """Documents (lists of sentences) of one file's text in `corpus_format` ('auto' detects it).

    Logs the format and the counts (books, documents, sentences), and any text cut into pseudo-sentences.
    """
    if corpus_format not in FORMATS:
        raise CorpusError(f"config.data.corpus_format={corpus_format!r}: choose one of {FORMATS}")
    chosen = detect_format(text) if corpus_format == "auto" else corpus_format
    counts: collections.Counter = collections.Counter()
    documents = _READERS[chosen](text, name, counts)
    books = f"{counts['books']} Project Gutenberg book(s) (each one's header and footer removed), " if counts["books"] else ""
    log.info(
        "%s: read as corpus_format=%s%s: %s%d documents, %d sentences",
        name,
        chosen,
        " (auto)" if corpus_format == "auto" else "",
        books,
        len(documents),
        sum(len(document) for document in documents),
    )
    cuts = []
    if counts["long paragraphs"]:
        cuts.append(f"{counts['long paragraphs']} paragraph(s) longer than {MAX_PARAGRAPH_CHARS} characters at spaces before sentence splitting")
    if counts["long sentences"]:
        cuts.append(f"{counts['long sentences']} sentence(s) longer than {MAX_SENTENCE_CHARS} characters into {counts['pseudo-sentences']} pseudo-sentences")
    if cuts:
        log.warning("%s: cut %s (a file without line breaks or sentence punctuation?)", name, " and ".join(cuts))
    return documents


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
        return [path for _, matches, _ in self._patterns() for path in matches]

    def _patterns(self) -> list[tuple[str, list[pathlib.Path], bool]]:
        """(pattern, the files it names, whether it names one file explicitly) per comma-separated part."""
        if not self.spec.strip():
            raise CorpusError("config.data.corpus is empty: give a path, a glob, 'tfds:NAME' or 'python-docs'")
        if self.spec == PYTHON_DOCS:
            return [(PYTHON_DOCS, _python_docs_files(), False)]
        if self.spec.startswith("tfds:"):
            return []
        patterns = []
        for pattern in (part.strip() for part in self.spec.split(",") if part.strip()):
            path = pathlib.Path(pattern).expanduser()
            if path.is_dir():
                # Hidden files and directories (.git, .DS_Store) are not part of a corpus.
                matches = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
                if not matches:
                    raise CorpusError(f"config.data.corpus: directory {pattern!r} holds no file")
            else:
                matches = sorted(pathlib.Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
                if not matches:
                    where = "" if path.is_absolute() else f" (relative paths are read from {os.getcwd()})"
                    raise CorpusError(f"config.data.corpus: {pattern!r} matches no file{where}")
            patterns.append((pattern, matches, path.is_file()))
        return patterns

    def fingerprint(self) -> list:
        """What identifies the text: file names, sizes and modification times (or the TFDS name), and
        the version of the rules that read them."""
        if self.spec.startswith("tfds:"):
            return [self.spec, self.tfds_text_key, PARSE_VERSION]
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files()]
        kind = self.spec if self.spec == PYTHON_DOCS else "files"
        return [kind, self.corpus_format, sys.version if self.spec == PYTHON_DOCS else "", stats, PARSE_VERSION]

    def documents(self) -> list[Document]:
        """Every non-empty document, in a fixed order; raises CorpusError when there is none.

        Local text is read once per process (training a tokenizer and preparing the token cache both
        need it); the key includes the files' sizes and modification times.
        """
        if self.spec.startswith("tfds:"):
            documents = [d for d in self._documents() if d]
            if not documents:
                raise CorpusError(f"{self.description} holds no text")
            return documents
        return _cached_documents(self, json.dumps(self.fingerprint()))

    def _documents(self) -> Iterator[Document]:
        if self.spec.startswith("tfds:"):
            yield from self._tfds_documents(self.spec[len("tfds:") :])
            return
        for pattern, files, explicit in self._patterns():
            binary, empty = [], []
            progress = tqdm.tqdm(files, desc=f"reading {pattern}", unit=" files", mininterval=2, disable=len(files) < 20)
            for path in progress:
                if self.spec == PYTHON_DOCS:
                    documents = [_python_docs_document(path)]
                elif not explicit and _sniff(path):
                    binary.append(path)  # a directory or glob may match images, archives, ...: skip them
                    continue
                else:
                    documents = parse(read_text(path), self.corpus_format, str(path))
                if not any(documents):
                    empty.append(path)
                yield from documents
            if binary:
                log.warning("%s: skipped %d binary file(s) that are not text: %s", pattern, len(binary), _some(binary))
            if binary and len(binary) + len(empty) == len(files):
                raise CorpusError(
                    f"config.data.corpus: {pattern!r} holds no text file ({len(binary)} binary: {_some(binary)}"
                    + (f"; {len(empty)} empty" if empty else "")
                    + ")"
                )
            if empty and self.spec != PYTHON_DOCS:
                log.warning("%s: %d file(s) hold no text: %s", pattern, len(empty), _some(empty))

    def _tfds_documents(self, name: str) -> Iterator[Document]:
        import tensorflow_datasets as tfds

        source = tfds.data_source(name, split="train", data_dir=self.tfds_data_dir or None)
        counts: collections.Counter = collections.Counter()
        for index in tqdm.trange(len(source), desc=f"reading tfds:{name}", unit=" docs", mininterval=2):
            record = source[index]
            if self.tfds_text_key not in record:
                raise CorpusError(f"tfds:{name} has no feature {self.tfds_text_key!r} (config.data.tfds_text_key); it has {sorted(record)}")
            text = record[self.tfds_text_key]
            text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
            yield [sentence for line in _lines(text) for sentence in _sentences(line, counts)]
        if counts["long sentences"] or counts["long paragraphs"]:
            log.warning("tfds:%s: cut %d long paragraph(s) and %d long sentence(s) at spaces", name, counts["long paragraphs"], counts["long sentences"])

    def sentences(self) -> Iterator[str]:
        for document in self.documents():
            yield from document


def _sniff(path: pathlib.Path) -> str | None:
    """Why a file is not text, from its first bytes (None for text)."""
    with open(path, "rb") as file:
        return binary_reason(file.read(_SNIFF_BYTES))


def _some(paths: list, shown: int = 3) -> str:
    names = ", ".join(str(p) for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


@functools.lru_cache(maxsize=4)
def _cached_documents(corpus: Corpus, fingerprint: str) -> list[Document]:
    files = corpus.files()
    documents = [document for document in corpus._documents() if document]
    if not documents:
        raise CorpusError(f"{corpus.description} holds no text: {_some(files)} {'is' if len(files) == 1 else 'are'} empty or blank")
    if len(files) > 1:
        log.info("%s: %d files, %d documents, %d sentences", corpus.description, len(files), len(documents), sum(len(d) for d in documents))
    return documents


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


def minimum_documents(eval_fraction: float) -> int:
    """Documents a corpus needs: max(4, ceil(1 / eval_fraction)) when its eval split is drawn from it,
    so that the two held-out documents are at most twice their share and NSP has two on each side;
    2 otherwise (NSP's random segments come from another document)."""
    return max(4, math.ceil(1 / eval_fraction - 1e-9)) if eval_fraction > 0 else 2


def pseudo_documents(documents: list[Document], minimum: int, description: str) -> list[Document]:
    """`documents`, with long ones cut into pseudo-documents when there are fewer than `minimum`.

    A play, a scraped dump or a book without chapter headings is one document: too few for NSP and
    the eval split. Then every document longer than W sentences is cut into near-equal runs of at
    most W consecutive sentences, W = max(MIN_PSEUDO_DOCUMENT_SENTENCES, sentences // (2 * minimum)),
    which gives about twice the minimum (so the eval split is about its asked share). Logged with
    the counts; documents that are already short stay as they are.
    """
    if len(documents) >= minimum:
        return documents
    total = sum(len(document) for document in documents)
    window = max(MIN_PSEUDO_DOCUMENT_SENTENCES, total // (2 * minimum))
    result: list[Document] = []
    cut = 0
    for document in documents:
        parts = -(-len(document) // window)
        if parts > 1:
            cut += 1
            bounds = [round(i * len(document) / parts) for i in range(parts + 1)]
            result.extend(document[begin:end] for begin, end in zip(bounds[:-1], bounds[1:]))
        else:
            result.append(document)
    if cut:
        log.warning(
            "%s has %d document(s), too few for NSP and the eval split (it needs %d): cut %d document(s) longer than %d "
            "sentences into pseudo-documents of at most %d consecutive sentences; now %d documents",
            description,
            len(documents),
            minimum,
            cut,
            window,
            window,
            len(result),
        )
    if len(result) < minimum:
        log.warning(
            "%s has %d document(s) of %d sentences in all, fewer than the %d that NSP and the eval split need "
            "(a larger corpus, or data.eval_corpus, avoids it)",
            description,
            len(result),
            total,
            minimum,
        )
    return result


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
    if eval_corpus is None:
        documents = pseudo_documents(train_corpus.documents(), minimum_documents(eval_fraction), train_corpus.description)
        held_out = _eval_choice(documents, eval_fraction)
        train_documents = [d for d, h in zip(documents, held_out) if not h]
        eval_documents = [d for d, h in zip(documents, held_out) if h]
    else:
        train_documents = pseudo_documents(train_corpus.documents(), minimum_documents(0), train_corpus.description)
        eval_documents = pseudo_documents(eval_corpus.documents(), minimum_documents(0), eval_corpus.description)
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
