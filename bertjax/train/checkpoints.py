"""Checkpoints as the trainer writes them (orbax): a rolling one to resume from, and a kept schedule
for embryology. Reading them back, for any purpose, is `bertjax.checkpoint_io`, which also describes
the layout.

The rolling policy keeps the newest `checkpoint.keep`; the kept schedule (`checkpoint.keep_steps`,
every `checkpoint.keep_every`, `checkpoint.keep_log` log-spaced steps) is never deleted. Orbax writes
each step into a temporary directory and renames it when complete, so a process killed mid-save
leaves no directory that could be mistaken for a checkpoint; the tmp leftovers are removed on start.
"""

from __future__ import annotations

import json
import pathlib

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from bertjax.checkpoint_io import CHECKPOINTS, check_shapes, complete_steps, read_metadata


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
