"""Corpora: formats (BERT sentences, documents, Gutenberg paragraphs, WikiText), auto-detection, bad input, caching."""

import json
import logging

import numpy as np
import pytest

from bertjax import config as config_lib
from bertjax.data import corpus
from bertjax.data import tokenizer as tokenizer_lib

GUTENBERG = (
    "\ufeffThe Project Gutenberg EBook of A Test, by Nobody\r\n\r\nLicence text here.\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK A TEST ***\r\n\r\n"
    "CHAPTER 1. The Start.\r\n\r\nIt was a dark night. The ship rolled\r\nand the men slept.\r\n\r\n"
    "Mr. Starbuck woke up! Was it morning?\r\n\r\n"
    "CHAPTER 2. The End.\r\n\r\nThe whale\r\nswam away. Nobody saw it.\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK A TEST ***\r\n\r\nMore licence text. Donate.\r\n"
)
WIKITEXT = (
    " \n = Homarus gammarus = \n \n Homarus gammarus is a lobster . It lives in the sea . \n"
    " \n = = Description = = \n \n It is blue . \n \n = Second article = \n \n Another text here . Second sentence . \n"
)


def test_sentences_and_documents_formats():
    assert corpus.parse("A b.\nC d.\n\n\nE f.\n", "sentences") == [["A b.", "C d."], ["E f."]]
    assert corpus.parse("One. Two!\nThree?\n", "documents") == [["One.", "Two!"], ["Three?"]]
    with pytest.raises(corpus.CorpusError, match="corpus_format='xml'"):
        corpus.parse("text", "xml")


def test_sentence_splitting_respects_abbreviations():
    assert corpus.split_sentences("Mr. Smith went\nhome. He slept (soundly). \"Yes,\" she said. 3 more.") == [
        "Mr. Smith went home.",
        "He slept (soundly).",
        '"Yes," she said.',
        "3 more.",
    ]


def test_gutenberg_header_footer_removed_and_chapters_are_documents(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(GUTENBERG.encode("utf-8"))
    text = corpus.read_text(path)
    assert "\r" not in text and not text.startswith("\ufeff")
    assert corpus.detect_format(text) == "paragraphs"
    documents = corpus.parse(text, "auto", str(path))
    assert documents == [
        ["It was a dark night.", "The ship rolled and the men slept.", "Mr. Starbuck woke up!", "Was it morning?"],
        ["The whale swam away.", "Nobody saw it."],
    ]


def test_wikitext_articles_are_documents():
    assert corpus.detect_format(WIKITEXT) == "wikitext"
    assert corpus.parse(WIKITEXT, "auto") == [
        ["Homarus gammarus is a lobster .", "It lives in the sea .", "It is blue ."],
        ["Another text here .", "Second sentence ."],
    ]


def test_auto_detects_sentences_and_documents():
    assert corpus.detect_format("One sentence.\nAnother one.\n\nA new document.\n") == "sentences"
    assert corpus.detect_format("A whole document. With two sentences.\nAnother document.\n") == "documents"
    assert corpus.detect_format("A hard-wrapped paragraph that\ngoes on over lines and\nends here.\n\nAnother paragraph\nof text.\n") == "paragraphs"


def test_real_corpora_are_detected_and_split(shared_data):
    moby = corpus.read_text(shared_data / "corpus" / "moby-dick.txt")
    assert corpus.detect_format(moby) == "paragraphs"
    chapters = corpus.parse(moby, "auto")
    assert 130 <= len(chapters) <= 150  # 135 chapters, the epilogue, etymology/extracts
    assert not any("End of Project Gutenberg" in s or "*** START" in s for d in chapters for s in d)
    assert any(d[0].startswith("Call me Ishmael") for d in chapters)  # chapter 1 is a document of its own
    wiki = corpus.read_text(shared_data / "corpus" / "wikitext-2-valid.tokens.txt")
    articles = corpus.parse(wiki, "auto")
    assert len(articles) == 60 and articles[0][0].startswith("Homarus gammarus , known as the European lobster")


def test_encodings_are_decoded_and_reported(tmp_path, caplog):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Good text here.\r\nCaf\u00e9 and na\u00efve.\r\n".encode("latin-1"))
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes("Caf\u00e9 is UTF-8.\n".encode() + b"One bad \xff byte.\n")
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("Hello w\u00f6rld.\n".encode("utf-16"))
    with caplog.at_level(logging.WARNING):
        assert corpus.read_text(latin) == "Good text here.\nCaf\u00e9 and na\u00efve.\n"
        assert corpus.read_text(mixed) == "Caf\u00e9 is UTF-8.\nOne bad \ufffd byte.\n"
        assert corpus.read_text(utf16) == "Hello w\u00f6rld.\n"
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(latin) in m and "read as Windows-1252 (2 non-ASCII bytes)" in m for m in messages)
    assert any(str(mixed) in m and "first bad byte at offset 24" in m and "replaced 1 " in m for m in messages)


