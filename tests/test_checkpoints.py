"""Checkpoint helpers that need no training: the kept schedule, params-only workdirs, HF sources,
shape errors and incomplete (temporary) checkpoint directories."""

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from bertjax import checkpoint_io
from bertjax import config as config_lib
from bertjax import models
from bertjax.train import checkpoints


def tiny_config(hidden_size=32):
    config = config_lib.pretrain_config("tiny")
    config.model.update(num_layers=1, hidden_size=hidden_size, num_heads=2, intermediate_size=2 * hidden_size, vocab_size=64)
    return config


def random_params(config, seed=0):
    model = models.BertForPreTraining(models.BertConfig.from_config(config.model))
    ids = jnp.zeros((1, 8), jnp.int32)
    return model, nn.meta.unbox(model.init(jax.random.key(seed), ids, ids, jnp.ones_like(ids))["params"])


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_kept_schedule_combines_list_every_and_log_spaced_steps():
    config = ml_collections.ConfigDict(dict(keep_steps=(5, 999), keep_every=300, keep_log=0))
    assert checkpoints.kept_steps(config, 1000) == [5, 300, 600, 900, 999]
    config = ml_collections.ConfigDict(dict(keep_steps=(), keep_every=0, keep_log=7))
    log_spaced = checkpoints.kept_steps(config, 1000)
    assert log_spaced[0] == 1 and log_spaced[-1] == 1000 and len(log_spaced) == 7
    gaps = np.diff(log_spaced)
    assert np.all(gaps[1:] >= gaps[:-1])  # dense early, sparse late
    config = ml_collections.ConfigDict(dict(keep_steps=(0, 2000), keep_every=0, keep_log=0))
    assert checkpoints.kept_steps(config, 1000) == []


def test_save_params_then_load_params_round_trip(tmp_path):
    config = tiny_config()
    _, params = random_params(config)
    checkpoint_io.save_params(tmp_path / "imported", config, params)
    loaded_config, loaded = checkpoint_io.load_params(str(tmp_path / "imported"))
    assert loaded_config.model.hidden_size == 32
    assert_trees_equal(params, loaded)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(loaded))
    _, loaded_at_step = checkpoint_io.load_params(f"{tmp_path / 'imported'}:0")
    assert_trees_equal(params, loaded_at_step)
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
        checkpoint_io.load_params(f"{tmp_path / 'imported'}:7")
    with pytest.raises(FileNotFoundError, match="not a bertjax workdir"):
        checkpoint_io.load_params(str(tmp_path / "nowhere"))


def test_a_mismatched_shape_is_named(tmp_path):
    config = tiny_config(hidden_size=32)
    _, params = random_params(config)
    checkpoint_io.save_params(tmp_path / "run", config, params)
    _, other = random_params(tiny_config(hidden_size=64))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), other)
    with pytest.raises(ValueError, match=r"parameter encoder/embeddings/LayerNorm/bias has shape \(32,\) in the checkpoint but \(64,\)"):
        checkpoint_io.load_params(str(tmp_path / "run"), abstract)


def test_an_incomplete_checkpoint_is_never_loaded(tmp_path):
    config = tiny_config()
    _, params = random_params(config)
    checkpoint_io.save_params(tmp_path / "run", config, params)
    # What a process killed in the middle of saving step 9 leaves behind.
    partial = tmp_path / "run" / "checkpoints" / "9.orbax-checkpoint-tmp"
    (partial / "params").mkdir(parents=True)
    (partial / "metadata").mkdir()
    (partial / "metadata" / "metadata").write_text(json.dumps({"step": 9}))
    _, loaded = checkpoint_io.load_params(str(tmp_path / "run"))
    assert_trees_equal(params, loaded)
    manager = checkpoints.Checkpoints(tmp_path / "run", config.checkpoint, total_steps=10)
    assert manager.latest_step() == 0
    manager.close()
    # Orbax removes the leftover in the background once a run opens the directory.
    deadline = time.time() + 30
    while partial.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not partial.exists()
    assert [entry["step"] for entry in checkpoint_io.index(tmp_path / "run")] == [0]


def test_a_half_deleted_step_is_ignored_not_fatal(tmp_path):
    """kill -9 while orbax removes an old checkpoint leaves its directory partly deleted."""
    config = tiny_config()
    _, params = random_params(config)
    checkpoint_io.save_params(tmp_path / "run", config, params)
    half_deleted = tmp_path / "run" / "checkpoints" / "5"
    (half_deleted / "params").mkdir(parents=True)
    (half_deleted / "train").mkdir()
    manager = checkpoints.Checkpoints(tmp_path / "run", config.checkpoint, total_steps=10)
    assert manager.latest_step() == 0
    manager.close()
    assert [entry["step"] for entry in checkpoint_io.index(tmp_path / "run")] == [0]
    _, loaded = checkpoint_io.load_params(str(tmp_path / "run"))
    assert_trees_equal(params, loaded)


def test_huggingface_directory_as_a_source(tmp_path):
    from bertjax.convert import hf

    config = tiny_config()
    model, params = random_params(config, seed=3)
    hf.save(model, {"params": params}, tmp_path / "hf")
    loaded_config, loaded = checkpoint_io.load_params(str(tmp_path / "hf"))
    assert loaded_config.model.hidden_size == 32 and loaded_config.model.num_layers == 1
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    assert checkpoint_io.tokenizer_path(str(tmp_path / "hf")) == tmp_path / "hf"


