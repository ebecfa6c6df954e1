"""Reading and writing bertjax checkpoints: the one home of every checkpoint format.

The trainer (`bertjax.train.checkpoints`) saves during training; everything that reads a checkpoint
(fine-tuning's `init_from`, `predict`, `convert`, embryology) comes here. A source is one of:
  WORKDIR           the newest checkpoint of a run
  WORKDIR:STEP      a given step (a kept one, or a rolling one still present)
  HF_DIR            a HuggingFace BERT directory (config.json + model.safetensors)

A run's checkpoints live in WORKDIR/checkpoints/STEP/ with four items:
  params    the parameters (float32)
  train     {'step', 'opt_state'}
  data      the grain iterator's position, so a resumed run reads exactly the next batch
  metadata  JSON: step, tokens seen, config, config hash, git revision, parameter shapes, kept or not
and WORKDIR/checkpoints/index.json lists them (also `index(workdir)`).
"""

from __future__ import annotations

import json
import logging
import pathlib
import subprocess

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import traverse_util

from bertjax import config as config_lib
from bertjax import models
from bertjax.convert import hf

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"

log = logging.getLogger(__name__)


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


def _split_source(source: str) -> tuple[pathlib.Path, int | None]:
    path, _, step = str(source).rpartition(":")
    if path and step.isdigit():
        return pathlib.Path(path), int(step)
    return pathlib.Path(source), None


def is_huggingface_dir(path) -> bool:
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
    from bertjax.train import state as state_lib

    model = models.BertForPreTraining(models.BertConfig.from_config(config.model))
    return nn.meta.unbox(state_lib.abstract_params(model, 8))


def load_params(source: str, abstract_params=None):
    """(config, params) from a workdir, WORKDIR:STEP or a HuggingFace directory.

    The params are float32 and unboxed; placed on one device, or as `abstract_params` says
    (ShapeDtypeStructs with shardings, whose shapes must match: an error names the first that does not).
    """
    path, step = _split_source(source)
    if step is None and is_huggingface_dir(path):
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


def convert(source: str, target: str) -> str:
    """`bertjax convert`: a HF directory becomes a bertjax workdir; a bertjax workdir (or WORKDIR:STEP) a HF directory.

    A WordPiece tokenizer (vocab.txt, tokenizer.json and their configs) travels along, into and out of
    WORKDIR/tokenizer; a sentencepiece tokenizer has no HF BERT form and stays behind. Returns a line
    saying what was written.
    """
    target_dir = pathlib.Path(target)
    if target_dir.exists() and any(target_dir.iterdir()):
        raise FileExistsError(f"--to {target_dir} exists and is not empty")
    source_dir = pathlib.Path(source)
    if source_dir.is_dir() and is_huggingface_dir(source_dir):
        _, variables = hf.load(source_dir)
        config = config_lib.pretrain_config()
        config.model = hf.read_config(source_dir)
        config.data.max_seq_length = min(config.data.max_seq_length, config.model.max_position_embeddings)
        tokenizer_dir = target_dir.absolute() / TOKENIZER
        copied = hf.copy_tokenizer_files(source_dir, tokenizer_dir)
        if copied:
            config.data.tokenizer = str(tokenizer_dir)
        save_params(target_dir, config, variables["params"])
        return f"wrote bertjax workdir {target_dir} from HuggingFace checkpoint {source_dir} (tokenizer files: {copied or 'none'})"
    config, params = load_params(source)
    hf.save(models.BertForPreTraining(models.BertConfig.from_config(config.model)), {"params": params}, target_dir)
    try:
        copied = hf.copy_tokenizer_files(tokenizer_path(source), target_dir)
    except FileNotFoundError:
        copied = []
    return f"wrote HuggingFace checkpoint {target_dir} from bertjax {source} (tokenizer files: {copied or 'none'})"