def test_binary_files_are_refused_by_name_or_skipped_in_a_directory(tmp_path, caplog):
    png = tmp_path / "images" / "logo.png"
    png.parent.mkdir()
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    noise = tmp_path / "images" / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(corpus.CorpusError, match=f"^{png} is not a text file \\(it has NUL bytes\\): remove it from config.data.corpus$"):
        corpus.Corpus(str(png)).documents()
    with pytest.raises(corpus.CorpusError, match=r"'.*images' holds no text file \(2 binary: .*logo.png, .*noise.bin\)$"):
        corpus.Corpus(str(png.parent)).documents()
    (png.parent / "notes.txt").write_text("A sentence here. And another one.\n")
    (png.parent / ".hidden.txt").write_text("Not part of the corpus.\n")
    with caplog.at_level(logging.WARNING):
        assert corpus.Corpus(str(png.parent)).documents() == [["A sentence here.", "And another one."]]
    assert any("skipped 2 binary file(s)" in r.getMessage() for r in caplog.records)
    assert corpus.binary_reason(b"Plain text.\n" + b"\x07" * 10) == "45% of its first 22 bytes are control characters"


def test_empty_inputs_and_unmatched_globs_name_the_input(tmp_path, caplog):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(corpus.CorpusError, match=f"holds no text: {empty} is empty or blank$"):
        corpus.Corpus(str(empty)).documents()
    text = write_corpus(tmp_path / "text.txt", documents=3)
    with caplog.at_level(logging.WARNING):
        assert len(corpus.Corpus(f"{empty},{text}").documents()) == 3
    assert any("1 file(s) hold no text" in r.getMessage() and str(empty) in r.getMessage() for r in caplog.records)
    with pytest.raises(corpus.CorpusError, match=r"config.data.corpus: '.*nothing\*.txt' matches no file$"):
        corpus.Corpus(str(tmp_path / "nothing*.txt")).files()
    with pytest.raises(corpus.CorpusError, match="matches no file \\(relative paths are read from "):
        corpus.Corpus("no/such/dir/*.txt").files()
    (tmp_path / "hollow").mkdir()
    with pytest.raises(corpus.CorpusError, match="directory '.*hollow' holds no file$"):
        corpus.Corpus(str(tmp_path / "hollow")).files()
    with pytest.raises(corpus.CorpusError, match="config.data.corpus is empty"):
        corpus.Corpus("").files()


def test_flat_sentences_file_is_one_document_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        documents = corpus.parse("Line one.\nLine two.\nLine three.\n", "sentences", "flat.txt")
    assert documents == [["Line one.", "Line two.", "Line three."]]
    assert any("flat.txt has no blank line" in r.getMessage() and "ONE document of 3 sentences" in r.getMessage() for r in caplog.records)