def test_tokenizer_path_of_a_workdir(tmp_path):
    (tmp_path / "run" / "tokenizer").mkdir(parents=True)
    assert checkpoint_io.tokenizer_path(str(tmp_path / "run")) == tmp_path / "run" / "tokenizer"
    assert checkpoint_io.tokenizer_path(f"{tmp_path / 'run'}:100") == tmp_path / "run" / "tokenizer"
    with pytest.raises(FileNotFoundError, match="did not save its tokenizer"):
        checkpoint_io.tokenizer_path(str(tmp_path / "elsewhere"))


def test_relative_paths_work_from_any_working_directory(tmp_path, monkeypatch):
    """Sources as users type them: relative to the working directory, with or without :STEP."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config()
    model, params = random_params(config)
    assert checkpoint_io.save_params("runs/pt", config, params) == tmp_path / "runs" / "pt"
    (tmp_path / "runs" / "pt" / "tokenizer").mkdir()
    for source in ("runs/pt", "runs/pt:0", "./runs/pt"):
        _, loaded = checkpoint_io.load_params(source)
        assert_trees_equal(params, loaded)
    assert checkpoint_io.tokenizer_path("runs/pt:0") == tmp_path / "runs" / "pt" / "tokenizer"
    assert [entry["step"] for entry in checkpoint_io.index("runs/pt")] == [0]
    manager = checkpoints.Checkpoints("runs/pt", config.checkpoint, total_steps=10)
    assert manager.directory == tmp_path / "runs" / "pt" / "checkpoints" and manager.latest_step() == 0
    manager.close()
    assert "wrote HuggingFace checkpoint" in checkpoint_io.convert("runs/pt:0", "hf")
    assert "wrote bertjax workdir" in checkpoint_io.convert("hf", "back")
    _, round_trip = checkpoint_io.load_params("back")
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(round_trip), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def flip(path, count=4096):
    """Invert `count` bytes in the middle of a file (all of it if smaller): disk rot, a bad copy."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - count // 2)
    data[start : start + count] = bytes(byte ^ 0xFF for byte in data[start : start + count])
    path.write_bytes(bytes(data))


def largest_params_file(step_dir):
    return max((path for path in (step_dir / "params").rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)


def test_every_item_file_is_checksummed_and_a_damaged_step_is_never_loaded(tmp_path):
    config = tiny_config()
    _, params = random_params(config)
    _, newer = random_params(config, seed=1)
    checkpoint_io.save_params(tmp_path / "run", config, params, step=1)
    checkpoint_io.save_params(tmp_path / "run", config, newer, step=2)
    step_dir = tmp_path / "run" / "checkpoints" / "2"
    recorded = json.loads((step_dir / "checksums.json").read_text())["files"]
    item_files = {str(path.relative_to(step_dir)) for path in step_dir.rglob("*") if path.is_file() and path.parent != step_dir}
    assert set(recorded) == item_files and any(name.startswith("params/") for name in recorded) and "metadata/metadata" in recorded
    assert checkpoint_io.verify(tmp_path / "run" / "checkpoints", 2) is True

    damaged = largest_params_file(step_dir)
    flip(damaged)
    with pytest.raises(checkpoint_io.DamagedCheckpointError, match=f"^{damaged}: checksum mismatch: checkpoint step 2 is damaged, not loaded$"):
        checkpoint_io.load_params(f"{tmp_path / 'run'}:2")
    # The newest that verifies, with a line naming the damaged file.
    _, loaded = checkpoint_io.load_params(str(tmp_path / "run"))
    assert_trees_equal(params, loaded)


def test_missing_checksums_are_unverified_but_a_checkpoint_from_before_checksums_loads(tmp_path, caplog):
    config = tiny_config()
    _, params = random_params(config)
    checkpoint_io.save_params(tmp_path / "run", config, params, step=3)
    step_dir = tmp_path / "run" / "checkpoints" / "3"
    # The metadata says checksums were written, but they are gone: never trusted.
    (step_dir / "checksums.json").unlink()
    with pytest.raises(checkpoint_io.DamagedCheckpointError, match=r"checksums.json is missing although this checkpoint was saved with one"):
        checkpoint_io.load_params(f"{tmp_path / 'run'}:3")
    with pytest.raises(checkpoint_io.DamagedCheckpointError, match=r"no checkpoint verifies \(steps \[3\]"):
        checkpoint_io.load_params(str(tmp_path / "run"))
    # A checkpoint written before checksums existed (no such key in its metadata): loaded, with a warning.
    metadata_path = step_dir / "metadata" / "metadata"
    metadata = json.loads(metadata_path.read_text())
    del metadata["checksums"]
    metadata_path.write_text(json.dumps(metadata))
    _, loaded = checkpoint_io.load_params(f"{tmp_path / 'run'}:3")
    assert_trees_equal(params, loaded)
    assert f"{step_dir}: saved before bertjax kept checksums; loading it unverified" in caplog.text
