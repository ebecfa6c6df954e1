"""Tokenizers with BERT's special tokens: sentencepiece (trained here) or a WordPiece vocab (HuggingFace).

Both kinds share one interface (`Tokenizer`): `encode`, `encode_batch` (pairs become
`[CLS] A [SEP] B [SEP]`), `decode`, the special token ids and `word_start` (which pieces begin a
word, for whole-word masking). Special ids are read from the vocabulary, never assumed.

Tokenizers trained by `train` have [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4. Sentencepiece ones
(unigram, BPE) have byte fallback, so no input is unrepresentable; `wordpiece` writes a BERT
`vocab.txt` that transformers' BertTokenizer reads as this module does.

Chinese, as bert-base-chinese has it: every CJK ideograph (traditional or simplified) and CJK
punctuation mark of the training text is a piece of its own (a sentencepiece user-defined symbol, so
it is never merged with a neighbour nor left to byte fallback), and the word-boundary piece `▁`
that sentencepiece puts before it (text start, a space) is dropped: '貓追狗' is three pieces. Each
such piece starts a word, as in BERT's BasicTokenizer; which characters make a Chinese word is
context, not vocabulary (whole-word masking asks a segmenter: bertjax.data.masking). A vocabulary
too small to hold every character is refused with the size to ask for.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tqdm

from bertjax.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SENTENCEPIECE_TYPES = ("unigram", "bpe")
MODEL_TYPES = (*SENTENCEPIECE_TYPES, "wordpiece")
BYTE_PIECES = 256
# Byte fallback takes 256 pieces and the special tokens 5; fewer leaves no room for real pieces.
MIN_VOCAB_SIZE = 320
SENTENCEPIECE_FILE = "tokenizer.model"
WORDPIECE_FILE = "vocab.txt"
# Part of the cache key of tokenizers trained for a config: a change in how they are trained retrains them.
TRAINING_VERSION = 2

# BERT's _is_chinese_char blocks (CJK Unified Ideographs and their extensions, compatibility ideographs).
_CJK = "\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ceaf\U0002f800-\U0002fa1f"
# CJK Symbols and Punctuation (、。「」《》【】...), less the ideographic space (NFKC makes it a space).
_CJK_PUNCTUATION = "\u3001-\u303f"
_CJK_CHAR = re.compile(f"([{_CJK}])")
CJK_IDEOGRAPH = re.compile(f"[{_CJK}]")
_CJK_PIECE = re.compile(f"[{_CJK}{_CJK_PUNCTUATION}]")
# The byte pieces that start a character of U+3000-U+9FFF: how a CJK character the training text lacked begins.
_CJK_LEAD_BYTES = {f"<0x{byte:02X}>" for byte in range(0xE3, 0xEA)}

log = logging.getLogger(__name__)


class TokenizerError(UserError, ValueError):
    """A tokenizer file or training input that cannot be used; the message names the file."""


def _check_special_tokens(path, pieces) -> None:
    missing = [token for token in SPECIAL_TOKENS if token not in pieces]
    if missing:
        raise TokenizerError(f"tokenizer {path} lacks the special tokens {missing}; BERT needs {list(SPECIAL_TOKENS)}")


def split_cjk(text: str) -> str:
    """Surround every CJK ideograph with spaces (how tokenizers trained before TRAINING_VERSION 2 saw text)."""
    return _CJK_CHAR.sub(r" \1 ", text)


def is_cjk_piece(piece: str) -> bool:
    """One CJK ideograph or CJK punctuation mark: a piece that is a word of its own."""
    return len(piece) == 1 and _CJK_PIECE.match(piece) is not None


class Tokenizer:
    """What every tokenizer offers; subclasses provide `_encode_many`, `decode` and the vocabulary."""

    path: str
    pieces: list[str]

    def __init__(self, path: str, pieces: list[str]):
        self.path = str(path)
        self.pieces = pieces
        index = {piece: i for i, piece in enumerate(pieces)}
        _check_special_tokens(path, index)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (index[t] for t in SPECIAL_TOKENS)
        self.special_ids = tuple(sorted({index[t] for t in SPECIAL_TOKENS} | set(self._extra_special_ids())))
        self.is_special = np.zeros(len(pieces), np.bool_)
        self.is_special[list(self.special_ids)] = True
        self.is_cjk = np.array([is_cjk_piece(piece) for piece in pieces], np.bool_)
        self.word_start = np.array([self._starts_word(piece) for piece in pieces], np.bool_) | self.is_special | self.is_cjk

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def _extra_special_ids(self) -> Iterable[int]:
        return ()

    def _starts_word(self, piece: str) -> bool:
        raise NotImplementedError

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self._encode_many([text])[0]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (batched in the backend: faster than a loop)."""
        return self._encode_many(list(texts))

    def id_to_piece(self, token_id: int) -> str:
        return self.pieces[int(token_id)]

    def encode_batch(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        max_length: int = 128,
        padding: str = "longest",
        truncation: bool = True,
    ) -> dict[str, np.ndarray]:
        """`[CLS] A [SEP]` (or `[CLS] A [SEP] B [SEP]` with `pairs`) as int32 arrays [B, S].

        Truncation removes tokens from the end of the longer text first (HuggingFace's longest_first);
        `padding='max_length'` pads to `max_length`, 'longest' to the longest row.
        """
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding={padding!r}: choose 'longest' or 'max_length'")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        first = self.encode_many(texts)
        second = self.encode_many(pairs) if pairs is not None else [None] * len(first)
        specials = 2 if pairs is None else 3
        rows = []
        for row, (a, b) in enumerate(zip(first, second)):
            b = b or []
            excess = len(a) + len(b) + specials - max_length
            if excess > 0:
                if not truncation:
                    raise ValueError(f"row {row}: {len(a) + len(b) + specials} tokens exceed max_length={max_length} and truncation=False")
                keep_a, keep_b = _longest_first(len(a), len(b), max_length - specials)
                a, b = a[:keep_a], b[:keep_b]
            ids = [self.cls_id, *a, self.sep_id]
            types = [0] * len(ids)
            if pairs is not None:
                ids += [*b, self.sep_id]
                types += [1] * (len(b) + 1)
            rows.append((ids, types))
        width = max_length if padding == "max_length" else max((len(ids) for ids, _ in rows), default=specials)
        input_ids = np.full((len(rows), width), self.pad_id, np.int32)
        token_type_ids = np.zeros((len(rows), width), np.int32)
        attention_mask = np.zeros((len(rows), width), np.int32)
        for row, (ids, types) in enumerate(rows):
            input_ids[row, : len(ids)] = ids
            token_type_ids[row, : len(types)] = types
            attention_mask[row, : len(ids)] = 1
        return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)

    def save(self, directory) -> str:
        """Copy the tokenizer's file(s) into `directory`; returns the path `load` accepts."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        source = pathlib.Path(self.path)
        for companion in self._files():
            target = directory / companion.name
            if companion.resolve() != target.resolve():
                shutil.copyfile(companion, target)
        return str(directory / source.name)

    def _files(self) -> list[pathlib.Path]:
        return [pathlib.Path(self.path)]


def _longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths after removing tokens one at a time from the longer side until they fit `budget`."""
    budget = max(budget, 0)
    if len_a + len_b <= budget:
        return len_a, len_b
    shorter = min(len_a, len_b)
    if shorter * 2 >= budget:
        keep_a = keep_b = budget // 2
        if len_a > len_b:
            keep_a += budget % 2
        else:
            keep_b += budget % 2
        return keep_a, keep_b
    return (len_a, budget - len_a) if len_a == shorter else (budget - len_b, len_b)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        self.processor = spm.SentencePieceProcessor(model_file=str(path))
        super().__init__(path, [self.processor.id_to_piece(i) for i in range(self.processor.get_piece_size())])
        space = self.processor.piece_to_id("\u2581")
        self.space_id = space if self.pieces[space] == "\u2581" else -1
        # Models trained on text with spaces around each ideograph learned '▁貓' pieces: give them such text.
        self.splits_cjk = any(len(p) == 2 and p[0] == "\u2581" and CJK_IDEOGRAPH.match(p[1]) for p in self.pieces)
        # A CJK character in bytes is a word too, and needs no '▁' before it either.
        cjk_bytes = np.array([piece in _CJK_LEAD_BYTES for piece in self.pieces], np.bool_)
        self.word_start |= cjk_bytes
        self._no_space_before = self.is_cjk | cjk_bytes

    def kept_positions(self, ids: Sequence[int]) -> list[int]:
        """Positions of `ids` that stay: all but a stand-alone '▁' before a CJK character (it marks no word)."""
        if self.space_id not in ids:
            return list(range(len(ids)))
        ids = np.asarray(ids)
        dropped = np.zeros(len(ids), np.bool_)
        dropped[:-1] = (ids[:-1] == self.space_id) & self._no_space_before[ids[1:]]
        return np.flatnonzero(~dropped).tolist()

    def _extra_special_ids(self):
        return (i for i in range(self.processor.get_piece_size()) if self.processor.is_control(i))

    def _starts_word(self, piece: str) -> bool:
        return piece.startswith("\u2581")

    def _encode_many(self, texts):
        if self.splits_cjk:
            texts = [split_cjk(text) for text in texts]
        rows = self.processor.encode(list(texts), num_threads=min(os.cpu_count() or 1, 8))
        # Most rows hold no '▁' piece alone: only those are filtered (a third of corpus preparation's time otherwise).
        space = self.space_id
        return [[row[k] for k in self.kept_positions(row)] if space in row else row for row in rows]

    def decode(self, ids) -> str:
        text = self.processor.decode([int(i) for i in ids if int(i) != self.pad_id])
        return re.sub(f"(?<=[{_CJK}]) (?=[{_CJK}])", "", text) if self.splits_cjk else text

    def _files(self):
        path = pathlib.Path(self.path)
        vocab = path.with_suffix(".vocab")
        return [path] + ([vocab] if vocab.exists() else [])


