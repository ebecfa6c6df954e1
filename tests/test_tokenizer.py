"""Tokenizer: special ids, batch encoding of singles and pairs, CJK, byte fallback, WordPiece as transformers does."""

import logging

import numpy as np
import pytest

from bertjax import cli
from bertjax.data import tokenizer as tokenizer_lib

WORDS = "the whale ship sea captain harpoon white sailor deck storm wind boat oil night water mast rope".split()


def english_text(lines=400, seed=0):
    rng = np.random.default_rng(seed)
    sentences = []
    for _ in range(lines):
        words = rng.choice(WORDS, size=rng.integers(4, 12))
        sentences.append(" ".join(words).capitalize() + ".")
    return "\n".join(sentences) + "\n貓追狗。貓追老鼠。狗追貓。" * 40 + "\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    text_file = directory / "text.txt"
    text_file.write_text(english_text(), encoding="utf-8")
    return tokenizer_lib.load(tokenizer_lib.train([str(text_file)], 400, str(directory / "out")))


def test_special_tokens_have_fixed_ids(trained):
    assert (trained.pad_id, trained.unk_id, trained.cls_id, trained.sep_id, trained.mask_id) == (0, 1, 2, 3, 4)
    assert set(trained.special_ids) == {0, 1, 2, 3, 4}
    assert [trained.id_to_piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert trained.vocab_size <= 400 and trained.word_start.shape == (trained.vocab_size,)
    # "[MASK]" typed in text is the mask token (as in BERT), not letters.
    assert trained.mask_id in trained.encode("the [MASK] whale")


def test_encode_batch_single_and_pair(trained):
    single = trained.encode_batch(["the whale", "the white whale ship sails"], max_length=16)
    a, b = trained.encode("the whale"), trained.encode("the white whale ship sails")
    assert single["input_ids"].shape == (2, len(b) + 2)
    for key in single:
        assert single[key].dtype == np.int32
    np.testing.assert_array_equal(single["input_ids"][0, : len(a) + 2], [2, *a, 3])
    assert (single["input_ids"][0, len(a) + 2 :] == 0).all()
    np.testing.assert_array_equal(single["attention_mask"][0], np.arange(len(b) + 2) < len(a) + 2)
    assert (single["token_type_ids"] == 0).all()
    pair = trained.encode_batch(["the whale"], pairs=["sea storm"], max_length=32, padding="max_length")
    c = trained.encode("sea storm")
    expected = [2, *a, 3, *c, 3]
    assert pair["input_ids"].shape == (1, 32)
    np.testing.assert_array_equal(pair["input_ids"][0, : len(expected)], expected)
    np.testing.assert_array_equal(pair["token_type_ids"][0, : len(expected)], [0] * (len(a) + 2) + [1] * (len(c) + 1))
    assert pair["attention_mask"].sum() == len(expected)


def test_truncation_longest_first(trained):
    long_text = " ".join(["whale"] * 50)
    short_text = "sea"
    out = trained.encode_batch([long_text], pairs=[short_text], max_length=12)
    ids = out["input_ids"][0]
    assert len(ids) == 12 and ids[-1] == 3
    # The short segment is kept whole; the long one gives way.
    sea = trained.encode(short_text)
    np.testing.assert_array_equal(ids[-1 - len(sea) : -1], sea)
    with pytest.raises(ValueError, match="row 0"):
        trained.encode_batch([long_text], max_length=12, truncation=False)


def test_chinese_characters_are_pieces_and_padding_is_masked(trained):
    out = trained.encode_batch(["貓追狗", "貓追老鼠"], padding="longest")
    # One piece per character between [CLS] and [SEP], no stand-alone '▁'; the shorter row padded.
    assert [[trained.id_to_piece(i) for i in row] for row in out["input_ids"]] == [
        ["[CLS]", "貓", "追", "狗", "[SEP]", "[PAD]"],
        ["[CLS]", "貓", "追", "老", "鼠", "[SEP]"],
    ]
    assert out["attention_mask"].sum(1).tolist() == [5, 6]
    assert trained.decode(trained.encode("貓追狗")) == "貓追狗"
    # Each character starts a word; a Latin word after one keeps its '▁' piece.
    assert trained.word_start[trained.encode("貓追狗")].all()
    assert [trained.id_to_piece(i) for i in trained.encode("the 貓 whale")][-2:] == ["貓", "\u2581whale"]


def test_every_cjk_character_of_the_text_gets_a_piece_however_rare(tmp_path):
    text_file = tmp_path / "text.txt"
    # Simplified text, and once each a traditional character (貓) and a rare extension-A one (㐀).
    text_file.write_text(english_text() + "猫追狗。\n" * 50 + "貓\n㐀。\n", encoding="utf-8")
    tok = tokenizer_lib.load(tokenizer_lib.train([str(text_file)], 400, str(tmp_path / "out")))
    for char in "猫貓追狗㐀":
        assert [tok.id_to_piece(i) for i in tok.encode(char)] == [char]
    # A character the text did not have falls back to bytes, as before, with no stand-alone '▁' before them.
    assert all(tok.id_to_piece(i).startswith("<0x") for i in tok.encode("象"))


def test_too_small_a_vocabulary_for_the_characters_is_one_line(tmp_path, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text("".join(chr(0x4E00 + i) for i in range(200)) + "。\n" + english_text(50), encoding="utf-8")
    assert cli.main(["tokenizer", "train", "--input", str(text_file), "--vocab-size", "400", "--out", str(tmp_path / "out")]) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("reading ")]  # tqdm's progress
    assert len(error) == 1 and error[0].startswith("bertjax tokenizer: ") and "text.txt has 206 distinct CJK characters" in error[0]
    assert error[0].endswith("set model.vocab_size (or --vocab-size) to at least 512, not 400")


def test_tokenizers_trained_per_ideograph_encode_as_they_were_trained(tmp_path):
    """Models trained on text with spaces around each ideograph (before TRAINING_VERSION 2) learned
    '▁貓' pieces; they still get such text, so that they encode as they did."""
    spm = pytest.importorskip("sentencepiece")
    text_file = tmp_path / "split.txt"
    text_file.write_text(tokenizer_lib.split_cjk(english_text() + "貓追狗。貓追老鼠。狗追貓。\n" * 200), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(tmp_path / "old"), model_type="bpe", vocab_size=340, pad_id=0, unk_id=1,
                                   bos_id=-1, eos_id=-1, pad_piece="[PAD]", unk_piece="[UNK]", user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
                                   byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    old = tokenizer_lib.load(tmp_path / "old.model")
    assert old.splits_cjk
    ids = old.encode("the 貓追狗")
    assert ids == old.processor.encode(tokenizer_lib.split_cjk("the 貓追狗"))
    assert [old.id_to_piece(i) for i in ids][-3:] == ["\u2581貓", "\u2581追", "\u2581狗"]
    assert old.decode(ids) == "the 貓追狗"


def test_save_and_load(trained, tmp_path):
    path = trained.save(tmp_path / "copy")
    again = tokenizer_lib.load(path)
    assert again.encode("the white whale") == trained.encode("the white whale")
    assert tokenizer_lib.load(tmp_path / "copy").vocab_size == trained.vocab_size


def test_cli_train_and_bpe(tmp_path, capsys):
    text_file = tmp_path / "a.txt"
    text_file.write_text(english_text(200, seed=1), encoding="utf-8")
    cli.main(["tokenizer", "train", "--input", str(text_file), "--vocab-size", "350", "--out", str(tmp_path / "bpe"), "--model-type", "bpe"])
    path = capsys.readouterr().out.strip().splitlines()[-1]
    tok = tokenizer_lib.load(path)
    assert tok.mask_id == 4 and tok.decode(tok.encode("the white whale")) == "the white whale"


def test_bad_inputs(tmp_path, caplog):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(tokenizer_lib.TokenizerError, match="no text"):
        tokenizer_lib.train([str(empty)], 400, str(tmp_path / "e"))
    with pytest.raises(tokenizer_lib.TokenizerError, match="too small"):
        tokenizer_lib.train([str(empty)], 100, str(tmp_path / "e"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(english_text(200).encode("utf-8") + "caf\xe9 na\xefve\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        tokenizer_lib.train([str(latin1)], 350, str(tmp_path / "l"))
    assert any("latin1.txt is not valid UTF-8" in r.message and "replaced 2" in r.message for r in caplog.records)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\nthe\nwhale\n")
    with pytest.raises(tokenizer_lib.TokenizerError, match=r"lacks the special tokens \['\[SEP\]', '\[MASK\]'\]"):
        tokenizer_lib.load(vocab)
    with pytest.raises(tokenizer_lib.TokenizerError, match="does not exist"):
        tokenizer_lib.load(tmp_path / "missing.model")


def test_wordpiece_trainer_writes_a_vocab_that_transformers_reads_alike(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    text_file = tmp_path / "a.txt"
    text_file.write_text(english_text(300) + "Naïve CAFÉ harpooneers, 1996-08-30!\n" * 5 + "貓\n", encoding="utf-8")
    assert cli.main(["tokenizer", "train", "--input", str(text_file), "--vocab-size", "350", "--out", str(tmp_path / "wp"), "--model-type", "wordpiece"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert path.endswith("vocab.txt")
    ours = tokenizer_lib.load(path)
    assert [ours.id_to_piece(i) for i in range(5)] == list(tokenizer_lib.SPECIAL_TOKENS) and ours.vocab_size <= 350
    assert any(piece.startswith("##") for piece in ours.pieces)
    texts = ["The White whales, sailing!", "naive cafe HARPOONEERS 1996-08-30", "貓追狗 unknownword 😀"]
    pairs = ["whales sail.", "the sea", "狗"]
    for theirs in (transformers.BertTokenizer(path, do_lower_case=True), transformers.BertTokenizer.from_pretrained(str(tmp_path / "wp"))):
        for text in texts:
            assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
        expected = theirs(texts, pairs, max_length=12, truncation="longest_first", padding="longest", return_tensors="np")
        got = ours.encode_batch(texts, pairs=pairs, max_length=12)
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            np.testing.assert_array_equal(got[key], expected[key])
    assert ours.encode("貓") != [ours.unk_id] and ours.encode("象") == [ours.unk_id]


def test_a_corpus_gets_a_wordpiece_tokenizer_with_data_tokenizer_type(tmp_path):
    from bertjax import config as config_lib

    text_file = tmp_path / "corpus.txt"
    text_file.write_text(english_text(), encoding="utf-8")
    config = config_lib.pretrain_config("tiny")
    config.data.update(dict(corpus=str(text_file), data_dir=str(tmp_path / "cache"), tokenizer_type="wordpiece"))
    config.model.vocab_size = 400
    tok = tokenizer_lib.for_config(config)
    assert isinstance(tok, tokenizer_lib.WordPieceTokenizer) and tok.path.endswith("vocab.txt") and tok.vocab_size <= 400
    assert tok.encode("the whale 貓") == [tok.pieces.index("the"), tok.pieces.index("whale"), tok.pieces.index("貓")]
    assert tokenizer_lib.for_config(config).path == tok.path  # trained once, then reused


def test_wordpiece_vocab_tokenizes_as_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "whale", "white", "sea", "##s", "##ing", "sail", ",", ".", "!", "貓", "追", "狗", "harp", "##oon", "##er", "é"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(pieces) + "\n")
    ours = tokenizer_lib.load(vocab)
    theirs = transformers.BertTokenizer(str(vocab), do_lower_case=True)
    assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.mask_id) == (0, 2, 3, 4)
    texts = ["The White whales, sailing!", "Harpooners sail the SEA.", "貓追狗 unknownword"]
    pairs = ["whales sail.", "the sea", "狗"]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    expected = theirs(texts, pairs, max_length=10, truncation="longest_first", padding="longest", return_tensors="np")
    got = ours.encode_batch(texts, pairs=pairs, max_length=10)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(got[key], expected[key])
    assert ours.word_start[ours.encode("harpooner")].tolist() == [True, False, False]


def test_a_corpus_directory_holding_the_temporary_directory_is_read_once(tmp_path, monkeypatch):
    """`--config.data.corpus=/tmp`: the tokenizer writes its input to a scratch file before training;
    where that file lies inside the corpus directory (the system's temporary directory), reading the
    corpus must not pick it up and grow it from itself."""
    from bertjax.data import corpus

    text = tmp_path / "corpus" / "text.txt"
    text.parent.mkdir()
    rng = np.random.default_rng(0)
    text.write_text("\n\n".join(" ".join(f"{' '.join(rng.choice(WORDS, 8))} {i}." for i in range(j, j + 5)) for j in range(0, 3000, 5)) + "\n")
    monkeypatch.setattr("tempfile.tempdir", str(text.parent))  # the system's temporary directory is in the corpus
    source = corpus.Corpus(str(text.parent))
    expected = sum(1 for _ in source.sentences())
    assert expected >= 600 and text.stat().st_size > 100_000  # more than a write buffer: the scratch file has text on disk while the corpus is read

    def sentences():
        for count, sentence in enumerate(source.sentences(), start=1):
            assert count <= expected, "the corpus read the tokenizer's own input file back"
            yield sentence

    path = tokenizer_lib.train_from_sentences(sentences(), 400, tmp_path / "tokenizer")
    assert tokenizer_lib.load(path).vocab_size == 400
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == ["tokenizer.model", "tokenizer.vocab"]  # no scratch left
