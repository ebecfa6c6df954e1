"""Issue 13's bad input through the real CLI: sequences longer than a seq2seq model's position table.

Empty and single-sentence documents are counted repairs of the corruption itself
(tests/test_noising.py: test_empty_single_sentence_and_overlong_documents_are_counted_repairs, and
`bertjax data stats`); `bertjax generate` on an encoder-only run is tests/test_generate.py's
test_generate_on_an_encoder_only_model_names_the_problem. Here: the pretraining length, the generation
length and generation inputs longer than the table.
"""

import io
import logging

import jax
import jax.numpy as jnp
import pytest

from bertjax import cli
from bertjax.convert import hf
from bertjax.models import seq2seq

WORDS = "the a cat dog sat ran on in mat park big small red blue old new".split()
POSITIONS = 16


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    """A random 16-position seq2seq model saved as a HuggingFace BART directory with a WordPiece vocab.txt."""
    directory = tmp_path_factory.mktemp("bart")
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "."]
    config = seq2seq.model_config("tiny")
    config.update(vocab_size=len(pieces), hidden_size=32, num_heads=4, intermediate_size=64, max_position_embeddings=POSITIONS, decoder_start_token_id=3)
    model = seq2seq.Seq2Seq(seq2seq.Seq2SeqConfig.from_config(config))
    ids = jnp.ones((1, 4), jnp.int32)
    hf.save(model, model.init(jax.random.key(0), ids, ids, ids), directory)
    (directory / "vocab.txt").write_text("\n".join(pieces) + "\n")
    return directory


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_pretraining_longer_than_the_position_table_names_both_settings(tmp_path, capsys):
    argv = ["pretrain", "--config", "configs/seq2seq.py:tiny", "--workdir", str(tmp_path / "run"), "--config.data.max_seq_length=600"]
    assert cli.main(argv) == 1
    assert one_line_error(capsys) == "bertjax pretrain: config.data.max_seq_length=600: exceeds model.max_position_embeddings=512"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_generating_past_the_position_table_names_the_flag_and_its_limit(bart_dir, capsys):
    assert cli.main(["generate", "--workdir", str(bart_dir), "--max-length", "40"]) == 1
    assert one_line_error(capsys) == f"bertjax generate: --max-length 40: the model has {POSITIONS} target positions; give at most {POSITIONS + 1}"


def test_inputs_longer_than_the_position_table_are_cut_and_counted(bart_dir, monkeypatch, capsys, caplog):
    lines = ["the cat sat on the mat .", " ".join(WORDS * 2)]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\n".join(lines).encode() + b"\n")))
    with caplog.at_level(logging.WARNING):
        assert cli.main(["generate", "--workdir", str(bart_dir), "--batch-size", "2", "--max-length", "6"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert f"1 of 2 inputs were longer than the model's {POSITIONS} source positions: cut at the end" in caplog.text