class WordPieceTokenizer(Tokenizer):
    """A BERT WordPiece vocabulary through HuggingFace `tokenizers`, as `transformers` tokenizes it.

    `tokenizer.json` is used as is; a bare `vocab.txt` gets BERT's normaliser and pre-tokeniser with
    lower-casing from `tokenizer_config.json`'s `do_lower_case` beside it (BertTokenizer's default, True,
    when there is none).
    """

    def __init__(self, path: str):
        import tokenizers

        path = pathlib.Path(path)
        if path.suffix == ".json":
            self.backend = tokenizers.Tokenizer.from_file(str(path))
        else:
            _check_special_tokens(path, path.read_text(encoding="utf-8", errors="replace").splitlines())
            self.backend = tokenizers.BertWordPieceTokenizer(str(path), lowercase=_do_lower_case(path.parent))
        vocab = self.backend.get_vocab()
        pieces = [""] * (max(vocab.values()) + 1)
        for piece, i in vocab.items():
            pieces[i] = piece
        super().__init__(str(path), pieces)

    def _starts_word(self, piece: str) -> bool:
        return not piece.startswith("##")

    def _encode_many(self, texts):
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=False)

    def _files(self):
        path = pathlib.Path(self.path)
        companions = [path.parent / name for name in ("tokenizer_config.json", "special_tokens_map.json")]
        return [path] + [c for c in companions if c.exists() and c != path]


