"""Ablation sweeps: a config file names the arms, one command runs (or resumes) them, a table answers.

A sweep file under `configs/ablations/` has the usual `get_config()` (the pretraining config every arm
starts from, plus a `sweep` section naming the downstream task) and a `get_sweep()` returning a list of
`Arm`s built with the helpers below:

    def get_sweep():
        objectives = [Arm(o, {"data.sentence_objective": o}) for o in ("none", "nsp", "sop")]
        return product(objectives, seeds(3))

Every arm runs as ordinary CLI commands, `bertjax pretrain` then `bertjax finetune` (once per task of
`sweep.finetune.suite`, e.g. configs/suites.py:local, else once for `sweep.task`), each in its own
workdir under the sweep's workdir (so `--print-commands` hands exactly those to a cluster scheduler, and
an arm can be resumed or inspected like any run). Overrides given to `bertjax sweep` apply to every arm;
an arm's own overrides replace them for the keys the arm names.

`collect` reports each task's held-out score (selected on dev, never the best dev score itself), the
suite's mean of primary metrics, the fine-tuning runs that collapsed (counted, and left out in a
second set of means), and comparisons.csv: every pair of arms compared with the multi-bootstrap over
pretraining seeds, fine-tuning seeds and held-out examples (`eval/stats.py`).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
from typing import Callable, Iterable, Sequence

import numpy as np

from bertjax import config as config_lib
from bertjax.errors import UserError
from bertjax.eval import per_example, stats

log = logging.getLogger(__name__)

FINETUNE_PREFIX = "sweep.finetune."
SEED_KEYS = ("train.seed", "train.dropout_seed")
PRETRAIN_DONE = "pretrain.done"
STATUS = "status.json"  # in each arm's directory: how each of its two commands ended, and where its logs are


class ArmsFailed(UserError):
    """Some arms of a sweep failed (the others ran); `statuses` has every arm's outcome and log."""

    def __init__(self, message: str, statuses: list[dict]):
        super().__init__(message)
        self.statuses = statuses


@dataclasses.dataclass(frozen=True)
class Arm:
    """One run of a sweep: a short name and the config overrides (dotted keys) that define it.

    `group` is the name results are aggregated under: arms that differ only in seed share a group.
    Keys under `sweep.finetune.` apply to the downstream fine-tuning run, all others to pretraining.
    """

    name: str
    overrides: dict
    group: str = ""

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise config_lib.ConfigError(f"arm name {self.name!r} must be a non-empty directory name (no '/', no leading '.')")
        if not self.group:
            object.__setattr__(self, "group", self.name)


def seeds(count_or_list: int | Sequence[int], keys: Sequence[str] = SEED_KEYS) -> list[Arm]:
    """Arms that vary the initialisation and dropout seeds only (the data seed stays: same data order)."""
    values = range(count_or_list) if isinstance(count_or_list, int) else count_or_list
    return [Arm(f"seed{s}", {key: s for key in keys}, group="") for s in values]


def _is_seed_arm(arm: Arm) -> bool:
    return arm.name.startswith("seed") and set(arm.overrides) <= set(SEED_KEYS)


def _combine(arms: Sequence[Arm]) -> Arm:
    overrides = {}
    for arm in arms:
        clash = set(overrides) & set(arm.overrides)
        if clash:
            raise config_lib.ConfigError(f"arms {[a.name for a in arms]} set the same keys {sorted(clash)}: give each key to one axis")
        overrides.update(arm.overrides)
    group = "-".join(a.name for a in arms if not _is_seed_arm(a)) or "all"
    return Arm("-".join(a.name for a in arms), overrides, group=group)


def product(*axes: Sequence[Arm]) -> list[Arm]:
    """Every combination of one arm from each axis (e.g. objectives x seeds)."""
    return [_combine(combo) for combo in itertools.product(*axes)]


def zip_arms(*axes: Sequence[Arm]) -> list[Arm]:
    """The i-th arms of all axes together (the axes must be equally long)."""
    lengths = {len(axis) for axis in axes}
    if len(lengths) != 1:
        raise config_lib.ConfigError(f"zip_arms needs axes of one length, got {sorted(lengths)}")
    return [_combine(combo) for combo in zip(*axes)]


