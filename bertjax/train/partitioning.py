"""The device mesh, the rule tables from logical axis names to mesh axes, and shardings.

Parameters carry logical axis names (`bertjax.models.axes`); a rule table chosen by
`config.mesh.rules` maps them onto the mesh axes `data`, `fsdp` and `tensor` (T5X/MaxText style).
Data parallel, FSDP and tensor parallel are therefore all a matter of `config.mesh` alone:

  mesh.data=-1                        data parallel (parameters replicated)
  mesh.fsdp=-1, mesh.data=1           parameters and optimizer state sharded over `fsdp`
  mesh.tensor=2                       attention heads, MLP width and vocabulary split over `tensor`

Multi-host: `initialize_distributed` calls `jax.distributed.initialize()` when the config or the
environment (a coordinator address, a multi-task SLURM job, a TPU pod) asks for it; every process
reads its own part of the batch and `global_batch` assembles the global array.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bertjax.models import axes
from bertjax.train.optim import path_names

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes. Names absent from a table are replicated.
RULES = {
    # Batch over data and fsdp; FSDP shards the hidden dimension of every weight; tensor
    # parallelism splits heads, the MLP width and the vocabulary (Megatron layout).
    "default": (
        (axes.BATCH, ("data", "fsdp")),
        (axes.EMBED, "fsdp"),
        (axes.MLP, "tensor"),
        (axes.HEADS, "tensor"),
        (axes.VOCAB, "tensor"),
        (axes.KV, None),
        (axes.LENGTH, None),
        (axes.TYPES, None),
        (axes.POSITIONS, None),
        (axes.CLASSES, None),
        (axes.LAYERS, None),
    ),
    # Every parameter on every device; the batch split over all mesh axes.
    "replicated": ((axes.BATCH, ("data", "fsdp", "tensor")),),
}

# Environment variables that mean "this is one process of a multi-process job".
_DISTRIBUTED_ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def rules(mesh_config) -> tuple:
    if mesh_config.rules not in RULES:
        raise ValueError(f"config.mesh.rules={mesh_config.rules!r}: choose one of {sorted(RULES)}")
    return RULES[mesh_config.rules]


def _environment_asks_for_distributed() -> bool:
    if any(os.environ.get(name) for name in _DISTRIBUTED_ENVIRONMENT):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    # A multi-host TPU slice names its workers.
    return len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1


def initialize_distributed(mesh_config) -> None:
    """Join the multi-process job when the config or the environment asks; idempotent."""
    if jax.distributed.is_initialized():
        return
    if mesh_config.distributed or _environment_asks_for_distributed():
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def mesh_shape(mesh_config, device_count: int) -> tuple[int, int, int]:
    """Resolve the (data, fsdp, tensor) sizes; at most one may be -1 (the devices the others leave).
    Fixed sizes that multiply to fewer than the devices use the first ones (e.g. 1,1,1: one device)."""
    sizes = [mesh_config[name] for name in MESH_AXES]
    free = [name for name, size in zip(MESH_AXES, sizes) if size == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    fixed = math.prod(size for size in sizes if size != -1)
    if free:
        if device_count % fixed:
            raise ValueError(
                f"config.mesh: {device_count} devices cannot be split into "
                f"{dict(zip(MESH_AXES, sizes))} (the fixed axes multiply to {fixed})"
            )
        sizes = [device_count // fixed if size == -1 else size for size in sizes]
    if math.prod(sizes) < device_count and not free:
        logging.warning("config.mesh %s uses %d of the %d devices", dict(zip(MESH_AXES, sizes)), math.prod(sizes), device_count)
    elif math.prod(sizes) != device_count:
        raise ValueError(
            f"config.mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {device_count} devices "
            f"({dict(zip(MESH_AXES, sizes))}); set one axis to -1 to take the rest"
        )
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_mesh_spec(logical: PartitionSpec | tuple, rule_table) -> PartitionSpec:
    """Mesh axes for one array's logical axis names. A mesh axis is used once per array: when two
    dimensions share a name (a square [embed, embed] kernel) only the first is split."""
    table = dict(rule_table)
    used: set[str] = set()
    spec = []
    for name in logical:
        target = table.get(name)
        mesh_axes = () if target is None else (target if isinstance(target, tuple) else (target,))
        mesh_axes = tuple(axis for axis in mesh_axes if axis not in used)
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _fit_to_shape(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, name: str) -> PartitionSpec:
    """Replicate the dimensions a mesh axis does not divide (e.g. a vocabulary of 30522 over 4)."""
    fitted = []
    for dim, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        mesh_axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        parts = math.prod(mesh.shape[axis] for axis in mesh_axes)
        if parts > 1 and shape[dim] % parts:
            logging.warning("%s: dimension %d of size %d is not divisible by %s=%d; replicated", name, dim, shape[dim], entry, parts)
            entry = None
        fitted.append(entry)
    return PartitionSpec(*fitted)


def param_shardings(abstract_boxed_params, mesh: Mesh, rule_table) -> dict:
    """NamedShardings for the (unboxed) parameters, from the logical names the model gave them."""
    logical = nn.get_partition_spec(abstract_boxed_params)
    shapes = nn.meta.unbox(abstract_boxed_params)

    def sharding(path, names, shape):
        spec = logical_to_mesh_spec(names, rule_table)
        return NamedSharding(mesh, _fit_to_shape(spec, shape.shape, mesh, "/".join(path_names(path))))

    return jax.tree_util.tree_map_with_path(sharding, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def mirror_shardings(abstract_tree, params_shardings, params_shapes, mesh: Mesh):
    """Shardings for a tree (optimizer state) whose leaves mirror parameters: a leaf whose key path
    ends with a parameter's path and has its shape gets that parameter's sharding; the rest
    (step counts, scalars) are replicated."""
    by_path = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        by_path[path_names(path)] = leaf
    shape_by_path = {path_names(path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(params_shapes)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding(path, leaf):
        names = path_names(path)
        for start in range(len(names)):
            suffix = names[start:]
            if suffix in by_path and shape_by_path[suffix] == leaf.shape:
                return by_path[suffix]
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, abstract_tree)


def batch_sharding(mesh: Mesh, rule_table, ndim: int) -> NamedSharding:
    """Split the leading (batch) dimension as the rule table says; the others are replicated."""
    return NamedSharding(mesh, logical_to_mesh_spec((axes.BATCH,) + (None,) * (ndim - 1), rule_table))


def global_batch(local_batch: dict, mesh: Mesh, rule_table) -> dict:
    """Assemble the global batch from this process's part (all of it on one host)."""
    return {
        name: jax.make_array_from_process_local_data(batch_sharding(mesh, rule_table, np.ndim(value)), np.asarray(value))
        for name, value in local_batch.items()
    }


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
