"""Mesh resolution, the rule tables and the shardings of parameters, optimizer state and batches."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bertjax import config as config_lib
from bertjax import models
from bertjax.train import optim, partitioning
from bertjax.train import state as state_lib


def mesh_config(data=-1, fsdp=1, tensor=1, rules="default"):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules=rules, distributed=False))


def tiny_model(vocab_size=96):
    cfg = config_lib.model_config("tiny")
    cfg.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=vocab_size)
    return models.BertForPreTraining(models.BertConfig.from_config(cfg))


def test_mesh_shape_fills_the_free_axis_and_rejects_impossible_shapes():
    assert partitioning.mesh_shape(mesh_config(), 8) == (8, 1, 1)
    assert partitioning.mesh_shape(mesh_config(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert partitioning.mesh_shape(mesh_config(data=1, fsdp=1, tensor=1), 8) == (1, 1, 1)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        partitioning.mesh_shape(mesh_config(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match="cannot be split"):
        partitioning.mesh_shape(mesh_config(tensor=3), 8)
    with pytest.raises(ValueError, match="16 but there are 8 devices"):
        partitioning.mesh_shape(mesh_config(data=4, fsdp=4), 8)
    with pytest.raises(ValueError, match="mesh.rules"):
        partitioning.rules(mesh_config(rules="nonsense"))


def test_logical_names_map_to_mesh_axes_once_per_array():
    rules = partitioning.RULES["default"]
    assert partitioning.logical_to_mesh_spec(("batch", "length"), rules) == P(("data", "fsdp"), None)
    assert partitioning.logical_to_mesh_spec(("embed", "heads", "kv"), rules) == P("fsdp", "tensor", None)
    # A square [embed, embed] kernel: the second dimension cannot reuse `fsdp`.
    assert partitioning.logical_to_mesh_spec(("embed", "embed"), rules) == P("fsdp", None)
    assert partitioning.logical_to_mesh_spec(("unknown_name",), rules) == P(None)


def test_state_shardings_on_a_2x2x2_mesh():
    mesh = partitioning.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
    model = tiny_model(vocab_size=95)  # odd: the vocabulary cannot be split over tensor=2
    boxed = state_lib.abstract_params(model, 16)
    tx = optim.create(config_lib.optim_config(), 10, boxed)
    state, spec = state_lib.create(model, tx, seed=0, seq_len=16, mesh=mesh, rule_table=partitioning.RULES["default"])
    params = state.params
    query = params["encoder"]["layer_0"]["attention"]["query"]["kernel"]  # [embed, heads, kv]
    assert query.sharding.spec == P("fsdp", "tensor", None)
    assert query.addressable_shards[0].data.shape == (16, 1, 16)
    intermediate = params["encoder"]["layer_0"]["mlp"]["intermediate"]["kernel"]  # [embed, mlp]
    assert intermediate.sharding.spec == P("fsdp", "tensor")
    words = params["encoder"]["embeddings"]["word_embeddings"]["embedding"]  # [vocab=95, embed]
    assert words.sharding.spec == P(None, "fsdp")
    # Adam's moments live where their parameter lives; the step count is replicated.
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0]
    assert adam.mu["encoder"]["layer_0"]["attention"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert adam.count.sharding.spec == P()
    assert spec.abstract.params["encoder"]["layer_0"]["mlp"]["intermediate"]["kernel"].sharding == intermediate.sharding


def test_global_batch_splits_the_batch_dimension():
    mesh = partitioning.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
    rules = partitioning.RULES["default"]
    local = {"input_ids": np.arange(8 * 4, dtype=np.int32).reshape(8, 4), "sentence_label": np.arange(8, dtype=np.int32)}
    batch = partitioning.global_batch(local, mesh, rules)
    assert batch["input_ids"].sharding.spec == P(("data", "fsdp"), None)
    assert {shard.data.shape for shard in batch["input_ids"].addressable_shards} == {(2, 4)}
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), local["input_ids"])
    np.testing.assert_array_equal(np.asarray(batch["sentence_label"]), local["sentence_label"])


def test_distributed_initialisation_follows_config_and_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append("init"))
    for name in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    partitioning.initialize_distributed(mesh_config())
    assert calls == []
    monkeypatch.setenv("SLURM_NTASKS", "1")
    partitioning.initialize_distributed(mesh_config())
    assert calls == []
    monkeypatch.setenv("SLURM_NTASKS", "4")
    partitioning.initialize_distributed(mesh_config())
    assert calls == ["init"]
    monkeypatch.delenv("SLURM_NTASKS")
    config = mesh_config()
    config.distributed = True
    partitioning.initialize_distributed(config)
    assert calls == ["init", "init"]
