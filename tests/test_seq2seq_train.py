"""Seq2seq denoising in the one trainer (`data.noising` switches the objective): the loss against
optax's label smoothing, exact resume, the one-line config errors, and a CLI run whose loss falls
and whose workdir `bertjax generate` reads."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bertjax import checkpoint_io, cli
from bertjax import config as config_lib
from bertjax import models
from bertjax.config import ConfigError
from bertjax.train import pretrain
from tests.test_pretrain import assert_trees_equal, logged

pytestmark = pytest.mark.usefixtures("compilation_cache")

# configs/seq2seq.py:tiny shrunk further: one layer each side, hidden 32, a 1000-piece vocabulary.
SHRINK = dict(num_layers=1, num_decoder_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=1000)


def tiny_config(shared_data, **train):
    config = config_lib.load("configs/seq2seq.py:tiny")
    config.model.update(SHRINK)
    config.data.update(corpus=str(shared_data / "corpus" / "moby-dick.txt"), max_seq_length=32)
    config.train.update(batch_size=8, total_steps=6, log_every=1, eval_every=3, eval_batches=1, progress=False)
    config.train.update(train)
    config.optim.update(warmup_steps=2, lr=3e-3)
    config.checkpoint.update(every=3, keep=1)
    return config


def test_loss_is_the_weighted_token_cross_entropy_with_optax_label_smoothing():
    """loss_sums' closed form against optax.smooth_labels on a one-hot; nll and accuracy unsmoothed."""
    config = config_lib.load("configs/seq2seq.py:tiny")
    config.model.update(SHRINK, vocab_size=50, hidden_dropout=0.0, attention_dropout=0.0)
    model = models.Seq2Seq(models.Seq2SeqConfig.from_config(config.model))
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 50, (3, 7)).astype(np.int32)
    weights = (np.arange(7)[None] < np.array([[7], [4], [1]])).astype(np.int32)
    batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), decoder_input_ids=np.roll(ids, 1, 1), decoder_attention_mask=weights, labels=ids, label_weights=weights)
    params = model.init(jax.random.key(0), ids, batch["attention_mask"], batch["decoder_input_ids"])["params"]
    logits = model.apply({"params": params}, ids, batch["attention_mask"], batch["decoder_input_ids"], weights).logits
    for smoothing in (0.0, 0.1):
        sums = pretrain.loss_sums(model, params, batch, deterministic=True, label_smoothing=smoothing)
        targets = optax.smooth_labels(jax.nn.one_hot(ids, 50), smoothing)
        expected = np.sum(optax.softmax_cross_entropy(logits, targets) * weights)
        np.testing.assert_allclose(sums["token_loss"], expected, rtol=1e-5)
        np.testing.assert_allclose(sums["token_nll"], np.sum(optax.softmax_cross_entropy_with_integer_labels(logits, ids) * weights), rtol=1e-5)
        assert sums["token_weight"] == 12 and sums["token_correct"] == np.sum((np.argmax(logits, -1) == ids) * weights)
        np.testing.assert_allclose(pretrain.means(sums)["loss"], expected / 12, rtol=1e-5)
        config.train.label_smoothing = smoothing  # the trainer's steps read it from the config
        np.testing.assert_allclose(pretrain.make_eval_step(model, config)(params, batch)["token_loss"], expected, rtol=1e-5)
    assert pretrain.normalisers(batch) == {"token_loss": jnp.float32(12)}


@pytest.fixture(scope="module")
def uninterrupted(shared_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seq2seq_uninterrupted")
    config = tiny_config(shared_data)
    return workdir, config, pretrain.train_and_evaluate(config, workdir)


def test_resume_is_exact(shared_data, tmp_path, uninterrupted):
    workdir, _, summary = uninterrupted
    assert set(summary) >= {"loss", "nll", "token_accuracy", "eval/loss", "eval/nll", "eval/token_accuracy"}
    assert not any(key.startswith(("mlm", "sentence", "eval/mlm", "eval/nsp", "eval/sop")) for key in summary)
    first = pretrain.train_and_evaluate(tiny_config(shared_data, run_steps=4), tmp_path)
    assert first["step"] == 4 and first["stopped_by"] == "train.run_steps"
    second = pretrain.train_and_evaluate(tiny_config(shared_data), tmp_path)
    assert second["step"] == 6 and second["tokens_seen"] == 6 * 8 * 32
    assert logged(tmp_path) == logged(workdir) and [step for step, _ in logged(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert logged(tmp_path, "eval/loss") == logged(workdir, "eval/loss") != []
    _, resumed_params = checkpoint_io.load_params(str(tmp_path))
    _, params = checkpoint_io.load_params(str(workdir))
    assert "decoder" in params
    assert_trees_equal(params, resumed_params)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.model.update(decoder_start_token_id=2), r"config.model.decoder_start_token_id=2 but the seq2seq batches of tokenizer .* use 3: set --config.model.decoder_start_token_id=3"),
        (lambda c: c.train.update(label_smoothing=1.0), r"config.train.label_smoothing=1.0: must be in \[0, 1\)"),
        (lambda c: c.data.update(sentence_objective="sop"), r"config.data.sentence_objective='sop'"),
        (lambda c: c.model.unlock().__delitem__("num_decoder_layers"), r"config.data.noising asks for seq2seq denoising but config.model has no decoder"),
    ],
)
def test_a_mismatched_config_is_a_one_line_error(shared_data, tmp_path, edit, message):
    config = tiny_config(shared_data, total_steps=1)
    edit(config)
    with pytest.raises(ConfigError, match=message) as raised:
        pretrain.train_and_evaluate(config, tmp_path)
    assert "\n" not in str(raised.value)


def test_cli_run_on_real_text_lowers_the_loss_and_generates(shared_data, tmp_path, monkeypatch, capsys):
    """`bertjax pretrain --config configs/seq2seq.py:tiny` on Moby-Dick; then `bertjax generate` reads the run."""
    workdir = tmp_path / "run"
    overrides = [f"--config.model.{key}={value}" for key, value in SHRINK.items()]
    corpus = shared_data / "corpus" / "moby-dick.txt"
    argv = ["pretrain", "--config", "configs/seq2seq.py:tiny", "--workdir", str(workdir), *overrides, f"--config.data.corpus={corpus}"]
    argv += ["--config.data.max_seq_length=32", "--config.train.batch_size=16", "--config.train.total_steps=40", "--config.train.eval_every=40"]
    argv += ["--config.train.eval_batches=2", "--config.train.log_every=5", "--config.train.progress=False", "--config.optim.warmup_steps=5"]
    argv += ["--config.optim.lr=5e-3", "--config.checkpoint.every=40"]
    assert cli.main(argv) == 0
    losses = [loss for _, loss in logged(workdir)]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0, losses
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["eval/loss"] < losses[0] and 0.0 < record["eval/token_accuracy"] < 1.0
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"It is a truth universally acknowledged.\nMr. Darcy\n")))
    assert cli.main(["generate", "--workdir", str(workdir), "--batch-size", "2", "--max-length", "12"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