def _check_unique(arms: Sequence[Arm]) -> None:
    names = [arm.name for arm in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise config_lib.ConfigError(f"arm names must be unique; repeated: {duplicates}")


# ---------------------------------------------------------------------------------------------- commands


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def _override_flags(overrides: dict) -> list[str]:
    return [f"--config.{key}={_format_value(value)}" for key, value in overrides.items()]


def _flag_key(flag: str) -> str:
    return flag.split("=", 1)[0][len("--config.") :]


def _flatten(config_dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config_dict.items():
        if hasattr(value, "items"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclasses.dataclass
class ArmPlan:
    """An arm's commands: pretraining, then one fine-tuning command per task ('' = the single `sweep.task`)."""

    arm: Arm
    workdir: pathlib.Path
    pretrain: list[str]
    finetune: dict[str, list[str]]

    @property
    def pretrain_dir(self) -> pathlib.Path:
        return self.workdir / "pretrain"

    def finetune_dir(self, task: str) -> pathlib.Path:
        return finetune_dir(self.workdir, task)


def finetune_dir(arm_dir: pathlib.Path, task: str) -> pathlib.Path:
    """arm/finetune for a single task (the layout of sweeps before suites), arm/finetune/TASK in a suite."""
    return arm_dir / "finetune" / task if task else arm_dir / "finetune"


def _tasks(config) -> dict[str, tuple[str, dict]]:
    """{task: (absolute fine-tuning config spec, the task's own flat settings)}: the suite's, or '' -> sweep.task."""
    suite = config.sweep.finetune.get("suite", "")
    if not suite:
        return {"": (config_lib.absolute_spec(config.sweep.task), {})} if config.sweep.task else {}
    tasks = {}
    for name, entry in config_lib.load(config_lib.absolute_spec(suite)).items():
        spec = config_lib.absolute_spec(entry.config)
        settings = {key: config_lib.resolve_path(key, value) for key, value in _flatten(entry.get("settings", {})).items()}
        tasks[name] = (spec, settings)
    if not tasks:
        raise config_lib.ConfigError(f"config.sweep.finetune.suite={suite!r} names no tasks")
    return tasks


def _path_flags(config, skip) -> list[str]:
    """`--config.KEY=PATH` for every path the config sets, absolute: a command then reads the same files from any directory."""
    return [f"--config.{key}={value}" for key, value in config_lib.path_values(config).items() if value and key not in skip]


def plan(config_spec: str, config, workdir: str | pathlib.Path, user_overrides: Sequence[str], arms: Sequence[Arm]) -> list[ArmPlan]:
    """The two commands of every arm: pretraining, then fine-tuning from the arm's pretrained weights.

    `config` is the sweep's config with the user's overrides applied (as the CLI passes it); its
    paths replace the user's path overrides in the commands.

    Every path in them is absolute (workdirs, config files, init_from, data files, also those that a
    config file derives from the working directory or the environment), so that the commands that
    `--print-commands` hands to a scheduler run the same wherever it starts them.
    """
    _check_unique(arms)
    workdir = pathlib.Path(os.path.abspath(workdir))
    config_spec = config_lib.absolute_spec(config_spec)
    config = config_lib.resolve_paths(config.copy_and_resolve_references())
    python = [sys.executable, "-m", "bertjax"]
    paths = config_lib.path_values(config)
    # The config already holds the user's overrides; its paths go into the commands resolved, below.
    user_pretrain = [f for f in user_overrides if not _flag_key(f).startswith("sweep.") and _flag_key(f) not in paths]
    finetune_base = {k: v for k, v in _flatten(config.sweep.finetune).items() if k != "suite"}
    tasks = _tasks(config)
    task_configs = {name: config_lib.resolve_paths(config_lib.load(spec)) for name, (spec, _) in tasks.items()}
    plans = []
    for arm in arms:
        arm_dir = workdir / arm.name
        resolved = {k: config_lib.resolve_path(k, v) for k, v in arm.overrides.items()}
        pretrain_overrides = {k: v for k, v in resolved.items() if not k.startswith(FINETUNE_PREFIX)}
        arm_finetune = {k[len(FINETUNE_PREFIX) :]: v for k, v in resolved.items() if k.startswith(FINETUNE_PREFIX)}
        pretrain = python + ["pretrain", "--config", config_spec, "--workdir", str(arm_dir / "pretrain")]
        pretrain += [f for f in user_pretrain if _flag_key(f) not in pretrain_overrides]
        pretrain += _path_flags(config, skip=pretrain_overrides)
        pretrain += _override_flags(pretrain_overrides)
        finetune = {}
        for task, (spec, settings) in tasks.items():
            # Precedence: the task's config file < sweep.finetune < the suite's task settings < the arm's keys.
            overrides = {**finetune_base, **settings, **arm_finetune}
            command = python + ["finetune", "--config", spec, "--workdir", str(finetune_dir(arm_dir, task))]
            command += [f"--config.init_from={arm_dir / 'pretrain'}"]
            command += _path_flags(task_configs[task], skip=set(overrides) | {"init_from"})
            command += _override_flags(overrides)
            finetune[task] = command
        plans.append(ArmPlan(arm, arm_dir, pretrain, finetune))
    return plans


def _load_sweep(config_spec: str) -> list[Arm]:
    path = config_spec.partition(":")[0]
    module = config_lib.load_module(path)
    if not hasattr(module, "get_sweep"):
        raise config_lib.ConfigError(f"{path} defines no get_sweep(): it is not a sweep config")
    return list(module.get_sweep())


def _run_command(command: list[str], log_path: pathlib.Path) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log_file:
        log_file.write("$ " + shlex.join(command) + "\n")
        log_file.flush()
        return subprocess.call(command, stdout=log_file, stderr=subprocess.STDOUT)


def run(
    config_spec: str,
    config,
    workdir: str,
    user_overrides: Sequence[str] = (),
    print_commands: bool = False,
    runner: Callable[[list[str], pathlib.Path], int] = _run_command,
) -> list[dict]:
    """Run (or resume) every arm one after another and return each arm's outcome.

    A failed arm is logged and the others go on; at the end, after the table, ArmsFailed (a UserError:
    `bertjax sweep` exits 1) names the failed arms and their logs. With `print_commands`, nothing
    runs: one shell line per arm is printed, and the arm directories are laid out so that
    `collect` finds the arms once a scheduler has run those lines.
    """
    arms = _load_sweep(config_spec)
    plans = plan(config_spec, config, workdir, user_overrides, arms)
    root = pathlib.Path(os.path.abspath(workdir))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--workdir {root}: cannot create it ({error.strerror})") from None
    (root / "sweep.json").write_text(
        json.dumps(dict(config=config_lib.absolute_spec(config_spec), overrides=list(user_overrides), arms=[dataclasses.asdict(a) for a in arms]), indent=2)
    )
    for p in plans:
        p.workdir.mkdir(parents=True, exist_ok=True)
        (p.workdir / "arm.json").write_text(json.dumps(dataclasses.asdict(p.arm), indent=2))
    if print_commands:
        for p in plans:
            (p.workdir / STATUS).write_text(json.dumps(dict(arm=p.arm.name, pretrain="printed", finetune="printed" if p.finetune else "skipped", tasks=list(p.finetune))))
            commands = [p.pretrain, ["touch", str(p.workdir / PRETRAIN_DONE)]] + list(p.finetune.values())
            print(" && ".join(shlex.join(command) for command in commands))
        return []
    statuses = [_run_arm(p, index, len(plans), runner) for index, p in enumerate(plans, 1)]
    print(collect(root))
    failed = [s for s in statuses if "failure" in s]
    if failed:
        summary = "; ".join(f"{s['arm']}: {s['failure']}, log {s['log']}" for s in failed)
        raise ArmsFailed(
            f"{len(failed)} of {len(statuses)} arms failed: {summary}. Table: {root / 'results.md'}; "
            "run the same command again to retry the failed arms (finished ones are skipped)",
            statuses,
        )
    return statuses


def _run_arm(p: ArmPlan, index: int, count: int, runner) -> dict:
    """Pretrain (unless done before), then fine-tune (unless done before); record the outcome in the arm's status.json."""
    status = dict(arm=p.arm.name, pretrain="done", finetune="done" if p.finetune else "skipped")
    log.info("arm %d/%d: %s", index, count, p.arm.name)
    if (p.workdir / PRETRAIN_DONE).exists():
        log.info("  pretraining finished before: skipped")
    else:
        code = runner(p.pretrain, p.workdir / "pretrain.log")
        if code != 0:
            status.update(pretrain="failed", finetune="not run", failure=f"pretraining failed (exit {code})", log=str(p.workdir / "pretrain.log"))
            log.error("  %s: see %s", status["failure"], status["log"])
        else:
            (p.workdir / PRETRAIN_DONE).touch()
    for task, command in p.finetune.items():
        if "failure" in status:
            break
        label = f"fine-tuning {task}".rstrip()
        if (p.finetune_dir(task) / "results.json").exists():
            log.info("  %s finished before: skipped", label)
            continue
        log_path = p.workdir / (f"finetune_{task}.log" if task else "finetune.log")
        code = runner(command, log_path)
        if code != 0:
            status.update(finetune="failed", failure=f"{label} failed (exit {code})", log=str(log_path))
            log.error("  %s: see %s", status["failure"], status["log"])
    if p.finetune:
        status["tasks"] = list(p.finetune)
    (p.workdir / STATUS).write_text(json.dumps(status, indent=2))
    return status


# --------------------------------------------------------------------------------------------- collect


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; a line that is not JSON (a run killed mid-write) is skipped, counted and logged."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    bad.append(number)
    if bad:
        log.warning("%s: skipped %d line(s) that are not JSON (a run killed while writing?): line %s", path, len(bad), ", ".join(map(str, bad[:5])))
    return rows


# The held-out metrics of either objective (bertjax/train/pretrain.py): masked LM and the sentence tasks,
# or seq2seq denoising's reconstruction loss, its nll (the loss without label smoothing) and token accuracy.
PRETRAIN_COLUMNS = (
    *("loss", "eval/mlm_loss", "eval/mlm_accuracy", "eval/nsp_accuracy", "eval/sop_accuracy"),
    *("eval/loss", "eval/nll", "eval/token_accuracy"),
)


def _last_values(rows: Iterable[dict], keys: Sequence[str]) -> dict:
    last = {}
    for row in rows:
        for key in keys:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                last[key] = float(value)
    return last


@dataclasses.dataclass
class TaskRuns:
    """One arm's fine-tuning runs on one task, as collect reads them from the task's results.json.

    scores: one {metric: value} per fine-tuning seed, on the held-out set when `heldout` (else the dev
    score at the dev-selected step: a selection score, labelled as such in the table); failed: per
    seed; examples: per seed the held-out per-example statistics (None when not saved).
    """

    task: str
    primary: str
    heldout: bool
    scores: list[dict]
    failed: list[bool]
    examples: list[dict | None]
    positive: str | None = None

    def column(self, metric: str) -> str:
        return f"{self.task}/{metric}" if self.heldout else f"{self.task}/{metric} (dev, selection)"


def _task_runs(task: str, task_dir: pathlib.Path) -> TaskRuns:
    results = json.loads((task_dir / "results.json").read_text())
    config = json.loads((task_dir / "config.json").read_text()) if (task_dir / "config.json").exists() else {}
    positive = config.get("task", {}).get("positive_label")
    if "per_seed" in results:
        runs = results["per_seed"]
        heldout = all("test" in run for run in runs)
        scores = [run["test"] if heldout else run["metrics"] for run in runs]
        failed = [bool(run.get("failed")) for run in runs]
        examples = [run.get("heldout_examples") for run in runs]
    else:
        # A summary only (results.json of an older or a hand-made run): the per-seed values of each metric.
        summaries = {k: v for k, v in results.get("metrics", results).items() if isinstance(v, dict) and "mean" in v}
        count = max((len(v.get("runs", [v["mean"]])) for v in summaries.values()), default=0)
        heldout, failed, examples = False, [False] * count, [None] * count
        scores = [{k: float(v.get("runs", [v["mean"]] * count)[i]) for k, v in summaries.items()} for i in range(count)]
    primary = results.get("primary_metric") or (next(iter(scores[0])) if scores else "")
    return TaskRuns(results.get("task") or task or "task", primary, heldout, scores, failed, examples, positive)


def _arm_tasks(arm_dir: pathlib.Path) -> list[TaskRuns]:
    """The arm's finished fine-tuning tasks: arm/finetune (one task) or arm/finetune/TASK (a suite)."""
    if (arm_dir / "finetune" / "results.json").exists():
        return [_task_runs("", arm_dir / "finetune")]
    return [_task_runs(path.parent.name, path.parent) for path in sorted((arm_dir / "finetune").glob("*/results.json"))]


SUITE_MEAN = "mean (primary metrics)"


def _downstream(tasks: Sequence[TaskRuns], without_failed: bool = False) -> dict:
    """{column: one value per fine-tuning run}; with several tasks also the suite's mean of the primary
    metrics, run i averaging run i of every task."""
    values = {}
    for task in tasks:
        kept = [s for s, failed in zip(task.scores, task.failed) if not (without_failed and failed)]
        for metric in task.scores[0] if task.scores else ():
            values[task.column(metric)] = [s[metric] for s in kept]
    if len(tasks) > 1:
        primaries = [values[t.column(t.primary)] for t in tasks]
        count = min(len(p) for p in primaries)
        values[SUITE_MEAN] = [float(np.mean([p[i] for p in primaries])) for i in range(count)]
    return values


def _arm_dirs(workdir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p.parent for p in workdir.glob("*/arm.json"))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def arm_status(arm_dir: pathlib.Path) -> dict:
    """An arm's outcome: {'state': 'done' | 'failed' | 'unfinished', and for a failed arm 'failure' and 'log'}."""
    recorded = json.loads((arm_dir / STATUS).read_text()) if (arm_dir / STATUS).exists() else {}
    tasks = recorded.get("tasks", [""])
    finetuned = recorded.get("finetune") == "skipped" or all((finetune_dir(arm_dir, task) / "results.json").exists() for task in tasks)
    if (arm_dir / PRETRAIN_DONE).exists() and finetuned:
        return dict(state="done")
    if "failure" in recorded:
        return dict(state="failed", failure=recorded["failure"], log=recorded["log"])
    return dict(state="unfinished")


def _group_status(members: Sequence[tuple[str, dict]]) -> str:
    """'done', or the arms that are not, e.g. 'failed: sop-seed1; unfinished: sop-seed2'."""
    parts = []
    for state in ("failed", "unfinished"):
        names = [name for name, status in members if status["state"] == state]
        if names:
            parts.append(f"{state}: {', '.join(names)}")
    return "; ".join(parts) or "done"


def _cell(row: dict, column: str) -> str:
    return f"{row[column]:.4f} ± {row[column + ' std']:.4f}" if column in row else "–"


def _table(rows: Sequence[dict], columns: Sequence[str]) -> list[str]:
    lines = ["| arm | runs | " + " | ".join(columns) + " | status |", "|---|---|" + "---|" * len(columns) + "---|"]
    for row in rows:
        lines.append(f"| {row['arm']} | {row['finished']}/{row['runs']} | " + " | ".join(_cell(row, c) for c in columns) + f" | {row['status']} |")
    return lines


def _summary_rows(order, groups, members, columns) -> list[dict]:
    rows = []
    for group in order:
        runs = groups[group]
        row = dict(arm=group, runs=len(runs), finished=int(sum(v["finished"] for v in runs)), status=_group_status(members[group]))
        for column in columns:
            # Pretraining metrics: one value per pretraining seed; downstream metrics: one per (pretraining
            # seed, fine-tuning seed), since fine-tuning varies between seeds as much as the arms often do.
            present = [x for v in runs if column in v for x in (v[column] if isinstance(v[column], list) else [v[column]])]
            if present:
                row[column], row[column + " std"] = _mean_std(present)
        rows.append(row)
    return rows


def collect(workdir: str | pathlib.Path, num_samples: int = 1000) -> str:
    """Write results.csv, results.md, comparisons.csv and plots for every arm under `workdir`; return the table.

    Downstream columns are held-out scores at the dev-selected steps ('TASK/METRIC'); a task run
    without a held-out set shows its dev score as 'TASK/METRIC (dev, selection)', never as a result.
    Every arm has a row's worth of say: the `status` column names the arms of a group that failed or
    have not finished, and results.md lists each failed arm with its log. The metrics of an arm whose
    pretraining failed are left out of the means (a crashed run's last values would pass for results).
    Fine-tuning runs that collapsed (results.json's failed_seeds) are counted per arm and task; the
    means are given with them and, in a second table, without them.
    """
    workdir = pathlib.Path(workdir)
    arm_dirs = _arm_dirs(workdir)
    if not arm_dirs:
        raise UserError(f"no arms under {workdir} (each arm directory holds an arm.json): give the --workdir of a `bertjax sweep`")
    groups: dict[str, list[dict]] = {}
    kept_groups: dict[str, list[dict]] = {}
    members: dict[str, list[tuple[str, dict]]] = {}
    task_runs: dict[str, list[tuple[str, TaskRuns]]] = {}
    order = []
    for arm_dir in arm_dirs:
        arm = json.loads((arm_dir / "arm.json").read_text())
        status = arm_status(arm_dir)
        values = {} if status.get("failure", "").startswith("pretraining") else _last_values(read_metrics(arm_dir / "pretrain"), PRETRAIN_COLUMNS)
        tasks = _arm_tasks(arm_dir)
        kept = dict(values, **_downstream(tasks, without_failed=True))
        values.update(_downstream(tasks))
        values["finished"] = kept["finished"] = float((arm_dir / PRETRAIN_DONE).exists())
        if arm["group"] not in groups:
            order.append(arm["group"])
        groups.setdefault(arm["group"], []).append(values)
        kept_groups.setdefault(arm["group"], []).append(kept)
        members.setdefault(arm["group"], []).append((arm_dir.name, status))
        task_runs.setdefault(arm["group"], []).extend((arm_dir.name, task) for task in tasks)
    columns = [c for c in PRETRAIN_COLUMNS if any(c in v for g in groups.values() for v in g)]
    downstream = sorted({k for g in groups.values() for v in g for k in v if "/" in k and k not in PRETRAIN_COLUMNS and not k.startswith("eval/")})
    downstream += [SUITE_MEAN] if any(SUITE_MEAN in v for g in groups.values() for v in g) else []
    columns += downstream
    rows = _summary_rows(order, groups, members, columns)
    failed = {group: _failed_counts(task_runs.get(group, [])) for group in order}
    for row in rows:
        row["failed runs"] = failed[row["arm"]]
    kept_rows = _summary_rows(order, kept_groups, members, columns)
    header = ["arm", "runs", "finished"] + [c for column in columns for c in (column, column + " std")] + ["failed runs"]
    header += [f"{c} without failed" for column in downstream for c in (column, column + " std")] + ["status"]
    for row, kept_row in zip(rows, kept_rows):
        row.update({f"{c} without failed": kept_row[c] for column in downstream for c in (column, column + " std") if c in kept_row})
    with open(workdir / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    table = _table(rows, columns)
    if downstream:
        table += ["", "Downstream: held-out scores at the step each run's dev score selected (mean ± std over pretraining x fine-tuning seeds)."]
    if any(failed.values()):
        table += ["", "Failed fine-tuning runs (dev score at the majority-class level, or one constant prediction), per arm:", ""]
        table += [f"- {group}: {failed[group] or 'none'}" for group in order]
        table += ["", "The same, without the failed runs:", ""] + _table(kept_rows, downstream)
    failed_arms = [(name, s) for group in order for name, s in members[group] if s["state"] == "failed"]
    if failed_arms:
        table += ["", "Failed arms (left out of the means; run the sweep again to retry them):", ""]
        table += [f"- {name}: {s['failure']}, log `{s['log']}`" for name, s in failed_arms]
    comparisons = compare_arms(order, task_runs, num_samples=num_samples)
    _write_comparisons(workdir / "comparisons.csv", comparisons)
    if comparisons:
        table += ["", *_comparison_table(comparisons)]
        _plot_comparisons(workdir / "comparisons.png", comparisons)
    markdown = "\n".join(table) + "\n"
    (workdir / "results.md").write_text(markdown)
    _plot_sweep(workdir, arm_dirs, rows, columns)
    return markdown


def _failed_counts(runs: Sequence[tuple[str, TaskRuns]]) -> str:
    """'sst2 1/6, cola 0/6' ('' when none failed): failed fine-tuning runs of each task over all its runs."""
    totals: dict[str, list[int]] = {}
    for _, task in runs:
        counts = totals.setdefault(task.task, [0, 0])
        counts[0] += sum(task.failed)
        counts[1] += len(task.failed)
    if not any(failed for failed, _ in totals.values()):
        return ""
    return ", ".join(f"{task} {failed}/{count}" for task, (failed, count) in totals.items())


# ------------------------------------------------------------------------------------------ comparisons

# comparisons.csv: the difference A - B, its interval and p-value, the seeds and examples behind it, the
# failed runs on each side, and the same comparison without them.
COMPARISON_COLUMNS = (
    *("metric", "arm_a", "arm_b", "difference", "low", "high", "p_value", "separated"),
    *("pretraining_seeds_a", "pretraining_seeds_b", "finetuning_seeds_a", "finetuning_seeds_b", "examples"),
    *("failed_a", "failed_b", "difference_without_failed", "low_without_failed", "high_without_failed", "p_value_without_failed"),
)


def _runs(entries: Sequence[tuple[str, TaskRuns]], task: str, metric: str, without_failed: bool) -> stats.Runs | None:
    """The multi-bootstrap input of one arm on one task's metric: per-example statistics of every run
    (grouped by pretraining arm); None when a run lacks them or none is left."""
    stats_rows, groups, metric_fn = [], [], None
    for arm_name, task_runs in entries:
        if task_runs.task != task or not task_runs.heldout:
            continue
        for examples, failed in zip(task_runs.examples, task_runs.failed):
            if examples is None:
                return None
            if without_failed and failed:
                continue
            metric_fn = per_example.metric(examples["kind"], metric, examples.get("classes"), task_runs.positive)
            if metric_fn is None:
                return None
            stats_rows.append(np.asarray(examples["rows"], dtype=np.float64))
            groups.append(arm_name)
    if not stats_rows or len({r.shape for r in stats_rows}) != 1:
        return None
    return stats.Runs(np.stack(stats_rows), tuple(groups), metric_fn)


def compare_arms(order: Sequence[str], task_runs: dict, num_samples: int = 1000, seed: int = 0) -> list[dict]:
    """A row per (metric, arm A, arm B) for every pair of arms: the multi-bootstrap difference of each
    task's held-out metrics and of the suite's mean of primary metrics, with and without failed runs."""
    metrics = {}  # (task, metric) -> primary?
    for entries in task_runs.values():
        for _, task in entries:
            if task.heldout and task.scores:
                metrics.update({(task.task, m): m == task.primary for m in task.scores[0]})
    tasks = sorted({task for task, _ in metrics})
    rows = []
    for i, arm_a in enumerate(order):
        for arm_b in order[i + 1 :]:
            a_entries, b_entries = task_runs.get(arm_a, []), task_runs.get(arm_b, [])
            targets = [(f"{task}/{metric}", [(task, metric)]) for task, metric in sorted(metrics)]
            if len(tasks) > 1:
                targets.append((SUITE_MEAN, [(task, metric) for (task, metric), primary in sorted(metrics.items()) if primary]))
            for name, parts in targets:
                row = dict(metric=name, arm_a=arm_a, arm_b=arm_b)
                for suffix, without in (("", False), ("_without_failed", True)):
                    pairs = [(_runs(a_entries, t, m, without), _runs(b_entries, t, m, without)) for t, m in parts]
                    if not pairs or any(a is None or b is None or a.stats.shape[1:] != b.stats.shape[1:] for a, b in pairs):
                        continue
                    result = stats.multi_bootstrap(pairs, num_samples=num_samples, seed=seed)
                    row.update({f"difference{suffix}": result.difference, f"low{suffix}": result.low, f"high{suffix}": result.high, f"p_value{suffix}": result.p_value})
                    if not without:
                        a, b = pairs[0]
                        row.update(
                            separated=not result.low <= 0.0 <= result.high,
                            pretraining_seeds_a=a.pretraining_seeds,
                            pretraining_seeds_b=b.pretraining_seeds,
                            finetuning_seeds_a=a.finetuning_seeds,
                            finetuning_seeds_b=b.finetuning_seeds,
                            examples=sum(a.stats.shape[1] for a, _ in pairs),
                        )
                if "difference" in row:
                    names = {task for task, _ in parts}
                    failed = [sum(sum(t.failed) for _, t in entries if t.task in names) for entries in (a_entries, b_entries)]
                    row.update(failed_a=failed[0], failed_b=failed[1])
                    rows.append(row)
    return rows


def _write_comparisons(path: pathlib.Path, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARISON_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _interval(row: dict, suffix: str = "") -> str:
    if f"difference{suffix}" not in row:
        return "–"
    return f"{row['difference' + suffix]:+.4f} [{row['low' + suffix]:+.4f}, {row['high' + suffix]:+.4f}] p={row['p_value' + suffix]:.3g}"


def _comparison_table(rows: Sequence[dict]) -> list[str]:
    lines = [
        "Comparisons (A − B; 95% multi-bootstrap interval over pretraining seeds, fine-tuning seeds and held-out examples):",
        "",
        "| metric | A | B | A − B [95% interval] | without failed runs | seeds A, B (pretraining × fine-tuning) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["separated"]:
            verdict = f"{row['arm_a'] if row['difference'] > 0 else row['arm_b']} higher"
        else:
            verdict = "not separated at this budget"
        seeds = f"{row['pretraining_seeds_a']}×{row['finetuning_seeds_a']}, {row['pretraining_seeds_b']}×{row['finetuning_seeds_b']}"
        lines.append(f"| {row['metric']} | {row['arm_a']} | {row['arm_b']} | {_interval(row)} | {_interval(row, '_without_failed')} | {seeds} | {verdict} |")
    return lines


# ------------------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def _plot_sweep(workdir: pathlib.Path, arm_dirs: Sequence[pathlib.Path], rows: Sequence[dict], columns: Sequence[str]) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for arm_dir in arm_dirs:
        steps, losses = _curve(read_metrics(arm_dir / "pretrain"), "loss")
        if steps:
            axis.plot(steps, losses, label=arm_dir.name, linewidth=1)
    axis.set(xlabel="step", ylabel="training loss", title=f"pretraining loss: {workdir.name}")
    if axis.lines:
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(workdir / "loss_curves.png", dpi=120)
    plt.close(figure)
    downstream = [c for c in columns if c == SUITE_MEAN] or [c for c in columns if c not in PRETRAIN_COLUMNS] or [c for c in columns if c.startswith("eval/")]
    if not downstream:
        return
    metric = downstream[0]
    present = [r for r in rows if metric in r]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.bar([r["arm"] for r in present], [r[metric] for r in present], yerr=[r[metric + " std"] for r in present], capsize=4)
    axis.set(ylabel=metric, title=f"{metric} per arm (mean ± std over seeds)")
    figure.tight_layout()
    figure.savefig(workdir / "downstream.png", dpi=120)
    plt.close(figure)


def _plot_comparisons(path: pathlib.Path, rows: Sequence[dict]) -> None:
    """Each comparison's difference with its 95% interval; the zero line shows which are not separated."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.5))
    positions = range(len(rows))[::-1]
    differences = [r["difference"] for r in rows]
    errors = [[d - r["low"] for d, r in zip(differences, rows)], [r["high"] - d for d, r in zip(differences, rows)]]
    colors = ["C0" if r["separated"] else "0.6" for r in rows]
    for y, d, low, high, color in zip(positions, differences, *errors, colors):
        axis.errorbar(d, y, xerr=[[low], [high]], fmt="o", color=color, capsize=3)
    axis.axvline(0.0, color="k", linewidth=0.8)
    axis.set_yticks(list(positions), [f"{r['metric']}: {r['arm_a']} − {r['arm_b']}" for r in rows], fontsize="small")
    axis.set(xlabel="difference (95% multi-bootstrap interval; grey: not separated)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_run(workdir: str | pathlib.Path) -> str:
    """Draw every logged metric of one run (metrics.jsonl) against the step; return the PNG's path."""
    workdir = pathlib.Path(workdir)
    rows = read_metrics(workdir)
    if not rows:
        raise UserError(f"{workdir / 'metrics.jsonl'} is missing or empty: give the workdir of a run that has logged a step")
    keys = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    plt = _pyplot()
    columns = 3
    lines = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3 * lines), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        steps, values = _curve(rows, key)
        axis.plot(steps, values, marker="." if len(steps) < 30 else None)
        axis.set(title=key, xlabel="step")
    for axis in list(axes.flat)[len(keys) :]:
        axis.axis("off")
    figure.tight_layout()
    out = workdir / "curves.png"
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return str(out)
