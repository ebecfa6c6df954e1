"""The train state, created sharded from the start (Flax lm1b style).

`jax.eval_shape` gives the shapes and logical axis names of every parameter without allocating;
the rule table turns the names into shardings; `jax.jit(init, out_shardings=...)` then builds
each parameter and optimizer moment directly on the devices that own it, so a model larger than
one device's memory can be initialised.

Seeds are separate (multi-seed studies vary one at a time): config.train.seed initialises the
parameters, config.train.dropout_seed drives dropout (folded with the step, so a resumed run
draws the same masks), config.data.seed orders and masks the data (in bertjax.data).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from bertjax.train import partitioning


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # float32, unboxed
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """What `create` decided: the abstract state and its shardings (for restoring checkpoints)."""

    abstract: TrainState  # jax.ShapeDtypeStruct leaves, with shardings
    shardings: TrainState  # NamedSharding leaves


def example_inputs(batch_size: int, seq_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    ids = jnp.zeros((batch_size, seq_len), jnp.int32)
    return ids, ids, jnp.ones_like(ids)


def abstract_params(model: nn.Module, seq_len: int):
    """The boxed abstract parameters (shapes and logical axis names, no arrays)."""
    inputs = example_inputs(1, seq_len)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"]


def create(model: nn.Module, tx: optax.GradientTransformation, seed: int, seq_len: int, mesh, rule_table) -> tuple[TrainState, StateSpec]:
    """A freshly initialised state (parameters from `seed`), every leaf placed by the rule table."""
    inputs = example_inputs(1, seq_len)

    def init(rng):
        params = nn.meta.unbox(model.init(rng, *inputs)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    boxed = abstract_params(model, seq_len)
    params_shardings = partitioning.param_shardings(boxed, mesh, rule_table)
    abstract = jax.eval_shape(init, jax.random.key(seed))
    params_shapes = nn.meta.unbox(boxed)
    shardings = TrainState(
        step=partitioning.replicated(mesh),
        params=params_shardings,
        opt_state=partitioning.mirror_shardings(abstract.opt_state, params_shardings, params_shapes, mesh),
    )
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    abstract_with_shardings = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract, shardings)
    return state, StateSpec(abstract=abstract_with_shardings, shardings=shardings)


def dropout_key(dropout_seed: int, step: jax.Array) -> jax.Array:
    """The dropout key of one step: a function of the seed and the step only (exact resume)."""
    return jax.random.fold_in(jax.random.key(dropout_seed), step)
