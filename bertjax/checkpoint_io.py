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
and a checksums.json (the SHA-256 of every file of those items), and WORKDIR/checkpoints/index.json
lists them (also `index(workdir)`).

Paths may be relative to the working directory: a source is made absolute once, where it is parsed
(orbax accepts only absolute paths).

Checksums. Every checkpoint is written through `ChecksummedCheckpointManager`: orbax writes a step
into STEP.orbax-checkpoint-tmp/ and, once every item is finalized (after the barrier of all
processes, on process 0 only), calls our hook just before it renames the directory into place. The
hook hashes the files of the items there and writes checksums.json into the same directory, so the
checksums are committed by the same atomic rename as the data: no step is ever complete without
them, however the process dies. Why files and not the arrays' values: the files are what can rot or
be cut short on disk; their hashes do not depend on how the arrays were sharded over devices and
hosts (a multi-host run's process 0 sees every process's files on the shared filesystem after
orbax's barrier), they cover the data iterator and metadata items too, and a mismatch names the
damaged file. The cost is one read of the checkpoint per save (in orbax's background thread, off the
training loop) and one per restore (of the params and metadata items only for `load_params`); the
README gives measured figures. Multi-host: process 0 hashes at save and verifies at resume (the
others wait at a barrier); `load_params` verifies in every process that calls it.

`verify` judges a step: checksums that match (loaded), a mismatch or a missing file (never loaded:
`DamagedCheckpointError` names the file), checksums that should exist but do not (the metadata says
so; never loaded), or none recorded because the step was written before bertjax kept checksums
(loaded, with a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import subprocess

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import traverse_util

from bertjax import config as config_lib
from bertjax.convert import hf
from bertjax.errors import MissingInputError, UserError

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"
CHECKSUMS = "checksums.json"
# Where orbax writes a step before renaming it into place (orbax.checkpoint's TMP_DIR_SUFFIX).
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# What load_params reads of a step, and so verifies (the optimizer state is only the trainer's business).
LOADED_ITEMS = ("params", "metadata")

log = logging.getLogger(__name__)


class _QuietReadOnly(logging.Filter):
    """Orbax warns twice, on every read-only CheckpointManager, that a read-only manager saves nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("CheckpointManagerOptions.read_only=True") or message.startswith("Given directory is read only"))


logging.getLogger("absl").addFilter(_QuietReadOnly())


def _read_only_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
    """An orbax manager that reads `directory` and never writes to it (its two warnings filtered above)."""
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))


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
        raise MissingInputError(f"{path}: not a bertjax checkpoint (no metadata item)")
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


class DamagedCheckpointError(UserError):
    """A checkpoint whose files do not match its checksums, or whose checksums are missing; never loaded."""


def _item_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The files of a step's items (params/, train/, data/, metadata/). Orbax's own bookkeeping at the
    step's top level (_CHECKPOINT_METADATA, commit_success.txt) is rewritten after the commit: not hashed."""
    return sorted(path for item in step_dir.iterdir() if item.is_dir() for path in item.rglob("*") if path.is_file())


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_checksums(step_dir) -> None:
    """STEP/checksums.json: the SHA-256 of every item file, written to a temporary name and renamed."""
    step_dir = pathlib.Path(step_dir)
    checksums = {str(path.relative_to(step_dir)): _sha256(path) for path in _item_files(step_dir)}
    temporary = step_dir / f"{CHECKSUMS}.tmp"
    temporary.write_text(json.dumps({"algorithm": "sha256", "files": checksums}, indent=0) + "\n")
    os.replace(temporary, step_dir / CHECKSUMS)


def verify(directory, step: int, items: tuple[str, ...] | None = None) -> bool:
    """True if the step's files (of `items`, default all) match its checksums, False if it predates
    checksums (a warning says so); raises DamagedCheckpointError naming the first damaged or missing
    file, or the missing checksums."""
    step_dir = pathlib.Path(directory) / str(step)
    checksums_path = step_dir / CHECKSUMS
    if not checksums_path.exists():
        if read_metadata(directory, step).get("checksums"):
            raise DamagedCheckpointError(f"{step_dir}: {CHECKSUMS} is missing although this checkpoint was saved with one: unverified, not loaded")
        log.warning("%s: saved before bertjax kept checksums; loading it unverified", step_dir)
        return False
    try:
        recorded = json.loads(checksums_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise DamagedCheckpointError(f"{checksums_path}: damaged ({error}): checkpoint step {step} cannot be verified, not loaded") from None
    for name, checksum in recorded.items():
        if items is not None and name.split("/", 1)[0] not in items:
            continue
        path = step_dir / name
        if not path.is_file():
            raise DamagedCheckpointError(f"{path}: missing from checkpoint step {step}: damaged, not loaded")
        if _sha256(path) != checksum:
            raise DamagedCheckpointError(f"{path}: checksum mismatch: checkpoint step {step} is damaged, not loaded")
    return True


def newest_verified_step(directory, steps, items: tuple[str, ...] | None = None) -> tuple[int | None, list[int]]:
    """(the newest of `steps` that verifies, the newer ones that do not), logging why each fails."""
    rejected = []
    for step in sorted(steps, reverse=True):
        try:
            verify(directory, step, items)
            return step, rejected
        except DamagedCheckpointError as error:
            log.warning("%s; trying the previous checkpoint", error)
            rejected.append(step)
    return None, rejected


class ChecksummedCheckpointManager(ocp.CheckpointManager):
    """An orbax CheckpointManager whose every save commits checksums.json with the step (module docstring).

    Always asynchronous underneath (orbax calls the hook only from its async commit);
    `save(..., wait=True)` blocks until the step is on disk.
    """

    def __init__(self, directory, options: ocp.CheckpointManagerOptions):
        self._committing: int | None = None
        options.enable_async_checkpointing = True
        options.async_options = ocp.AsyncOptions(post_finalization_callback=self._write_checksums)
        super().__init__(directory, options=options)

    def _write_checksums(self) -> None:
        if jax.process_index() == 0:  # orbax calls the hook on the primary process only, after all have written
            temporary = pathlib.Path(self.directory) / f"{self._committing}{ORBAX_TMP_SUFFIX}"
            if not temporary.is_dir():
                raise FileNotFoundError(f"{temporary}: not where this orbax version writes step {self._committing}")
            write_checksums(temporary)

    def save(self, step: int, *args, wait: bool = False, **kwargs) -> bool:
        self.wait_until_finished()  # the hook of the previous save has run; it is now this step's turn
        self._committing = step
        saved = super().save(step, *args, **kwargs)
        if wait:
            self.wait_until_finished()
        return saved


def index(workdir) -> list[dict]:
    """The checkpoints of a run, read from disk: step, kept, tokens seen, config hash, git revision."""
    directory = pathlib.Path(workdir).expanduser().absolute() / CHECKPOINTS
    return [read_metadata(directory, step) for step in _steps_on_disk(directory)]


def _steps_on_disk(directory: pathlib.Path) -> list[int]:
    """The complete steps of a checkpoint directory, read without writing to it."""
    manager = _read_only_manager(directory)
    steps = manager.all_steps()
    manager.close()
    return complete_steps(directory, steps)


def _split_source(source: str) -> tuple[pathlib.Path, int | None]:
    """(absolute path, step or None) of WORKDIR, WORKDIR:STEP or a HF directory, as typed (relative or ~/...)."""
    path, _, step = str(source).rpartition(":")
    if path and step.isdigit():
        return pathlib.Path(path).expanduser().absolute(), int(step)
    return pathlib.Path(source).expanduser().absolute(), None


def is_huggingface_dir(path) -> bool:
    path = pathlib.Path(path)
    return not (path / CHECKPOINTS).is_dir() and hf.is_hf_dir(path)


def read_config(workdir) -> ml_collections.ConfigDict:
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise MissingInputError(f"{path} does not exist: {workdir} is not a bertjax workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _workdir_step(workdir: pathlib.Path, step: int | None) -> int:
    """The step to load, verified: the one asked for (a damaged one is an error), else the newest that verifies."""
    directory = workdir / CHECKPOINTS
    steps = _steps_on_disk(directory)
    if not steps:
        raise MissingInputError(f"{directory}: no complete checkpoint")
    if step is not None:
        if step not in steps:
            raise MissingInputError(f"{directory}: no checkpoint at step {step}; there are {sorted(steps)}")
        verify(directory, step, LOADED_ITEMS)
        return step
    newest, rejected = newest_verified_step(directory, steps, LOADED_ITEMS)
    if newest is None:
        raise DamagedCheckpointError(f"{directory}: no checkpoint verifies (steps {sorted(steps)}; the log names each damaged file)")
    if rejected:
        log.warning("%s: loading step %d, the newest that verifies", directory, newest)
    return newest


def _single_device(abstract_params):
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract_params)


def _abstract_params_for(config) -> dict:
    from bertjax.train import state as state_lib

    return nn.meta.unbox(state_lib.abstract_params(hf.model_for(config.model), 8))


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
    manager = _read_only_manager(directory)
    check_shapes(abstract_params, read_metadata(directory, step)["param_shapes"], str(directory / str(step)))
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]
    manager.close()
    return config, params


def save_params(workdir, config, params, step: int = 0) -> pathlib.Path:
    """Write a workdir that `load_params` (and `init_from`) read: config.json and a params-only checkpoint."""
    workdir = pathlib.Path(workdir).expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")
    manager = ChecksummedCheckpointManager(workdir / CHECKPOINTS, ocp.CheckpointManagerOptions())
    metadata = {
        "step": step,
        "kept": True,
        "params_only": True,
        "checksums": True,
        "tokens_seen": 0,
        "config_hash": config_lib.config_hash(config),
        "git_revision": git_revision(),
        "param_shapes": param_shapes(params),
    }
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(metadata)), force=True, wait=True)
    manager.close()
    return workdir


def tokenizer_path(source: str) -> pathlib.Path:
    """Where the tokenizer of a run (WORKDIR/tokenizer) or of a HuggingFace directory (the directory) is."""
    path, _ = _split_source(source)
    if is_huggingface_dir(path):
        return path
    tokenizer_dir = path / TOKENIZER
    if not tokenizer_dir.exists():
        raise MissingInputError(f"{tokenizer_dir} does not exist: the run did not save its tokenizer")
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
    hf.save(hf.model_for(config.model), {"params": params}, target_dir)
    try:
        copied = hf.copy_tokenizer_files(tokenizer_path(source), target_dir)
    except FileNotFoundError:
        copied = []
    return f"wrote HuggingFace checkpoint {target_dir} from bertjax {source} (tokenizer files: {copied or 'none'})"
