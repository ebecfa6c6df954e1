"""Checkpoints as the trainer writes them (orbax): a rolling one to resume from, and a kept schedule
for embryology. Reading them back, for any purpose, is `bertjax.checkpoint_io`, which also describes
the layout.

The rolling policy keeps the newest `checkpoint.keep`; the kept schedule (`checkpoint.keep_steps`,
every `checkpoint.keep_every`, `checkpoint.keep_log` log-spaced steps) is never deleted. Orbax writes
each step into a temporary directory and renames it when complete, so a process killed mid-save
(or a save that fails, say on a full disk) leaves no directory that could be mistaken for a
checkpoint; the tmp leftovers are removed on start.

Every step carries checksums (`checkpoint_io.ChecksummedCheckpointManager`). On start-up the newest
step that verifies is the one to resume from; newer ones (damaged, or without the checksums they
should have) are moved to WORKDIR/checkpoints_set_aside/ with a log line naming the file, so that
the run can write those steps afresh and nothing is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import pathlib

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bertjax.checkpoint_io import (
    CHECKPOINTS,
    ChecksummedCheckpointManager,
    check_shapes,
    complete_steps,
    newest_verified_step,
    read_metadata,
    verify,
)
from bertjax.errors import UserError

SET_ASIDE = "checkpoints_set_aside"

log = logging.getLogger(__name__)


def _is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain (orbax re-raises its writer threads' errors; tensorstore words it)."""
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def kept_steps(checkpoint_config, total_steps: int) -> list[int]:
    """The steps of the kept schedule within 1..total_steps: the explicit list, every K, and N
    log-spaced steps (1, 2, 4, ... dense early, where a model changes fastest)."""
    steps = {int(step) for step in checkpoint_config.keep_steps}
    if checkpoint_config.keep_every:
        steps.update(range(checkpoint_config.keep_every, total_steps + 1, checkpoint_config.keep_every))
    if checkpoint_config.keep_log:
        steps.update(int(step) for step in np.unique(np.round(np.geomspace(1, total_steps, checkpoint_config.keep_log))))
    return sorted(step for step in steps if 1 <= step <= total_steps)


class Checkpoints:
    """The checkpoints of one run: save on schedule, resume from the newest complete one."""

    def __init__(self, workdir, checkpoint_config, total_steps: int):
        if checkpoint_config.keep < 1 or checkpoint_config.every < 1:
            raise ValueError(
                f"config.checkpoint.keep={checkpoint_config.keep}, every={checkpoint_config.every}: both must be at least 1 "
                "(the newest rolling checkpoint is what a run resumes from)"
            )
        self.directory = pathlib.Path(workdir).expanduser().absolute() / CHECKPOINTS
        self.every = checkpoint_config.every
        self.wait = not checkpoint_config.async_save
        self.total_steps = total_steps
        self.kept = kept_steps(checkpoint_config, total_steps)
        self._set_aside_unverified()  # before the manager lists the steps
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(checkpoint_config.keep), ocp.checkpoint_managers.CustomSteps(self.kept)]
        )
        options = ocp.CheckpointManagerOptions(cleanup_tmp_directories=True, preservation_policy=policy)
        self.manager = ChecksummedCheckpointManager(self.directory, options)
        listed = self.manager.all_steps()
        complete = complete_steps(self.directory, listed)
        # Judged once, at start-up: later steps are this run's own saves, complete or still in flight.
        self._incomplete = set(listed) - set(complete)
        self._metadata = {step: read_metadata(self.directory, step) for step in complete}
        self._verified = {max(complete)} if complete else set()  # by _set_aside_unverified
        self._saving: int | None = None
        self._failed = False

    def _on_disk(self) -> list[int]:
        names = [path.name for path in self.directory.iterdir()] if self.directory.is_dir() else []
        return complete_steps(self.directory, [int(name) for name in names if name.isdigit()])

    def _set_aside_unverified(self) -> None:
        """Move the steps newer than the newest that verifies out of checkpoints/ (process 0; the others wait)."""
        if jax.process_index() == 0:
            steps = self._on_disk()
            resume, rejected = newest_verified_step(self.directory, steps)
            for step in rejected:
                target = self.directory.parent / SET_ASIDE / str(step)
                while target.exists():
                    target = target.with_name(target.name + "_")
                target.parent.mkdir(exist_ok=True)
                (self.directory / str(step)).rename(target)
                log.warning("checkpoint step %d moved to %s; it is not resumed from", step, target)
            if rejected:
                log.warning("%s: resuming from %s", self.directory, f"step {resume}, the newest that verifies" if resume is not None else "scratch: no checkpoint verifies")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("bertjax: checkpoints verified")

    @contextlib.contextmanager
    def _disk_full_is_a_user_error(self, step: int):
        try:
            yield
        except Exception as error:
            if not _is_disk_full(error):
                raise
            self._failed = True
            last = max(self._on_disk(), default=None)
            where = f"the last complete checkpoint is step {last}" if last is not None else "no checkpoint is complete"
            raise UserError(
                f"disk full: no space left on device while saving checkpoint step {step} in {self.directory}; "
                f"{where}: free space, then rerun the same command to resume"
            ) from error

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step in self.kept or step == self.total_steps

    def steps(self) -> list[int]:
        return [step for step in self.manager.all_steps() if step not in self._incomplete]

    def latest_step(self) -> int | None:
        return max(self.steps(), default=None)

    def _finish_saving(self) -> None:
        """Wait for the save in flight (an error in orbax's writer threads surfaces here)."""
        if self._saving is not None:
            with self._disk_full_is_a_user_error(self._saving):
                self.manager.wait_until_finished()
            self._saving = None

    def save(self, step: int, state, data_iterator, metadata: dict) -> None:
        metadata = {**metadata, "step": int(step), "kept": step in self.kept, "checksums": True}
        self._finish_saving()
        self._saving = step
        with self._disk_full_is_a_user_error(step):
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
        if self.wait:
            self._finish_saving()
        self._metadata[step] = metadata
        self.write_index()

    def metadata(self, step: int) -> dict:
        if step not in self._metadata:
            self._metadata[step] = read_metadata(self.directory, step)
        return self._metadata[step]

    def restore(self, step: int, state_spec, data_iterator):
        """The full train state and data position of `step`, verified; raises naming a mismatched parameter or a damaged file."""
        if step not in self._verified:
            verify(self.directory, step)
            self._verified.add(step)
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
        if self._failed:
            return  # the error is on its way to the user; orbax would only raise it again
        self._finish_saving()
        self.write_index()
        self.manager.close()
