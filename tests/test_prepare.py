"""Preparation past memory: chunked reading gives the documents of a whole read, worker processes give
what one process gives, preparers share files (--shard), and the token store reads what an array holds."""

import json
import logging
import pickle

import numpy as np
import pytest

from bertjax import cli
from bertjax.data import corpus
from bertjax.data import tokenizer as tokenizer_lib
from tests.test_corpus import GUTENBERG, WIKITEXT, small_config, write_corpus


def chunked(text, corpus_format, size):
    return list(corpus._parse_stream(corpus._chunks([text], size), corpus_format, "chunked", bool(corpus._GUTENBERG_START.search(text))))


@pytest.mark.parametrize(
    "text, corpus_format, size",
    [
        ("One line.\nTwo line.\n\n" * 40 + "A b.\nC d.\n", "sentences", 50),  # cuts fall between and inside documents
        ("First doc. It has two.\nSecond doc here.\n" * 30, "documents", 64),
        (WIKITEXT * 10, "wikitext", 90),
        (GUTENBERG.replace("\r\n", "\n") * 3, "paragraphs", 150),  # chunks start inside books and between them
        ("word " * 3000, "documents", 1000),  # one line: cut at spaces, still one document
    ],
)
def test_chunked_reading_gives_the_documents_of_a_whole_read(text, corpus_format, size):
    whole = corpus.parse(text, corpus_format)
    assert len(list(corpus._chunks([text], size))) > 3
    pieces = chunked(text, corpus_format, size)
    if corpus_format == "documents" and len(whole) == 1:  # a cut at a space splits no word
        assert len(pieces) == 1 and " ".join(pieces[0]).split() == " ".join(whole[0]).split()
    else:
        assert pieces == whole


def test_a_real_book_read_in_chunks_is_read_whole(shared_data, tmp_path):
    path = tmp_path / "two.txt"
    path.write_bytes((shared_data / "corpus" / "moby-dick.txt").read_bytes() * 2)
    text = corpus.read_text(path)
    whole = corpus.parse(text, "auto")
    assert list(corpus.read_documents(path, "auto")) == whole  # one chunk per 4 MB
    assert chunked(text, "auto", 1 << 16) == whole  # 40 chunks


def tokens_of(prepared):
    return {split: (np.asarray(docs.tokens), np.asarray(docs.sentence_offsets), docs.document_offsets, docs.ids) for split, docs in prepared.items()}


def assert_same_prepared(a, b):
    for split in a:
        for x, y in zip(tokens_of(a)[split], tokens_of(b)[split]):
            np.testing.assert_array_equal(x, y)


def test_worker_processes_prepare_what_one_process_prepares(tmp_path, monkeypatch):
    files = [write_corpus(tmp_path / f"part{i}.txt", documents=40, seed=i) for i in range(2)]
    config = small_config(tmp_path, files)
    tok = tokenizer_lib.for_config(config)
    inline = corpus.prepare(config, tok)
    monkeypatch.setattr(corpus, "_POOL_BYTES", 0)
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 500)  # many chunks per file, a document open across each cut
    config.data.data_dir = str(tmp_path / "pool-cache")
    pooled = corpus.prepare(config, tok)
    assert inline["train"].num_documents + inline["eval"].num_documents == 80
    assert_same_prepared(inline, pooled)


def test_preparers_share_the_files_and_a_changed_file_alone_is_redone(tmp_path, monkeypatch, caplog, capsys):
    files = [write_corpus(tmp_path / f"part{i}.txt", documents=15, seed=i) for i in range(3)]
    config = small_config(tmp_path, files)
    model = tokenizer_lib.for_config(config).path
    monkeypatch.setenv("BERTJAX_DATA_DIR", str(tmp_path / "shared-cache"))
    argv = ["data", "prepare", f"--config.data.corpus={','.join(map(str, files))}", f"--config.data.tokenizer={model}", "--config.data.eval_fraction=0.2"]
    for shard in ("0/2", "1/2"):
        assert cli.main([*argv, f"--shard={shard}"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"shard": shard, "corpus": ",".join(map(str, files))}
    units = sorted((tmp_path / "shared-cache" / "corpora" / "units").iterdir())
    assert len(units) == 3 and all((unit / "done").exists() for unit in units)
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_documents"] + summary["eval_documents"] == 45 and summary["train_instances"] > 0
    assert any("reusing the prepared" in r.getMessage() for r in caplog.records)
    # The same as one preparer alone.
    alone = small_config(tmp_path, files, tokenizer=model, data_dir=str(tmp_path / "alone"))
    config.data.update(tokenizer=model, data_dir=str(tmp_path / "shared-cache"))
    tok = tokenizer_lib.load(model)
    assert_same_prepared(corpus.prepare(config, tok), corpus.prepare(alone, tok))
    # A changed file is prepared anew; the others are reused.
    write_corpus(files[1], documents=20, seed=7)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        changed = corpus.prepare(config, tok)
    assert any("preparing 1 of the 3 file(s)" in r.getMessage() for r in caplog.records)
    assert changed["train"].num_documents + changed["eval"].num_documents == 50
    assert cli.main([*argv, "--shard=2/2"]) == 1
    assert "--shard '2/2': give I/N with 0 <= I < N" in capsys.readouterr().err


def test_an_interrupted_preparation_is_not_taken_for_a_finished_one(tmp_path):
    text_file = write_corpus(tmp_path / "corpus.txt")
    config = small_config(tmp_path, [text_file])
    tok = tokenizer_lib.for_config(config)
    first = corpus.prepare(config, tok)
    (unit,) = (tmp_path / "cache" / "corpora" / "units").iterdir()
    (unit / "done").unlink()  # as a run killed before its last write leaves it
    (unit / "tokens.bin").write_bytes(b"")
    again = corpus.prepare(config, tok)
    assert (unit / "done").exists()
    assert_same_prepared(first, again)


def test_the_token_store_reads_what_the_concatenated_array_holds(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 30000, size, dtype=np.int32) for size in (1000, 0, 5, 3000)]
    paths = []
    for number, part in enumerate(parts):
        paths.append(tmp_path / f"{number}.bin")
        paths[-1].write_bytes(part.tobytes())
    store = corpus.TokenStore(paths)
    whole = np.concatenate(parts)
    assert len(store) == len(whole)
    np.testing.assert_array_equal(np.asarray(store), whole)
    np.testing.assert_array_equal(store[990:1010], whole[990:1010])  # across the empty file and the 5-token one
    segments = np.concatenate([np.arange(s, s + n) for s, n in zip(rng.integers(0, len(whole) - 50, 40), rng.integers(1, 50, 40))])
    for index in (segments, segments.reshape(-1, 1)[::-1], rng.integers(0, len(whole), (7, 9)), np.array([1004, 1004, 0, 4004])):
        np.testing.assert_array_equal(store[index], whole[index])
    # Pickled (to grain's worker processes) it maps the files again: the pickle holds no token.
    blob = pickle.dumps(store)
    assert len(blob) < whole.nbytes // 4
    np.testing.assert_array_equal(pickle.loads(blob)[segments], whole[segments])