def _do_lower_case(directory: pathlib.Path) -> bool:
    config_file = directory / "tokenizer_config.json"
    if config_file.exists():
        return bool(json.loads(config_file.read_text()).get("do_lower_case", True))
    return True


def load(path) -> Tokenizer:
    """A sentencepiece `.model`, a WordPiece `vocab.txt`, a `tokenizer.json`, or a directory holding one."""
    path = pathlib.Path(path)
    if path.is_dir():
        for name in (SENTENCEPIECE_FILE, "tokenizer.json", "vocab.txt"):
            if (path / name).exists():
                return load(path / name)
        raise TokenizerError(f"directory {path} holds no {SENTENCEPIECE_FILE}, tokenizer.json or vocab.txt")
    if not path.exists():
        raise TokenizerError(f"tokenizer file {path} does not exist")
    if path.suffix == ".model":
        try:
            return SentencePieceTokenizer(str(path))
        except (RuntimeError, OSError) as error:
            raise TokenizerError(f"{path} is not a sentencepiece model: {error}") from None
    return WordPieceTokenizer(str(path))


def train_from_sentences(
    sentences: Iterable[str], vocab_size: int, out_dir, model_type: str = "unigram", description: str = "tokenizer input"
) -> str:
    """Train a tokenizer with BERT's special tokens on `sentences`; returns the path `load` accepts
    (OUT_DIR/tokenizer.model, or OUT_DIR/vocab.txt for `wordpiece`)."""
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"model_type={model_type!r}: choose one of {MODEL_TYPES}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: byte fallback and special tokens need at least {MIN_VOCAB_SIZE}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Write the text to a file first: it lets us count it and its characters, fail clearly on empty
    # input, and hand the trainer a plain file (sentencepiece's iterator interface stalls on long generators).
    # The file goes in a hidden folder of out_dir, not the system's temporary directory: a corpus that is a
    # directory skips hidden entries, so the file cannot be read back as its own input (a corpus of /tmp
    # otherwise grew the file from itself without end).
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".input-") as scratch:
        text_file = pathlib.Path(scratch) / "input.txt"
        count, cjk, other_chars = _write_text(sentences, text_file, description)
        if count == 0:
            raise TokenizerError(f"no text to train a tokenizer on in {description}")
        reserved = len(SPECIAL_TOKENS) + (0 if model_type == "wordpiece" else BYTE_PIECES)
        too_small = TokenizerError(
            f"{description} has {len(cjk)} distinct CJK characters and each needs a piece of its own (plus {reserved} "
            f"special and byte pieces and {other_chars} other characters): set model.vocab_size (or --vocab-size) to at least "
            f"{-(-(reserved + len(cjk) + other_chars) // 128) * 128}, not {vocab_size}"
        )
        if vocab_size < reserved + len(cjk):
            raise too_small
        log.info("training a %s tokenizer of %d pieces on %d sentences of %s (%d CJK characters)", model_type, vocab_size, count, description, len(cjk))
        # Frequent characters first: their ids are then stable across corpora of the same language.
        characters = [char for char, _ in sorted(cjk.items(), key=lambda item: (-item[1], item[0]))]
        if model_type == "wordpiece":
            path = _train_wordpiece(text_file, vocab_size, out_dir, characters)
        else:
            path = _train_sentencepiece(text_file, vocab_size, out_dir, model_type, characters, too_small)
    trained = load(path)
    if trained.vocab_size < vocab_size:
        log.warning("%s supports only %d pieces (asked for %d)", description, trained.vocab_size, vocab_size)
    return str(path)


