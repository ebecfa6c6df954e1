"""Text corpora -> documents of sentences -> token ids, prepared once (streamed, in parallel, a unit per file).

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

`prepare(config, tokenizer)` tokenizes every document once and stores it, a unit per text file (see
"Preparation" below: streamed a chunk at a time, tokenized in worker processes, shared between corpora
and preparers), and returns the 'train' and 'eval' splits as TokenizedDocuments whose tokens are read
from disk on demand (TokenStore). Evaluation documents are `data.eval_corpus`, or the
`data.eval_fraction` of the documents whose text hashes lowest (a choice that does not depend on the
order or number of files, nor on how a file was cut into chunks).
"""

from __future__ import annotations

import ast
import codecs
import collections
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import mmap
import math
import os
import pathlib
import re
import shutil
import sys
import sysconfig
import tempfile
import zlib
from typing import Any, Iterable, Iterator

import numpy as np
import tqdm

from bertjax.errors import UserError

FORMATS = ("auto", "sentences", "documents", "paragraphs", "wikitext")
PYTHON_DOCS = "python-docs"
PREPARED_VERSION = "2.0.0"
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


_BLOCK_BYTES = 1 << 22
# Text is parsed and tokenized in chunks of about this many characters, cut at a blank line where possible.
CHUNK_CHARS = 1 << 22
_GUTENBERG_START_BYTES = re.compile(rb"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class _Encoding:
    """How a file decodes (a codec and its error handler) and whether it holds a Project Gutenberg START line."""

    codec: str
    errors: str
    has_books: bool


def _encoding(path) -> _Encoding:
    """A pass over a file's bytes, a block at a time: refuses a binary file (CorpusError) and picks the codec.

    UTF-8 (a BOM dropped) and UTF-16 with a BOM are read as such. Text that is not valid UTF-8 and
    has no UTF-8 character beyond ASCII is an 8-bit legacy file: it is read as Windows-1252 (Latin-1
    where that fails) and logged. Otherwise the bad bytes are replaced by U+FFFD, counted and logged.
    """
    with open(path, "rb") as file:
        head = file.read(_SNIFF_BYTES)
        reason = binary_reason(head)
        if reason:
            raise CorpusError(f"{path} is not a text file ({reason}): remove it from config.data.corpus")
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            file.seek(0)
            text = "".join(_blocks_of(file, "utf-16", "replace"))
            return _Encoding("utf-16", "replace", bool(_GUTENBERG_START.search(text)))
        file.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        has_books, offset, tail = False, 0, b""
        try:
            while block := file.read(_BLOCK_BYTES):
                pending = len(decoder.getstate()[0])
                decoder.decode(block)
                has_books = has_books or (b"START OF" in tail + block and bool(_GUTENBERG_START_BYTES.search(tail + block)))
                tail, offset = block[-128:], offset + len(block)
            decoder.decode(b"", final=True)
            return _Encoding("utf-8-sig", "strict", has_books)
        except UnicodeDecodeError as error:
            bad = offset - pending + error.start
        file.seek(0)
        replaced, non_ascii, legacy, non_ascii_bytes, has_books, tail = 0, False, "cp1252", 0, False, b""
        decoder = codecs.getincrementaldecoder("utf-8-sig")("replace")
        while block := file.read(_BLOCK_BYTES):
            text = decoder.decode(block)
            non_ascii = non_ascii or bool(_NON_ASCII_TEXT.search(text))
            replaced += text.count("\ufffd") - block.count("\ufffd".encode())
            non_ascii_bytes += len(block.translate(None, bytes(range(128))))
            has_books = has_books or bool(_GUTENBERG_START_BYTES.search(tail + block))
            tail = block[-128:]
            try:
                block.decode("cp1252")
            except UnicodeDecodeError:  # bytes cp1252 leaves undefined (0x81, 0x8d, ...): Latin-1 maps every byte
                legacy = "latin-1"
    if non_ascii:
        log.warning("%s is not valid UTF-8 (first bad byte at offset %d): replaced %d undecodable byte sequence(s) with U+FFFD", path, bad, replaced)
        return _Encoding("utf-8-sig", "replace", has_books)
    name = "Windows-1252" if legacy == "cp1252" else "Latin-1"
    log.warning(
        "%s is not UTF-8 and has no UTF-8 character beyond ASCII: read as %s (%d non-ASCII bytes); "
        "convert it to UTF-8 (iconv -f ENCODING -t UTF-8) if that is not its encoding",
        path,
        name,
        non_ascii_bytes,
    )
    return _Encoding(legacy, "strict", has_books)


def _blocks_of(file, codec: str, errors: str) -> Iterator[str]:
    """A binary file's text, a block at a time, line ends normalised to \\n (a \\r\\n never split)."""
    decoder = codecs.getincrementaldecoder(codec)(errors)
    carry = ""
    while True:
        block = file.read(_BLOCK_BYTES)
        text = carry + decoder.decode(block, final=not block)
        carry = ""
        if block and text.endswith("\r"):
            text, carry = text[:-1], "\r"
        if "\r" in text:
            text = _LINE_END.sub("\n", text)
        if text:
            yield text
        if not block:
            return


def _text_blocks(path, encoding: _Encoding | None = None) -> Iterator[str]:
    encoding = encoding or _encoding(path)
    with open(path, "rb") as file:
        yield from _blocks_of(file, encoding.codec, encoding.errors)


def read_text(path) -> str:
    """A file's whole text, line ends normalised to \\n; a binary file is refused with a CorpusError.
    (Preparation never holds a whole file: it reads `_chunks`.)"""
    return "".join(_text_blocks(path))


def _chunks(blocks: Iterable[str], size: int | None = None) -> Iterator[tuple[str, bool]]:
    """(text, whether it starts in the middle of a line): the text in pieces of at most about `size`
    (CHUNK_CHARS) characters, each cut after a blank line (a paragraph's end) where its second half
    has one, else after a line end, else at a space."""
    size = size or CHUNK_CHARS
    buffer, continues = "", False
    for block in blocks:
        buffer += block
        while len(buffer) >= size:
            cut, at_line = _cut_point(buffer, size)
            yield buffer[:cut], continues
            buffer, continues = buffer[cut:], not at_line
    if buffer:
        yield buffer, continues


def _cut_point(text: str, size: int) -> tuple[int, bool]:
    low = size // 2
    end = text.rfind("\n", low, size)
    probe = end
    for _ in range(1000):  # a paragraph's end within the last thousand lines
        previous = text.rfind("\n", low, probe) if probe > low else -1
        if previous < 0:
            break
        if not text[previous + 1 : probe].strip():
            return probe + 1, True
        probe = previous
    if end >= 0:
        return end + 1, True
    space = text.rfind(" ", low, size)
    return (space + 1, False) if space >= 0 else (size, False)


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


@dataclasses.dataclass(frozen=True)
class _ChunkState:
    """What a chunk's parse needs from the text before it."""

    continues_line: bool = False  # it starts in the middle of a line (the previous chunk was cut at a space)
    in_book: bool = False  # it starts inside a Project Gutenberg book's body
    has_books: bool = False  # its file has Gutenberg START lines: only the books' bodies are text


# Each reader parses one chunk of a file into documents. The first one continues the document open at
# the chunk's start and the last one stays open for the next chunk (either may be empty); `_join`
# glues them, so a document never ends at a chunk boundary.
def _sentences_format(text: str, counts: collections.Counter, state: _ChunkState) -> list[Document]:
    documents: list[Document] = [[]]
    for line in text.split("\n"):  # a chunk's lines: bounded
        line = line.strip()
        if not line:
            if documents[-1] or len(documents) == 1:
                documents.append([])
        elif len(line) <= MAX_SENTENCE_CHARS:
            documents[-1].append(line)
        else:
            documents[-1].extend(_cut_sentence(line, counts))
    return documents


def _documents_format(text: str, counts: collections.Counter, state: _ChunkState) -> list[Document]:
    documents: list[Document] = [[]]
    for index, line in enumerate(text.split("\n")):
        if index == 0 and state.continues_line:
            documents[0].extend(_sentences(line, counts))
        elif not _blank(line):
            documents.append(_sentences(line, counts))
    return documents


def _paragraphs_format(text: str, counts: collections.Counter, state: _ChunkState) -> list[Document]:
    """Blocks of lines are paragraphs; a heading starts a document. In a file with Gutenberg books only
    their bodies are read (START line to END line, or to the next START); each book starts a document."""
    documents: list[Document] = [[]]
    block: list[str] = []
    in_book = state.in_book

    def flush():
        # A heading is a short block (its title may take a second line) starting with a heading word.
        if block and len(block) <= 2 and len(block[0]) < 200 and _HEADING.match(block[0].strip()):
            documents.append([])
        elif block and not _GUTENBERG_END_LINE.match(block[0]):
            documents[-1].extend(_sentences(" ".join(block), counts))
        block.clear()

    for line in text.split("\n"):
        if state.has_books and line.startswith("***"):
            if _GUTENBERG_START.match(line):
                flush()
                in_book = True
                counts["books"] += 1
                documents.append([])
                continue
            if in_book and _GUTENBERG_END.match(line):
                flush()
                in_book = False
                continue
        if state.has_books and not in_book:
            continue
        if _blank(line):
            flush()
        else:
            block.append(line)
    flush()
    return documents


def _wikitext_format(text: str, counts: collections.Counter, state: _ChunkState) -> list[Document]:
    documents: list[Document] = [[]]
    for line in text.split("\n"):
        if _WIKITEXT_TITLE.match(line):
            documents.append([])
        elif not _blank(line) and not _WIKITEXT_HEADING.match(line):
            documents[-1].extend(_sentences(line, counts))
    return documents


_READERS = {
    "sentences": _sentences_format,
    "documents": _documents_format,
    "paragraphs": _paragraphs_format,
    "wikitext": _wikitext_format,
}
_GUTENBERG_MARKER = re.compile(r"^\*\*\* ?(START|END) OF (THIS|THE) PROJECT GUTENBERG", re.MULTILINE)


def _chunk_tasks(chunks: Iterable[tuple[str, bool]], corpus_format: str, has_books: bool) -> Iterator[tuple[str, str, _ChunkState]]:
    """(text, format, state) of each chunk of one file: the format is detected on the first chunk
    (its first 256 KB), and whether a Gutenberg book is open is carried from chunk to chunk."""
    if corpus_format not in FORMATS:
        raise CorpusError(f"config.data.corpus_format={corpus_format!r}: choose one of {FORMATS}")
    chosen, in_book = None, False
    for text, continues in chunks:
        chosen = chosen or (detect_format(text) if corpus_format == "auto" else corpus_format)
        yield text, chosen, _ChunkState(continues, in_book, has_books and chosen == "paragraphs")
        if has_books and chosen == "paragraphs":
            markers = [marker.group(1) for marker in _GUTENBERG_MARKER.finditer(text)]
            in_book = markers[-1] == "START" if markers else in_book


def _parse_chunk(text: str, chosen: str, state: _ChunkState) -> tuple[list[Document], collections.Counter]:
    counts: collections.Counter = collections.Counter()
    return _READERS[chosen](text, counts, state), counts


def _join(pieces: Iterable[list[Document]]) -> Iterator[Document]:
    """The documents of consecutive chunks' readers, each document whole (see `_sentences_format`)."""
    open_document: Document = []
    for documents in pieces:
        open_document.extend(documents[0])
        if len(documents) > 1:
            if open_document:
                yield open_document
            yield from (document for document in documents[1:-1] if document)
            open_document = documents[-1]
    if open_document:
        yield open_document


def _log_parse(name: str, corpus_format: str, chosen: str | None, counts: collections.Counter, documents: int, sentences: int) -> None:
    books = f"{counts['books']} Project Gutenberg book(s) (each one's header and footer removed), " if counts["books"] else ""
    log.info(
        "%s: read as corpus_format=%s%s: %s%d documents, %d sentences",
        name,
        chosen,
        " (auto)" if corpus_format == "auto" else "",
        books,
        documents,
        sentences,
    )
    cuts = []
    if counts["long paragraphs"]:
        cuts.append(f"{counts['long paragraphs']} paragraph(s) longer than {MAX_PARAGRAPH_CHARS} characters at spaces before sentence splitting")
    if counts["long sentences"]:
        cuts.append(f"{counts['long sentences']} sentence(s) longer than {MAX_SENTENCE_CHARS} characters into {counts['pseudo-sentences']} pseudo-sentences")
    if cuts:
        log.warning("%s: cut %s (a file without line breaks or sentence punctuation?)", name, " and ".join(cuts))
    if chosen == "sentences" and documents == 1 and sentences > 1:
        log.warning(
            "%s has no blank line between documents: read as ONE document of %d sentences "
            "(set data.corpus_format=documents if each line is a document)",
            name,
            sentences,
        )


def _parse_stream(chunks: Iterable[tuple[str, bool]], corpus_format: str, name: str, has_books: bool) -> Iterator[Document]:
    """The documents of one file's chunks, parsed here one chunk at a time; logs the counts at the end."""
    counts: collections.Counter = collections.Counter()
    chosen_format: list[str] = []  # as detected on the first chunk, for the log at the end

    def pieces():
        for text, chosen, state in _chunk_tasks(chunks, corpus_format, has_books):
            chosen_format[:] = [chosen]
            documents, chunk_counts = _parse_chunk(text, chosen, state)
            counts.update(chunk_counts)
            yield documents

    documents = sentences = 0
    for document in _join(pieces()):
        documents += 1
        sentences += len(document)
        yield document
    _log_parse(name, corpus_format, chosen_format[0] if chosen_format else None, counts, documents, sentences)


def parse(text: str, corpus_format: str, name: str = "<text>") -> list[Document]:
    """Documents (lists of sentences) of one file's text in `corpus_format` ('auto' detects it).

    Logs the format and the counts (books, documents, sentences), and any text cut into pseudo-sentences.
    """
    return list(_parse_stream(_chunks([text]), corpus_format, name, bool(_GUTENBERG_START.search(text))))


def read_documents(path, corpus_format: str, name: str | None = None) -> Iterator[Document]:
    """The documents of a text file, read and parsed a chunk at a time (memory bounded by a chunk
    and the longest document)."""
    encoding = _encoding(path)
    yield from _parse_stream(_chunks(_text_blocks(path, encoding)), corpus_format, name or str(path), encoding.has_books)


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
        """Every non-empty document, in a fixed order; raises CorpusError when there is none."""
        return list(self.iter_documents())

    def iter_documents(self) -> Iterator[Document]:
        """`documents`, one at a time: files are read and parsed a chunk at a time (nothing is kept)."""
        count = 0
        for document in self._documents():
            if document:
                count += 1
                yield document
        if not count:
            files = self.files()
            where = f": {_some(files)} {'is' if len(files) == 1 else 'are'} empty or blank" if files else ""
            raise CorpusError(f"{self.description} holds no text{where}")

    def _documents(self) -> Iterator[Document]:
        if self.spec.startswith("tfds:"):
            yield from self._tfds_documents(self.spec[len("tfds:") :])
            return
        for pattern, files, explicit in self._patterns():
            if self.spec == PYTHON_DOCS:
                yield from map(_python_docs_document, tqdm.tqdm(files, desc="reading python-docs", unit=" files", mininterval=2))
                continue
            binary = [] if explicit else [path for path in files if _sniff(path)]  # a glob may match images, archives, ...
            empty = set()
            for path in tqdm.tqdm(files, desc=f"reading {pattern}", unit=" files", mininterval=2, disable=len(files) < 20):
                if path in binary:
                    continue
                found = False
                for document in read_documents(path, self.corpus_format):
                    found = True
                    yield document
                if not found:
                    empty.add(str(path))
            _check_patterns([(pattern, files, binary)], empty)

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
        for document in self.iter_documents():
            yield from document


def _sniff(path: pathlib.Path) -> str | None:
    """Why a file is not text, from its first bytes (None for text)."""
    with open(path, "rb") as file:
        return binary_reason(file.read(_SNIFF_BYTES))


def _some(paths: list, shown: int = 3) -> str:
    names = ", ".join(str(p) for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def cache_root(config) -> pathlib.Path:
    """`data.data_dir`, else $BERTJAX_DATA_DIR, else ~/.cache/bertjax."""
    root = config.data.data_dir or os.environ.get("BERTJAX_DATA_DIR") or pathlib.Path.home() / ".cache" / "bertjax"
    return pathlib.Path(root).expanduser()


def map_random(path: pathlib.Path, dtype, populate: bool = False) -> np.ndarray:
    """A read-only array over a file, memory-mapped for random access (MADV_RANDOM: no read-ahead of pages
    that a random gather will not use). With `populate` every page is mapped at once (MAP_POPULATE): for a
    small table that each batch reads at hundreds of random rows, so that the first batches do not pay a
    page fault per row. The page-cache pages it maps count in the process's RSS as clean, shared,
    reclaimable file pages, not as anonymous memory: experiments/data_scale measures both."""
    if not path.stat().st_size:
        return np.zeros(0, dtype)
    with open(path, "rb") as file:
        if hasattr(mmap, "MAP_POPULATE"):  # Linux
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            mapped = mmap.mmap(file.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        else:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and not populate:
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype)


class TokenStore:
    """The token ids of several prepared units as one flat int32 array, mapped from disk, read on demand.

    Each unit's tokens.bin is a read-only memory map (the layout of Megatron-LM's and fairseq's indexed
    datasets), so starting costs nothing and a batch gathers its segments with one numpy index per file.
    The pages a process touches are the kernel's page cache, clean and shared by every process that
    maps the file: they count in its RSS as training reads its way through the corpus, but the kernel
    reclaims them under memory pressure, as it would the cache behind explicit reads. (An os.preadv per
    segment, tried first, kept them out of RSS but made assembling a batch 2.2x slower:
    experiments/data_scale/README.md.)
    """

    def __init__(self, paths: list[pathlib.Path]):
        self.paths = [pathlib.Path(path) for path in paths]
        sizes = [path.stat().st_size // 4 for path in self.paths]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._maps: list[np.ndarray] | None = None

    def __getstate__(self):  # a pickled store (grain's worker processes) maps the files again, not copies them
        return dict(self.__dict__, _maps=None)

    def _arrays(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [map_random(path, np.int32)[: int(e - b)] for path, b, e in zip(self.paths, self.starts[:-1], self.starts[1:])]
        return self._maps

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index) -> np.ndarray:
        maps = self._arrays()
        if isinstance(index, slice):
            begin, end, step = index.indices(len(self))
            if step == 1 and end > begin:  # a run of tokens: copied from each file it spans
                parts = [m[max(begin - b, 0) : min(end, e) - b] for m, b, e in zip(maps, self.starts[:-1], self.starts[1:]) if begin < e and b < end]
                return np.concatenate(parts).astype(np.int32, copy=False) if len(parts) > 1 else np.array(parts[0])
            index = np.arange(begin, end, step)
        index = np.asarray(index, np.int64)
        if len(maps) == 1:
            return np.asarray(maps[0][index])
        part = np.searchsorted(self.starts, index, side="right") - 1
        result = np.empty(index.shape, np.int32)
        for number in np.unique(part).tolist():
            chosen = part == number
            result[chosen] = maps[number][index[chosen] - self.starts[number]]
        return result

    def __array__(self, dtype=None, copy=None):
        whole = self[:]
        return whole.astype(dtype) if dtype is not None else whole


@dataclasses.dataclass(frozen=True)
class TokenizedDocuments:
    """Documents as flat arrays: tokens[sentence_offsets[s]:sentence_offsets[s+1]] is sentence s;
    sentences document_offsets[d]:document_offsets[d+1] make document d. A split is the documents
    `document_ids` of a prepared set (None: all of them); `key` names the set, for tables derived from it.

    `tokens` is an array or a lazy TokenStore; the sentence offsets are computed when first asked for
    (only building an instance table needs them), once for all the splits made from one set by
    `dataclasses.replace` (they share `_cache`)."""

    tokens: Any
    sentence_lengths: np.ndarray  # int32 [num_sentences], possibly memory-mapped
    document_offsets: np.ndarray  # int64 [num_all_documents + 1]
    document_ids: np.ndarray | None = None
    key: str = ""
    _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1 if self.document_ids is None else len(self.document_ids)

    @property
    def ids(self) -> np.ndarray:
        """The documents of this split, in corpus order."""
        return np.arange(len(self.document_offsets) - 1) if self.document_ids is None else self.document_ids

    @property
    def sentence_offsets(self) -> np.ndarray:
        lengths, offsets = self._cache.get("sentence_offsets", (None, None))
        if lengths is not self.sentence_lengths:  # (a copy given other sentence lengths computes its own)
            offsets = np.zeros(len(self.sentence_lengths) + 1, np.int64)
            np.cumsum(self.sentence_lengths, out=offsets[1:])
            self._cache["sentence_offsets"] = (self.sentence_lengths, offsets)
        return offsets

    @classmethod
    def from_records(cls, records: list[tuple[np.ndarray, np.ndarray]]) -> "TokenizedDocuments":
        """From (tokens, sentence_lengths) per document."""
        tokens = np.concatenate([r[0] for r in records]).astype(np.int32) if records else np.zeros(0, np.int32)
        lengths = np.concatenate([r[1] for r in records]).astype(np.int32) if records else np.zeros(0, np.int32)
        sentences_per_document = np.array([len(r[1]) for r in records], np.int64)
        return cls(tokens=tokens, sentence_lengths=lengths, document_offsets=np.concatenate([[0], np.cumsum(sentences_per_document)]))


_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _document_hashes(documents: list[Document]) -> np.ndarray:
    """Each document's text hash (uint64): the sum (mod 2**64) of its sentences' hashes, so that a
    document read in several chunks (or processes) hashes as when read whole; a sentence's hash is
    its CRC-32 spread over 64 bits (times the golden ratio), so sums of them are spread too."""
    sentences = [sentence for document in documents for sentence in document]
    crcs = np.fromiter(map(zlib.crc32, map(str.encode, sentences)), np.uint64, len(sentences))
    with np.errstate(over="ignore"):
        running = np.concatenate([np.zeros(1, np.uint64), np.cumsum(crcs * _GOLDEN, dtype=np.uint64)])
        bounds = np.cumsum([0] + [len(document) for document in documents])
        return running[bounds[1:]] - running[bounds[:-1]]


def document_hash(document: Document) -> int:
    """The hash by which held-out documents are chosen (see `_document_hashes`)."""
    return int(_document_hashes([document])[0])


def _eval_choice(digests: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents are held out: the `fraction` whose text hashes (`document_hash`) are lowest.

    At least two when the corpus has four or more documents, so that NSP's random segments in the eval
    split can come from another document (with one, every eval pair would be a real continuation).
    """
    digests = np.asarray(digests, np.uint64)
    if fraction <= 0 or len(digests) < 2:
        return np.zeros(len(digests), np.bool_)
    at_least = 2 if len(digests) >= 4 else 1
    count = min(max(at_least, int(round(fraction * len(digests)))), len(digests) - 1)
    chosen = np.zeros(len(digests), np.bool_)
    chosen[np.argsort(digests, kind="stable")[:count]] = True
    return chosen


def minimum_documents(eval_fraction: float) -> int:
    """Documents a corpus needs: max(4, ceil(1 / eval_fraction)) when its eval split is drawn from it,
    so that the two held-out documents are at most twice their share and NSP has two on each side;
    2 otherwise (NSP's random segments come from another document)."""
    return max(4, math.ceil(1 / eval_fraction - 1e-9)) if eval_fraction > 0 else 2


def _pseudo_sizes(sizes: list[int], minimum: int, description: str) -> list[int] | None:
    """The sentence counts of the (pseudo-)documents `pseudo_documents` makes of documents of `sizes`
    sentences, or None when there are enough documents."""
    if len(sizes) >= minimum:
        return None
    total = sum(sizes)
    window = max(MIN_PSEUDO_DOCUMENT_SENTENCES, total // (2 * minimum))
    result: list[int] = []
    cut = 0
    for size in sizes:
        parts = -(-size // window)
        if parts > 1:
            cut += 1
            bounds = [round(i * size / parts) for i in range(parts + 1)]
            result.extend(end - begin for begin, end in zip(bounds[:-1], bounds[1:]))
        else:
            result.append(size)
    if cut:
        log.warning(
            "%s has %d document(s), too few for NSP and the eval split (it needs %d): cut %d document(s) longer than %d "
            "sentences into pseudo-documents of at most %d consecutive sentences; now %d documents",
            description,
            len(sizes),
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


def pseudo_documents(documents: list[Document], minimum: int, description: str) -> list[Document]:
    """`documents`, with long ones cut into pseudo-documents when there are fewer than `minimum`.

    A play, a scraped dump or a book without chapter headings is one document: too few for NSP and
    the eval split. Then every document longer than W sentences is cut into near-equal runs of at
    most W consecutive sentences, W = max(MIN_PSEUDO_DOCUMENT_SENTENCES, sentences // (2 * minimum)),
    which gives about twice the minimum (so the eval split is about its asked share). Logged with
    the counts; documents that are already short stay as they are. (Prepared corpora apply the same
    rule to their sentence counts: `_pseudo_sizes`.)
    """
    sizes = _pseudo_sizes([len(document) for document in documents], minimum, description)
    if sizes is None:
        return documents
    sentences = [sentence for document in documents for sentence in document]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [sentences[begin:end] for begin, end in zip(bounds[:-1], bounds[1:])]


# ---- Preparation: files -> chunks -> (parse, tokenize) in worker processes -> units on disk.
#
# A unit is what one text file (or a whole python-docs / tfds corpus) prepares into, under
# cache_root/corpora/units/KEY, KEY hashing the file (path, size, modification time), the format,
# the tokenizer and the versions: several preparers (hosts, runs with other files) share units, and
# each is published by renaming a finished scratch directory with its `done` marker written last.
UNIT_ARRAYS = {
    "tokens": np.int32,  # token ids, flat
    "sentence_lengths": np.int32,  # tokens per sentence
    "document_sentences": np.int64,  # sentences per document
    "document_hash": np.uint64,  # `document_hash` per document
}
_DOCUMENTS_PER_TASK = 256
# Below this much text a corpus is prepared in this process (starting workers costs more than it saves).
_POOL_BYTES = 2 * CHUNK_CHARS

_worker_tokenizer = None


def _start_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    from bertjax.data import tokenizer as tokenizer_lib

    _worker_tokenizer = tokenizer_lib.load(tokenizer_path)


@dataclasses.dataclass
class _Piece:
    """One task's documents as arrays. Chunks of a file are `joined`: the first document continues the
    one open before, the last stays open (both may hold no sentence)."""

    tokens: np.ndarray
    sentence_lengths: np.ndarray
    document_sentences: np.ndarray
    document_hash: np.ndarray
    joined: bool
    counts: collections.Counter


def _work(task, tokenizer=None) -> _Piece:
    """Parse (a chunk of text) and tokenize: runs in a worker process. Sentences without tokens are left out."""
    tokenizer = tokenizer or _worker_tokenizer
    kind, payload = task
    counts: collections.Counter = collections.Counter()
    if kind == "text":
        documents, counts = _parse_chunk(*payload)
    else:
        documents = payload
    ids = tokenizer.encode_many([sentence for document in documents for sentence in document]) if any(documents) else []
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
    owner = np.repeat(np.arange(len(documents)), [len(document) for document in documents])
    kept = lengths > 0
    return _Piece(
        tokens=tokens,
        sentence_lengths=lengths[kept].astype(np.int32),
        document_sentences=np.bincount(owner[kept], minlength=len(documents)).astype(np.int64),
        document_hash=_document_hashes(documents),
        joined=kind == "text",
        counts=counts,
    )


class _UnitWriter:
    """Appends pieces to a unit's arrays in a scratch directory, a document finished at a time."""

    def __init__(self, directory: pathlib.Path, key: str):
        self.directory, self.key = directory, key
        directory.parent.mkdir(parents=True, exist_ok=True)
        self.scratch = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{key}-"))
        self.files = {name: open(self.scratch / f"{name}.bin", "wb") for name in UNIT_ARRAYS}
        self.open_sentences, self.open_hash = 0, 0
        self.counts: collections.Counter = collections.Counter()

    def add(self, piece: _Piece) -> None:
        self.files["tokens"].write(piece.tokens.tobytes())
        self.files["sentence_lengths"].write(piece.sentence_lengths.tobytes())
        self.counts.update(piece.counts)
        self.counts["tokens"] += len(piece.tokens)
        self.counts["sentences"] += len(piece.sentence_lengths)
        sizes, hashes = piece.document_sentences.tolist(), piece.document_hash.tolist()
        if not piece.joined:
            sizes, hashes = [0, *sizes, 0], [0, *hashes, 0]
        self.open_sentences += sizes[0]
        self.open_hash = (self.open_hash + hashes[0]) & _MASK64
        if len(sizes) > 1:
            self._finish_document()
            self._write([s for s in sizes[1:-1] if s], [h for s, h in zip(sizes[1:-1], hashes[1:-1]) if s])
            self.open_sentences, self.open_hash = sizes[-1], hashes[-1]

    def _finish_document(self) -> None:
        if self.open_sentences:
            self._write([self.open_sentences], [self.open_hash])
        self.open_sentences, self.open_hash = 0, 0

    def _write(self, sizes: list[int], hashes: list[int]) -> None:
        self.files["document_sentences"].write(np.array(sizes, np.int64).tobytes())
        self.files["document_hash"].write(np.array(hashes, np.uint64).tobytes())
        self.counts["documents"] += len(sizes)

    def abandon(self) -> None:
        for file in self.files.values():
            file.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def close(self, meta: dict) -> dict:
        self._finish_document()
        for file in self.files.values():
            file.close()
        meta = dict(meta, **{name: self.counts[name] for name in ("tokens", "sentences", "documents", "books")})
        (self.scratch / "meta.json").write_text(json.dumps(meta))
        (self.scratch / "done").write_text("")
        if self.directory.exists() and not (self.directory / "done").exists():
            shutil.rmtree(self.directory)  # left by an interrupted run
        publish(self.scratch, self.directory)
        return meta


def publish(scratch, directory: pathlib.Path) -> None:
    """Move a finished scratch directory into place; when another process got there first, keep theirs."""
    try:
        os.replace(scratch, directory)
    except OSError:
        if not directory.exists():
            raise
        log.info("%s was prepared by another process meanwhile; using that", directory)
        shutil.rmtree(scratch, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class _Unit:
    """One thing to prepare: a text file (`path`), or a whole python-docs / tfds corpus (`corpus`)."""

    key: str
    directory: pathlib.Path
    name: str
    path: pathlib.Path | None = None
    corpus: "Corpus | None" = None
    size: int = 0

    @property
    def done(self) -> bool:
        return (self.directory / "done").exists()


def _tasks(unit: _Unit, corpus_format: str) -> Iterator[tuple[tuple, str | None]]:
    """(task, chosen format) of a unit: its chunks of text, or batches of its documents (at least one task)."""
    if unit.path is not None:
        encoding = _encoding(unit.path)
        chunks = _chunks(_text_blocks(unit.path, encoding))
        tasks = ((("text", (text, chosen, state)), chosen) for text, chosen, state in _chunk_tasks(chunks, corpus_format, encoding.has_books))
    else:
        documents = (document for document in unit.corpus._documents() if document)
        tasks = ((("documents", batch), None) for batch in _batched(documents, _DOCUMENTS_PER_TASK))
    yield from tasks


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _run(units: list[_Unit], corpus_format: str, tokenizer) -> None:
    """Prepare `units`: their tasks go to a pool of worker processes (one per core; in this process
    for a small corpus), at most two per worker ahead, and their pieces are written in order."""
    workers = os.cpu_count() or 1
    if sum(unit.size for unit in units) < _POOL_BYTES:
        workers = 1
    writers: dict[int, _UnitWriter] = {}
    formats: dict[int, str | None] = {}

    def tasks():
        """(unit number, task or None at the unit's end, bytes of text)."""
        for number, unit in enumerate(units):
            writers[number] = _UnitWriter(unit.directory, unit.key)
            for task, chosen in _tasks(unit, corpus_format):
                formats[number] = chosen
                yield number, task, len(task[1][0]) if task[0] == "text" else 0
            yield number, None, 0

    def write(number, piece):
        if piece is not None:
            writers[number].add(piece)
            return
        unit, writer = units[number], writers.pop(number)
        meta = writer.close({"name": unit.name, "format": formats.get(number)})
        if unit.path is not None:
            _log_parse(unit.name, corpus_format, formats.get(number), writer.counts, meta["documents"], meta["sentences"])

    try:
        with tqdm.tqdm(total=sum(unit.size for unit in units), desc="preparing", unit="B", unit_scale=True, mininterval=2) as progress:
            if workers == 1:
                for number, task, size in tasks():
                    write(number, task and _work(task, tokenizer))
                    progress.update(size)
                return
            import concurrent.futures
            import multiprocessing

            # fork, not spawn: spawn re-runs the caller's main module in each worker, which breaks scripts
            # without a __main__ guard. The workers run only the parser, sentencepiece and numpy, never
            # JAX, so JAX's threads in this process (and its warning about fork) do not concern them.
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(tokenizer.path,)) as pool:
                pending: collections.deque = collections.deque()
                for number, task, size in tasks():
                    pending.append((number, size, task and pool.submit(_work, task)))
                    while len(pending) > 2 * workers or (pending and (pending[0][2] is None or pending[0][2].done())):
                        number, size, future = pending.popleft()
                        write(number, future and future.result())
                        progress.update(size)
                for number, size, future in pending:
                    write(number, future and future.result())
                    progress.update(size)
    finally:
        for writer in writers.values():  # left unfinished by an error
            writer.abandon()


def _load_unit(directory: pathlib.Path) -> dict[str, np.ndarray]:
    arrays = {}
    for name, dtype in UNIT_ARRAYS.items():
        path = directory / f"{name}.bin"
        size = path.stat().st_size
        # The tokens are mapped by TokenStore; the sentence lengths are mapped too (only instance tables need them).
        if name == "tokens":
            continue
        if size and name == "sentence_lengths":
            arrays[name] = np.memmap(path, dtype=dtype, mode="r")
        else:
            arrays[name] = np.fromfile(path, dtype=dtype)
    return arrays


def _units(corpus: "Corpus", root: pathlib.Path, tokenizer_digest: str) -> tuple[list[_Unit], list]:
    """The units of a corpus (one per text file) and its patterns' (pattern, files, binary files) for
    the checks; an explicitly named binary file is refused here, before any work."""
    root = root / "corpora" / "units"
    if corpus.spec.startswith("tfds:") or corpus.spec == PYTHON_DOCS:
        key = cache_key([PREPARED_VERSION, corpus.fingerprint(), tokenizer_digest])
        return [_Unit(key, root / key, corpus.description, corpus=corpus, size=sum(f.stat().st_size for f in corpus.files()))], []
    units, patterns = [], []
    for pattern, files, explicit in corpus._patterns():
        binary = [path for path in files if _sniff(path)]
        if explicit and binary:
            _encoding(binary[0])  # raises the CorpusError that names it
        for path in files:
            if path in binary:
                continue
            stat = path.stat()
            key = cache_key([PREPARED_VERSION, PARSE_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns, corpus.corpus_format, tokenizer_digest])
            units.append(_Unit(key, root / key, str(path), path=path, size=stat.st_size))
        patterns.append((pattern, files, binary))
    return units, patterns


def cache_key(parts: list) -> str:
    """A short hash of JSON-able parts: the name of a cached directory."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _check_patterns(patterns: list, empty: set) -> None:
    """The warnings and errors of a corpus's patterns: binary files skipped, files without text."""
    for pattern, files, binary in patterns:
        blank = [path for path in files if str(path) in empty]
        if binary:
            log.warning("%s: skipped %d binary file(s) that are not text: %s", pattern, len(binary), _some(binary))
        if binary and len(binary) + len(blank) == len(files):
            raise CorpusError(
                f"config.data.corpus: {pattern!r} holds no text file ({len(binary)} binary: {_some(binary)}"
                + (f"; {len(blank)} empty" if blank else "")
                + ")"
            )
        if blank:
            log.warning("%s: %d file(s) hold no text: %s", pattern, len(blank), _some(blank))


def prepare_units(corpus: "Corpus", root: pathlib.Path, tokenizer, shard: tuple[int, int] | None = None) -> list[_Unit]:
    """Prepare the units of `corpus` not yet prepared (with `shard` (i, n): only every n-th from the i-th,
    so that n processes or hosts share the work) and return all of them."""
    digest = hashlib.sha256(pathlib.Path(tokenizer.path).read_bytes()).hexdigest()
    units, patterns = _units(corpus, root, digest)
    mine = units if shard is None else units[shard[0] :: shard[1]]
    todo = [unit for unit in mine if not unit.done]
    if todo:
        log.info("preparing %d of the %d file(s) of %s (%d reused)", len(todo), len(mine), corpus.description, len(mine) - len(todo))
        _run(todo, corpus.corpus_format, tokenizer)
    else:
        log.info("reusing the prepared %s (%d file(s) in %s)", corpus.description, len(mine), units[0].directory.parent if units else "")
    if shard is None:
        empty = {unit.name for unit in units if not json.loads((unit.directory / "meta.json").read_text())["documents"]}
        _check_patterns(patterns, empty)
        if len(empty) == len(units):
            files = corpus.files()
            raise CorpusError(f"{corpus.description} holds no text: {_some(files)} {'is' if len(files) == 1 else 'are'} empty or blank")
    return units


def _documents_of(units: list[_Unit]) -> tuple[TokenizedDocuments, np.ndarray]:
    """The units as one set of documents (tokens and sentence lengths mapped, not read) and the hash of each."""
    arrays = [_load_unit(unit.directory) for unit in units]
    sizes = np.concatenate([a["document_sentences"] for a in arrays])
    hashes = np.concatenate([a["document_hash"] for a in arrays])
    lengths_parts = [a["sentence_lengths"] for a in arrays if len(a["sentence_lengths"])]
    lengths = lengths_parts[0] if len(lengths_parts) == 1 else np.concatenate(lengths_parts or [np.zeros(0, np.int32)])
    tokens = TokenStore([unit.directory / "tokens.bin" for unit in units])
    return TokenizedDocuments(tokens, lengths, np.concatenate([[0], np.cumsum(sizes)])), hashes


def _pseudo(documents: TokenizedDocuments, hashes: np.ndarray, minimum: int, description: str) -> tuple[TokenizedDocuments, np.ndarray]:
    """`pseudo_documents`'s rule on a prepared set; pseudo-documents are hashed by their tokens."""
    cut = _pseudo_sizes(np.diff(documents.document_offsets).tolist(), minimum, description)
    if cut is None:
        return documents, hashes
    documents = dataclasses.replace(documents, document_offsets=np.concatenate([[0], np.cumsum(cut)]))
    bounds = documents.sentence_offsets[documents.document_offsets]
    hashes = np.array(
        [int.from_bytes(hashlib.blake2b(documents.tokens[b:e].tobytes(), digest_size=8).digest(), "little") for b, e in zip(bounds[:-1], bounds[1:])],
        np.uint64,
    )
    return documents, hashes


def prepare(config, tokenizer, shard: tuple[int, int] | None = None) -> dict[str, TokenizedDocuments] | None:
    """The 'train' and 'eval' documents of `config.data` as token ids, prepared once and cached.

    Files already prepared (by this or another process, for this or another corpus) are reused. With
    `shard` (i, n), only this preparer's share of the files is prepared and nothing is returned. The
    set's documents (pseudo-documents, the held-out choice) are decided once and stored under
    corpora/sets/KEY.
    """
    root = cache_root(config)
    train_corpus = Corpus.from_config(config)
    eval_corpus = Corpus.from_config(config, config.data.eval_corpus) if config.data.eval_corpus else None
    train_units = prepare_units(train_corpus, root, tokenizer, shard)
    eval_units = prepare_units(eval_corpus, root, tokenizer, shard) if eval_corpus else []
    if shard is not None:
        return None
    fraction = 0.0 if eval_corpus else config.data.eval_fraction
    key = cache_key([[unit.key for unit in train_units], [unit.key for unit in eval_units], fraction])
    train, hashes = _documents_of(train_units)
    evaluation = _documents_of(eval_units)[0] if eval_corpus else None
    directory = root / "corpora" / "sets" / key
    if not (directory / "done").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        scratch = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{key}-"))
        cut, cut_hashes = _pseudo(train, hashes, minimum_documents(fraction), train_corpus.description)
        np.save(scratch / "train_documents.npy", cut.document_offsets)
        np.save(scratch / "held_out.npy", _eval_choice(cut_hashes, fraction))
        if eval_corpus:
            np.save(scratch / "eval_documents.npy", _pseudo(evaluation, hashes[:0], minimum_documents(0), eval_corpus.description)[0].document_offsets)
        (scratch / "done").write_text("")
        publish(scratch, directory)
    train = dataclasses.replace(train, document_offsets=np.load(directory / "train_documents.npy"))
    held_out = np.load(directory / "held_out.npy")
    if eval_corpus:
        evaluation = dataclasses.replace(evaluation, document_offsets=np.load(directory / "eval_documents.npy"))
    else:
        evaluation = dataclasses.replace(train, document_ids=np.flatnonzero(held_out))
        train = dataclasses.replace(train, document_ids=np.flatnonzero(~held_out))
    if not len(train.tokens):
        raise CorpusError(f"{train_corpus.description}: no document has any token")
    log.info(
        "%s: %d train documents, %d eval documents, %d tokens in all",
        train_corpus.description,
        train.num_documents,
        evaluation.num_documents,
        len(train.tokens) + (len(evaluation.tokens) if eval_corpus else 0),
    )
    return {"train": dataclasses.replace(train, key=f"{key}-train"), "eval": dataclasses.replace(evaluation, key=f"{key}-eval")}