def test_a_line_without_newline_or_punctuation_becomes_bounded_pseudo_sentences(tmp_path, caplog):
    """A dump on one line (here 2 MB; 50 MB is measured in the README) is cut, counted, and loses no word."""
    words = np.array("sea whale ship captain storm night oil boat mast rope deck".split())
    line = " ".join(np.random.default_rng(0).choice(words, 400_000))
    path = tmp_path / "one-line.txt"
    path.write_text(line)
    with caplog.at_level(logging.INFO):
        (document,) = corpus.Corpus(str(path)).documents()
    assert max(len(s) for s in document) <= corpus.MAX_SENTENCE_CHARS
    assert len(document) >= len(line) // corpus.MAX_SENTENCE_CHARS
    assert " ".join(document).split() == line.split()
    assert any(
        "cut 1 paragraph(s) longer than 65536 characters" in m and f"into {len(document)} pseudo-sentences" in m
        for m in (r.getMessage() for r in caplog.records)
    )
    # Punctuated text keeps its sentences; only the one at each 64K cut is split in two.
    text = "The whale swam away. " * 20_000
    assert 20_000 <= len(corpus.parse(text, "documents")[0]) <= 20_000 + len(text) // corpus.MAX_PARAGRAPH_CHARS


def test_concatenated_gutenberg_books_are_all_kept(tmp_path, caplog):
    three = tmp_path / "three.txt"
    three.write_bytes(GUTENBERG.encode() * 3)
    with caplog.at_level(logging.INFO):
        documents = corpus.Corpus(str(three)).documents()
    assert len(documents) == 6 and documents[2:4] == documents[:2] == documents[4:]
    assert any(
        f"{three}: read as corpus_format=paragraphs (auto): 3 Project Gutenberg book(s)" in m and "6 documents, 18 sentences" in m
        for m in (r.getMessage() for r in caplog.records)
    )
    assert not any("licence" in s.lower() or "donate" in s.lower() for d in documents for s in d)


def test_five_copies_of_moby_dick_give_five_times_the_documents(shared_data, tmp_path):
    moby = (shared_data / "corpus" / "moby-dick.txt").read_bytes()
    five = tmp_path / "five.txt"
    five.write_bytes(moby * 5)
    one = corpus.parse(corpus.read_text(shared_data / "corpus" / "moby-dick.txt"), "auto")
    assert len(corpus.parse(corpus.read_text(five), "auto")) == 5 * len(one)


def test_python_docs_corpus_reads_docstrings():
    files = corpus._python_docs_files()
    assert len(files) > 100 and not any("test" in f.parts for f in files)
    json_module = next(f for f in files if f.parts[-2:] == ("json", "__init__.py"))
    sentences = corpus._python_docs_document(json_module)
    assert any("JSON" in s for s in sentences) and not any(s.startswith(">>>") for s in sentences)


def small_config(tmp_path, text_files, **data):
    config = config_lib.pretrain_config("tiny")
    config.model.vocab_size = 400
    config.data.corpus = ",".join(str(f) for f in text_files)
    config.data.data_dir = str(tmp_path / "cache")
    config.data.eval_fraction = 0.2
    config.data.update(data)
    return config