def _write_text(sentences: Iterable[str], text_file: pathlib.Path, description: str) -> tuple[int, collections.Counter, int]:
    """Write one sentence a line; returns the count, the CJK characters' counts (as the trainer
    normalises them: NFKC) and the number of other distinct characters."""
    count, cjk, chars = 0, collections.Counter(), set()
    with open(text_file, "w", encoding="utf-8") as out:
        for sentence in tqdm.tqdm(sentences, desc=f"reading {description}", unit=" sentences", mininterval=2):
            sentence = sentence.replace("\n", " ").strip()
            if sentence:
                out.write(sentence + "\n")
                count += 1
                normal = unicodedata.normalize("NFKC", sentence)
                cjk.update(_CJK_PIECE.findall(normal))
                chars.update(normal)
    return count, cjk, len(chars - set(cjk) - {" "})


def _train_sentencepiece(text_file, vocab_size: int, out_dir: pathlib.Path, model_type: str, characters: list[str], too_small: TokenizerError) -> pathlib.Path:
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            input=str(text_file),
            model_prefix=str(out_dir / pathlib.Path(SENTENCEPIECE_FILE).stem),
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            pad_piece="[PAD]",
            unk_piece="[UNK]",
            # User-defined (not control) symbols, so "[MASK]" typed in text is the mask token, as in BERT;
            # and every CJK character, so each is one piece in any context, never bytes.
            user_defined_symbols=["[CLS]", "[SEP]", "[MASK]", *characters],
            byte_fallback=True,
            character_coverage=0.9995,
            # A small corpus may not support the requested size: take what it supports, don't fail.
            hard_vocab_limit=False,
            input_sentence_size=300_000,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 14,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        if "required_chars" in str(error):  # "Vocabulary size is smaller than required_chars. N vs M."
            raise too_small from None
        raise
    return out_dir / SENTENCEPIECE_FILE


