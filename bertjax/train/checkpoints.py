"""Checkpoints (orbax): a rolling one to resume from, a kept schedule for embryology, and loading
parameters from any run or a HuggingFace directory.

A run's checkpoints live in WORKDIR/checkpoints/STEP/ with four items:
  params    the parameters (float32)
  train     {'step', 'opt_state'}
  data      the grain iterator's position, so a resumed run reads exactly the next batch
  metadata  JSON: step, tokens seen, config, config hash, git revision, parameter shapes, kept or not
and WORKDIR/checkpoints/index.json lists them (also `bertjax.train.checkpoints.index(workdir)`).

The rolling policy keeps the newest `checkpoint.keep`; the kept schedule (`checkpoint.keep_steps`,
every `checkpoint.keep_every`, `checkpoint.keep_log` log-spaced steps) is never deleted. Orbax writes
each step into a temporary directory and renames it when complete, so a process killed mid-save
leaves no directory that could be mistaken for a checkpoint; the tmp leftovers are removed on start.

Sources for `load_params`, `init_from` and `tokenizer_path`:
  WORKDIR           the newest checkpoint of a run
  WORKDIR:STEP      a given step (a kept one, or a rolling one still present)
  HF_DIR            a HuggingFace BERT directory (config.json + model.safetensors)
"""

from __future__ import annotations

import json
import logging
import pathlib
import subprocess

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from bertjax import config as config_lib

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"

log = logging.getLogger(__name__)


def kept_steps(checkpoint_config, total_steps: int) -> list[int]:
    """The steps of the kept schedule within 1..total_steps: the explicit list, every K, and N
    log-spaced steps (1, 2, 4, ... dense early, where a model changes fastest)."""
    steps = {int(step) for step in checkpoint_config.keep_steps}
    if checkpoint_config.keep_every:
        steps.update(range(checkpoint_config.keep_every, total_steps + 1, checkpoint_config.keep_every))
    if checkpoint_config.keep_log:
        steps.update(int(step) for step in np.unique(np.round(np.geomspace(1, total_steps, checkpoint_config.keep_log))))
    return sorted(step for step in steps if 1 <= step <= total_steps)


def git_revision() -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(config_lib.REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def param_shapes(params) -> dict[str, list[int]]:
    return {"/".join(path): list(leaf.shape) for path, leaf in traverse_util.flatten_dict(params).items()}


def check_shapes(expected, found: dict[str, list[int]], source: str) -> None:
    """Raise naming the first parameter whose shape differs (or that one side lacks)."""
    expected = param_shapes(expected)
    for name, shape in expected.items():
        if name not in found:
            raise ValueError(f"{source}: the checkpoint has no parameter {name} (the config expects shape {tuple(shape)})")
        if list(found[name]) != shape:
            raise ValueError(
                f"{source}: parameter {name} has shape {tuple(found[name])} in the checkpoint but {tuple(shape)} "
                "in the config (check config.model against the checkpoint's config.json)"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"{source}: the checkpoint has parameter {extra[0]} that the config's model does not")


class Checkpoints:
    """The checkpoints of one run: save on schedule, resume from the newest complete one."""

    def __init__(self, workdir, checkpoint_config, total_steps: int):
        if checkpoint_config.keep < 1 or checkpoint_config.every < 1:
            raise ValueError(
                f"config.checkpoint.keep={checkpoint_config.keep}, every={checkpoint_config.every}: both must be at least 1 "
                "(the newest rolling checkpoint is what a run resumes from)"
            )
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINTS
        self.every = checkpoint_config.every
        self.total_steps = total_steps
        self.kept = kept_steps(checkpoint_config, total_steps)
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(checkpoint_config.keep), ocp.checkpoint_managers.CustomSteps(self.kept)]
        )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=checkpoint_config.async_save,
            cleanup_tmp_directories=True,
            preservation_policy=policy,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        listed = self.manager.all_steps()
        complete = complete_steps(self.directory, listed)
        # Judged once, at start-up: later steps are this run's own saves, complete or still in flight.
        self._incomplete = set(listed) - set(complete)
        self._metadata = {step: read_metadata(self.directory, step) for step in complete}

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step in self.kept or step == self.total_steps

    def steps(self) -> list[int]:
        return [step for step in self.manager.all_steps() if step not in self._incomplete]

    def latest_step(self) -> int | None:
        return max(self.steps(), default=None)

    def save(self, step: int, state, data_iterator, metadata: dict) -> None:
        metadata = {**metadata, "step": int(step), "kept": step in self.kept}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                metadata=ocp.args.JsonSave(metadata),
            ),
            force=True,
        )
        self._metadata[step] = metadata
        self.write_index()

    def metadata(self, step: int) -> dict:
        if step not in self._metadata:
            self._metadata[step] = read_metadata(self.directory, step)
        return self._metadata[step]

    def restore(self, step: int, state_spec, data_iterator):
        """The full train state and data position of `step`; raises naming a mismatched parameter."""
        metadata = self.metadata(step)
        check_shapes(state_spec.abstract.params, metadata["param_shapes"], f"{self.directory / str(step)}")
        abstract = state_spec.abstract
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                train=ocp.args.StandardRestore({"step": abstract.step, "opt_state": abstract.opt_state}),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        state = abstract.replace(params=restored["params"], step=restored["train"]["step"], opt_state=restored["train"]["opt_state"])
        return state, metadata

    def write_index(self) -> None:
        """checkpoints/index.json: one entry per checkpoint on disk (or being written), oldest first."""
        if jax.process_index() != 0:
            return
        entries = []
        for step in self.steps():
            metadata = self.metadata(step)
            entries.append({key: metadata.get(key) for key in ("step", "kept", "tokens_seen", "config_hash", "git_revision", "time")})
        (self.directory / "index.json").write_text(json.dumps(entries, indent=1) + "\n")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.write_index()
        self.manager.close()