def write_corpus(path, documents=20, seed=0):
    rng = np.random.default_rng(seed)
    words = "sea whale ship captain storm night oil boat mast rope deck".split()
    blocks = []
    for _ in range(documents):
        blocks.append("\n".join(" ".join(rng.choice(words, size=rng.integers(3, 9))).capitalize() + "." for _ in range(rng.integers(2, 6))))
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def test_prepare_tokenizes_once_caches_and_holds_out_documents(tmp_path, caplog):
    text_file = write_corpus(tmp_path / "corpus.txt")
    config = small_config(tmp_path, [text_file])
    tok = tokenizer_lib.for_config(config)
    assert str(tmp_path / "cache" / "tokenizers") in tok.path
    prepared = corpus.prepare(config, tok)
    documents = corpus.parse(corpus.read_text(text_file), "auto")
    assert prepared["train"].num_documents + prepared["eval"].num_documents == len(documents) == 20
    assert prepared["eval"].num_documents == 4
    # The cache holds the token ids of each sentence, in corpus order.
    train_texts = {" ".join(d) for d in documents}
    for split in ("train", "eval"):
        docs = prepared[split]
        for d in docs.ids:
            sentences = [
                tok.decode(docs.tokens[docs.sentence_offsets[s] : docs.sentence_offsets[s + 1]])
                for s in range(docs.document_offsets[d], docs.document_offsets[d + 1])
            ]
            assert " ".join(sentences) in train_texts
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = corpus.prepare(config, tok)
        assert tokenizer_lib.for_config(config).path == tok.path
    assert any("reusing the prepared" in r.message for r in caplog.records)
    assert any("reusing the tokenizer" in r.message for r in caplog.records)
    np.testing.assert_array_equal(again["train"].tokens, prepared["train"].tokens)
    # A changed file is prepared anew.
    write_corpus(text_file, documents=25, seed=1)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        changed = corpus.prepare(config, tok)
    assert not any("reusing the prepared" in r.message for r in caplog.records)
    assert changed["train"].num_documents + changed["eval"].num_documents == 25


def test_separate_eval_corpus(tmp_path):
    train_file = write_corpus(tmp_path / "train.txt", documents=10)
    eval_file = write_corpus(tmp_path / "eval.txt", documents=3, seed=2)
    config = small_config(tmp_path, [train_file], eval_corpus=str(eval_file))
    prepared = corpus.prepare(config, tokenizer_lib.for_config(config))
    assert (prepared["train"].num_documents, prepared["eval"].num_documents) == (10, 3)


def test_tfds_text_dataset_by_name(tmp_path):
    """'tfds:NAME' reads any registered TFDS text data set (here a tiny local one; Wikipedia works alike)."""
    import tensorflow_datasets as tfds

    class BertjaxTestTexts(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()}), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield 0, {"body": "First article. It has two sentences.\nAnd a second paragraph."}
            yield 1, {"body": "Second article here."}

    BertjaxTestTexts(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = corpus.Corpus("tfds:bertjax_test_texts", tfds_text_key="body", tfds_data_dir=str(tmp_path))
    assert source.documents() == [["First article.", "It has two sentences.", "And a second paragraph."], ["Second article here."]]
    with pytest.raises(corpus.CorpusError, match="no feature 'text'"):
        corpus.Corpus("tfds:bertjax_test_texts", tfds_data_dir=str(tmp_path)).documents()


SPEAKERS = ("First Citizen", "Second Citizen", "MENENIUS", "All", "MARCIUS", "COMINIUS", "VOLUMNIA", "Messenger")


def play_like(shared_data, path, size=1_000_000, seed=0):
    """A play no reader was tuned for: speaker lines ("First Citizen:"), a blank line between speeches,
    no Gutenberg markers, no headings. Its lines are the real novels' lines, shuffled into speeches."""
    lines = [
        line.strip()
        for name in ("moby-dick.txt", "pride-and-prejudice.txt")
        for line in corpus.read_text(shared_data / "corpus" / name).split("\n")
        if len(line.strip()) > 20 and "gutenberg" not in line.lower()
    ]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lines))
    speeches, total, cursor = [], 0, 0
    while total < size:
        count = int(rng.integers(1, 9))
        body = [lines[order[(cursor + k) % len(lines)]] for k in range(count)]
        cursor += count
        speeches.append(SPEAKERS[int(rng.integers(len(SPEAKERS)))] + ":\n" + "\n".join(body))
        total += len(speeches[-1]) + 2
    path.write_text("\n\n".join(speeches) + "\n")
    return path