def _train_wordpiece(text_file, vocab_size: int, out_dir: pathlib.Path, characters: list[str]) -> pathlib.Path:
    """BERT's vocabulary type with BERT's normaliser (lower case, accents stripped, CJK split per
    character) through HuggingFace `tokenizers`; every CJK character is in the alphabet."""
    import tokenizers

    backend = tokenizers.BertWordPieceTokenizer(lowercase=True)
    backend.train(
        [str(text_file)],
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=characters,
        limit_alphabet=len(characters) + 1000,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    backend.save_model(str(out_dir))
    # What transformers' BertTokenizer.from_pretrained(out_dir) and `load` read to lower-case as trained.
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}) + "\n")
    return out_dir / WORDPIECE_FILE


def train(inputs: list[str], vocab_size: int, out_dir: str, model_type: str = "unigram") -> str:
    """Train on text files, one sentence (or paragraph) a line; returns the path of tokenizer.model."""
    from bertjax.data import corpus

    if not inputs:
        raise TokenizerError("no input files to train a tokenizer on")

    def lines():
        for path in inputs:
            yield from corpus.read_text(path).splitlines()

    return train_from_sentences(lines(), vocab_size, out_dir, model_type, description=", ".join(map(str, inputs)))


def for_config(config) -> Tokenizer:
    """`config.data.tokenizer`, or one trained on the corpus (model.vocab_size pieces) and cached."""
    from bertjax.data import corpus

    data = config.data
    if data.tokenizer:
        tok = load(data.tokenizer)
    else:
        source = corpus.Corpus.from_config(config)
        key = [source.fingerprint(), config.model.vocab_size, data.tokenizer_type, TRAINING_VERSION]
        key = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        directory = corpus.cache_root(config) / "tokenizers" / key
        path = directory / (WORDPIECE_FILE if data.tokenizer_type == "wordpiece" else SENTENCEPIECE_FILE)
        if path.exists():
            log.info("reusing the tokenizer trained on %s: %s", source.description, path)
        else:
            directory.parent.mkdir(parents=True, exist_ok=True)
            scratch = tempfile.mkdtemp(dir=directory.parent, prefix=f".{key}-")
            try:
                train_from_sentences(source.sentences(), config.model.vocab_size, scratch, data.tokenizer_type, source.description)
                corpus.publish(scratch, directory)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            log.info("trained a tokenizer on %s: %s", source.description, path)
        tok = load(path)
    if "model" in config and tok.vocab_size > config.model.vocab_size:
        raise TokenizerError(
            f"tokenizer {tok.path} has {tok.vocab_size} pieces but config.model.vocab_size={config.model.vocab_size}; "
            f"set --config.model.vocab_size={tok.vocab_size}"
        )
    return tok
