"""train_and_evaluate on real text with a tiny model: exact resume, mesh invariance, NaN stop,
the kept schedule, and shape errors for init_from."""

import json

import jax
import numpy as np
import pytest

from bertjax import config as config_lib
from bertjax import checkpoint_io
from bertjax.errors import UserError
from bertjax.train import pretrain


pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_config(shared_data, **train):
    config = config_lib.pretrain_config("tiny")
    config.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=1000)
    config.data.update(corpus=str(shared_data / "corpus" / "moby-dick.txt"), max_seq_length=32, max_predictions=5, sentence_objective="sop")
    config.train.update(batch_size=8, total_steps=6, log_every=1, eval_every=1000, eval_batches=1, progress=False)
    config.train.update(train)
    config.optim.update(warmup_steps=2, lr=3e-3)
    config.checkpoint.update(every=3, keep=1)
    return config


def logged(workdir, key="loss"):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(record["step"], record[key]) for record in records if key in record]


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(shared_data, tmp_path_factory):
    """Six steps in one go, keeping step 1 and rolling the newest one."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    config = tiny_config(shared_data)
    config.checkpoint.keep_steps = (1,)
    summary = pretrain.train_and_evaluate(config, workdir)
    return workdir, config, summary


def test_resume_is_exact(shared_data, tmp_path, uninterrupted):
    workdir, _, _ = uninterrupted
    config = tiny_config(shared_data, run_steps=3)
    config.checkpoint.keep_steps = (1,)
    first = pretrain.train_and_evaluate(config, tmp_path)
    assert first["step"] == 3 and first["stopped_by"] == "train.run_steps"
    config.train.run_steps = 0
    second = pretrain.train_and_evaluate(config, tmp_path)
    assert second["step"] == 6 and second["tokens_seen"] == 6 * 8 * 32
    assert logged(tmp_path) == logged(workdir)
    assert [step for step, _ in logged(tmp_path)] == [1, 2, 3, 4, 5, 6]
    for key in ("eval/mlm_loss", "eval/sop_accuracy", "eval/nsp_accuracy"):
        assert logged(tmp_path, key) == logged(workdir, key) != []
    _, resumed_params = checkpoint_io.load_params(str(tmp_path))
    _, params = checkpoint_io.load_params(str(workdir))
    assert_trees_equal(params, resumed_params)


def test_kept_schedule_and_index(uninterrupted):
    workdir, config, summary = uninterrupted
    # keep=1 rolled step 3 away; the kept step 1 and the final step 6 stay.
    index = json.loads((workdir / "checkpoints" / "index.json").read_text())
    assert [(entry["step"], entry["kept"]) for entry in index] == [(1, True), (6, False)]
    assert index[-1]["tokens_seen"] == summary["tokens_seen"] == 6 * 8 * 32
    assert index[-1]["config_hash"] == config_lib.config_hash(config)
    assert json.loads((workdir / "config.json").read_text()) == json.loads(config_lib.to_json(config))
    assert sorted(path.name for path in (workdir / "checkpoints").iterdir()) == ["1", "6", "index.json"]
    assert (workdir / "tokenizer").is_dir() and list((workdir / "tensorboard").iterdir())
    _, kept = checkpoint_io.load_params(f"{workdir}:1")
    _, final = checkpoint_io.load_params(str(workdir))
    assert not np.allclose(jax.tree.leaves(kept)[0], jax.tree.leaves(final)[0])


def test_a_smaller_tokenizer_trains_and_a_larger_one_is_a_one_line_error(shared_data, tmp_path, uninterrupted):
    """Sentencepiece can fall short of the asked size on a small corpus: the spare embedding rows go unused.
    A tokenizer with more pieces than the table has ids it cannot look up: refused, naming the value to set."""
    workdir, _, _ = uninterrupted
    tokenizer_dir = str(workdir / checkpoint_io.TOKENIZER)
    roomy = tiny_config(shared_data, total_steps=2)
    roomy.data.tokenizer = tokenizer_dir
    roomy.model.vocab_size = 1100
    assert pretrain.train_and_evaluate(roomy, tmp_path / "roomy")["step"] == 2
    cramped = tiny_config(shared_data, total_steps=2)
    cramped.data.tokenizer = tokenizer_dir
    cramped.model.vocab_size = 900
    with pytest.raises(UserError, match=r"tokenizer .* has 1000 pieces but config.model.vocab_size=900; set --config.model.vocab_size=1000"):
        pretrain.train_and_evaluate(cramped, tmp_path / "cramped")


def test_same_losses_on_every_mesh(shared_data, tmp_path):
    losses = {}
    for shape in ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 1)):
        config = tiny_config(shared_data, run_steps=3, eval_batches=0)
        config.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
        pretrain.train_and_evaluate(config, tmp_path / "x".join(map(str, shape)))
        losses[shape] = [loss for _, loss in logged(tmp_path / "x".join(map(str, shape)))]
    reference = losses[(1, 1, 1)]
    assert len(reference) == 3 and reference[-1] < reference[0]
    for shape, values in losses.items():
        np.testing.assert_allclose(values, reference, rtol=2e-5, err_msg=f"mesh {shape}")


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(shared_data, tmp_path):
    config = tiny_config(shared_data, inject_nan_at_step=5, log_every=2)
    config.data.sentence_objective = "none"  # the MLM loss alone
    config.checkpoint.every = 2
    with pytest.raises(pretrain.NonFiniteLossError, match="at step 5; stopping \\(step 4 is the last good checkpoint\\)"):
        pretrain.train_and_evaluate(config, tmp_path)
    _, params = checkpoint_io.load_params(str(tmp_path))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    assert [entry["step"] for entry in checkpoint_io.index(tmp_path)] == [4]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4]
    assert not any("sentence_loss" in record for record in records)


def test_init_from_a_run_with_other_shapes_names_the_parameter(shared_data, tmp_path, uninterrupted):
    workdir, _, _ = uninterrupted
    config = tiny_config(shared_data)
    config.model.update(hidden_size=64, intermediate_size=128)
    config.init_from = f"{workdir}:1"
    with pytest.raises(ValueError, match=r"parameter encoder/\S+ has shape \(\d+,?\d*\) in the checkpoint"):
        pretrain.train_and_evaluate(config, tmp_path)


def run_steps_directly(config, batches):
    """The jitted train step of `train_and_evaluate` on given batches; returns (state, losses)."""
    from bertjax import models
    from bertjax.train import optim, partitioning
    from bertjax.train import state as state_lib

    mesh = partitioning.make_mesh(config.mesh)
    rules = partitioning.rules(config.mesh)
    model = models.BertForPreTraining(models.BertConfig.from_config(config.model))
    seq_len = config.data.max_seq_length
    tx = optim.create(config.optim, config.train.total_steps, state_lib.abstract_params(model, seq_len))
    state, _ = state_lib.create(model, tx, config.train.seed, seq_len, mesh, rules)
    step = jax.jit(pretrain.make_train_step(model, tx, optim.learning_rate_schedule(config.optim, config.train.total_steps), config))
    losses = []
    for batch in batches:
        state, values = step(state, partitioning.global_batch(batch, mesh, rules))
        losses.append(float(values["loss"]))
    return state, losses


def test_gradient_accumulation_and_bfloat16(shared_data):
    from bertjax.data import loader

    config = tiny_config(shared_data, total_steps=2)
    config.model.update(hidden_dropout=0.0, attention_dropout=0.0)
    config.mesh.update(data=1, fsdp=1, tensor=1)  # one device: the cheapest compiles
    batches = [batch for _, batch in zip(range(2), loader.batches(config))]
    whole, whole_losses = run_steps_directly(config, batches)
    config.train.grad_accum_steps = 4
    accumulated, accumulated_losses = run_steps_directly(config, batches)
    # The same update: micro-batches are normalised by the whole batch's totals.
    np.testing.assert_allclose(accumulated_losses, whole_losses, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(whole.params), jax.tree.leaves(accumulated.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)
    config.train.grad_accum_steps = 1
    config.model.dtype = "bfloat16"
    low, low_losses = run_steps_directly(config, batches)
    # bfloat16 compute, float32 parameters and optimizer state.
    assert {leaf.dtype for leaf in jax.tree.leaves(low.params)} == {np.dtype("float32")}
    assert {leaf.dtype for leaf in jax.tree.leaves(low.opt_state) if np.ndim(leaf)} == {np.dtype("float32")}
    np.testing.assert_allclose(low_losses, whole_losses, rtol=2e-2)


def test_kept_host_memory_is_released_once_the_heap_outgrows_the_guard(shared_data, tmp_path, monkeypatch):
    """host_memory.release_if_tight runs after step 1 and at every log step, so a heap that grows past a
    third of the machine later in a run (evaluations, a bigger batch of temporaries) still gives glibc
    its defaults back. A fake C library and memory reading: nothing in this process changes."""
    from bertjax import host_memory

    readings, libc_calls = [], []

    class FakeLibc:
        def mallopt(self, option, value):
            libc_calls.append(("mallopt", option, value))
            return 1

        def malloc_trim(self, pad):
            libc_calls.append(("malloc_trim", pad))
            return 1

    def resident_and_total():
        readings.append(len(readings))
        return (2 if len(readings) >= 3 else 1) * 2**30, 3 * 2**30  # 2 GiB of 3 from the third reading

    monkeypatch.setattr(host_memory, "_kept", True)
    monkeypatch.setattr(host_memory, "_libc", FakeLibc)
    monkeypatch.setattr(host_memory, "_resident_and_total_bytes", resident_and_total)
    pretrain.train_and_evaluate(tiny_config(shared_data, total_steps=4), tmp_path)
    # step 1 (after its step, then at its log), step 2's log: released there, and not read again
    assert len(readings) == 3 and not host_memory._kept
    assert libc_calls == [
        ("mallopt", host_memory.M_MMAP_MAX, host_memory.DEFAULT_MMAP_MAX),
        ("mallopt", host_memory.M_TRIM_THRESHOLD, host_memory.DEFAULT_TRIM_THRESHOLD),
        ("malloc_trim", 0),
    ]