def test_a_play_works_with_every_objective_and_the_default_config(shared_data, tmp_path, monkeypatch, caplog, capsys):
    from bertjax import cli

    play = play_like(shared_data, tmp_path / "play.txt")
    text = corpus.read_text(play)
    assert len(text) > 900_000 and corpus.detect_format(text) == "paragraphs"
    (document,) = corpus.parse(text, "auto")  # no heading: one document, too few for NSP and the eval split
    monkeypatch.setenv("BERTJAX_DATA_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO):
        for objective in ("nsp", "sop", "none"):
            for split in ("train", "eval"):
                argv = ["data", "stats", f"--config.data.corpus={play}", f"--config.data.sentence_objective={objective}", "--batches=2", f"--split={split}"]
                assert cli.main(argv) == 0, capsys.readouterr().err
                stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
                assert stats["batches"] == 2 and abs(stats["chosen_fraction"] - 0.15) < 0.03
                if objective != "none":
                    assert 0 < stats["sentence_label_1_fraction"] < 1
    window = len(document) // 100
    cut = [r.getMessage() for r in caplog.records if "pseudo-documents" in r.getMessage()]
    assert len(cut) == 1  # prepared once, reused by every objective
    assert f"has 1 document(s), too few for NSP and the eval split (it needs 50): cut 1 document(s) longer than {window} sentences" in cut[0]
    assert f"now {-(-len(document) // window)} documents" in cut[0]


def test_pseudo_documents_cut_only_when_too_few_and_keep_every_sentence(caplog):
    sentences = [f"Sentence {i}." for i in range(1000)]
    assert corpus.minimum_documents(0.02) == 50 and corpus.minimum_documents(0.5) == 4 and corpus.minimum_documents(0.0) == 2
    with caplog.at_level(logging.WARNING):
        pieces = corpus.pseudo_documents([sentences, ["A short one.", "Two."]], 50, "corpus 'x'")
    assert len(pieces) == 101 and pieces[-1] == ["A short one.", "Two."]
    assert [s for piece in pieces[:-1] for s in piece] == sentences and {len(p) for p in pieces[:-1]} == {10}
    assert any("corpus 'x' has 2 document(s)" in r.getMessage() and "now 101 documents" in r.getMessage() for r in caplog.records)
    enough = [sentences[i : i + 20] for i in range(0, 1000, 20)]
    assert corpus.pseudo_documents(enough, 50, "y") is enough
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        short = [["One.", "Two."], ["Three."]]
        assert corpus.pseudo_documents(short, 4, "corpus 'z'") == short  # nothing long enough to cut: said, not hidden
    assert any("corpus 'z' has 2 document(s) of 3 sentences in all, fewer than the 4" in r.getMessage() for r in caplog.records)


def test_tokenizer_and_model_vocabulary_sizes_that_disagree(tmp_path, monkeypatch, caplog, capsys):
    from bertjax import cli

    text_file = write_corpus(tmp_path / "corpus.txt", documents=60)
    model = tokenizer_lib.train([str(text_file)], 400, str(tmp_path / "tok"))
    size = tokenizer_lib.load(model).vocab_size
    monkeypatch.setenv("BERTJAX_DATA_DIR", str(tmp_path / "cache"))
    argv = ["data", "stats", f"--config.data.corpus={text_file}", f"--config.data.tokenizer={model}", "--batches=1", "--config.data.eval_fraction=0.1"]
    assert cli.main([*argv, f"--config.model.vocab_size={size - 10}"]) == 1
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("bertjax data: tokenizer "), error
    assert f"has {size} pieces but config.model.vocab_size={size - 10}" in error and f"--config.model.vocab_size={size}" in error
    assert "Traceback" not in stderr
    with caplog.at_level(logging.WARNING):
        assert cli.main([*argv, f"--config.model.vocab_size={size + 100}"]) == 0
    assert any(
        f"has {size} pieces but config.model.vocab_size={size + 100}: 100 embedding rows are never used" in r.getMessage()
        for r in caplog.records
    )