def read_metadata(directory, step: int) -> dict:
    path = pathlib.Path(directory) / str(step) / "metadata" / "metadata"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a bertjax checkpoint (no metadata item)")
    return json.loads(path.read_text())


def complete_steps(directory, steps) -> list[int]:
    """The steps whose directory still holds its params and metadata items. Orbax renames a finished
    save into place, but removes an old checkpoint file by file: a kill -9 during that removal leaves
    a step directory that orbax lists and nobody can load."""
    complete = []
    for step in sorted(steps):
        step_dir = pathlib.Path(directory) / str(step)
        if (step_dir / "metadata" / "metadata").exists() and (step_dir / "params").is_dir():
            complete.append(step)
        else:
            log.warning("%s: incomplete (an interrupted save or deletion): ignored", step_dir)
    return complete


def index(workdir) -> list[dict]:
    """The checkpoints of a run, read from disk: step, kept, tokens seen, config hash, git revision."""
    directory = pathlib.Path(workdir) / CHECKPOINTS
    return [read_metadata(directory, step) for step in _steps_on_disk(directory)]


def _steps_on_disk(directory: pathlib.Path) -> list[int]:
    """The complete steps of a checkpoint directory, read without writing to it."""
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    return complete_steps(directory, manager.all_steps())


# --- Loading parameters from another run or from HuggingFace -------------------------------------


def _split_source(source: str) -> tuple[pathlib.Path, int | None]:
    path, _, step = str(source).rpartition(":")
    if path and step.isdigit():
        return pathlib.Path(path), int(step)
    return pathlib.Path(source), None


def is_huggingface_dir(path) -> bool:
    from bertjax.convert import hf

    path = pathlib.Path(path)
    return not (path / CHECKPOINTS).is_dir() and hf.is_hf_dir(path)


def read_config(workdir) -> ml_collections.ConfigDict:
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a bertjax workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _workdir_step(workdir: pathlib.Path, step: int | None) -> int:
    directory = workdir / CHECKPOINTS
    steps = _steps_on_disk(directory)
    if not steps:
        raise FileNotFoundError(f"{directory}: no complete checkpoint")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; there are {sorted(steps)}")
    return step


def _single_device(abstract_params):
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract_params)


def _abstract_params_for(config) -> dict:
    from bertjax import models
    from bertjax.train import state as state_lib
    from flax import linen as nn

    model = models.BertForPreTraining(models.BertConfig.from_config(config.model))
    return nn.meta.unbox(state_lib.abstract_params(model, 8))


def load_params(source: str, abstract_params=None):
    """(config, params) from a workdir, WORKDIR:STEP or a HuggingFace directory.

    The params are float32 and unboxed; placed on one device, or as `abstract_params` says
    (ShapeDtypeStructs with shardings, whose shapes must match: an error names the first that does not).
    """
    path, step = _split_source(source)
    if step is None and is_huggingface_dir(path):
        from bertjax.convert import hf

        _, variables = hf.load(path)
        config = config_lib.pretrain_config()
        config.model = hf.read_config(path)
        params = variables["params"]
        if abstract_params is not None:
            check_shapes(abstract_params, param_shapes(params), str(path))
            params = jax.tree.map(lambda value, leaf: jax.device_put(value, leaf.sharding), params, abstract_params)
        return config, params
    config = read_config(path)
    step = _workdir_step(path, step)
    directory = path / CHECKPOINTS
    if abstract_params is None:
        abstract_params = _single_device(_abstract_params_for(config))
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    check_shapes(abstract_params, read_metadata(directory, step)["param_shapes"], str(directory / str(step)))
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]
    manager.close()
    return config, params


def save_params(workdir, config, params, step: int = 0) -> pathlib.Path:
    """Write a workdir that `load_params` (and `init_from`) read: config.json and a params-only checkpoint."""
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")
    manager = ocp.CheckpointManager(workdir / CHECKPOINTS, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    metadata = {
        "step": step,
        "kept": True,
        "params_only": True,
        "tokens_seen": 0,
        "config_hash": config_lib.config_hash(config),
        "git_revision": git_revision(),
        "param_shapes": param_shapes(params),
    }
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(metadata)), force=True)
    manager.wait_until_finished()
    manager.close()
    return workdir


def tokenizer_path(source: str) -> pathlib.Path:
    """Where the tokenizer of a run (WORKDIR/tokenizer) or of a HuggingFace directory (the directory) is."""
    path, _ = _split_source(source)
    if is_huggingface_dir(path):
        return path
    tokenizer_dir = path / TOKENIZER
    if not tokenizer_dir.exists():
        raise FileNotFoundError(f"{tokenizer_dir} does not exist: the run did not save its tokenizer")
    return tokenizer_dir

