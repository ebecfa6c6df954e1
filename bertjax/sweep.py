"""Ablation sweeps: a config file names the arms, one command runs (or resumes) them, a table answers.

A sweep file under `configs/ablations/` has the usual `get_config()` (the pretraining config every arm
starts from, plus a `sweep` section naming the downstream task) and a `get_sweep()` returning a list of
`Arm`s built with the helpers below:

    def get_sweep():
        objectives = [Arm(o, {"data.sentence_objective": o}) for o in ("none", "nsp", "sop")]
        return product(objectives, seeds(3))

Every arm runs as two ordinary CLI commands, `bertjax pretrain` then `bertjax finetune`, each in its own
workdir under the sweep's workdir (so `--print-commands` hands exactly those to a cluster scheduler, and
an arm can be resumed or inspected like any run). Overrides given to `bertjax sweep` apply to every arm;
an arm's own overrides replace them for the keys the arm names.
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

from bertjax import config as config_lib
from bertjax.errors import UserError

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
    arm: Arm
    workdir: pathlib.Path
    pretrain: list[str]
    finetune: list[str] | None

    @property
    def pretrain_dir(self) -> pathlib.Path:
        return self.workdir / "pretrain"

    @property
    def finetune_dir(self) -> pathlib.Path:
        return self.workdir / "finetune"


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
    finetune_base = _flatten(config.sweep.finetune)
    task_spec = config_lib.absolute_spec(config.sweep.task) if config.sweep.task else ""
    task_config = config_lib.resolve_paths(config_lib.load(task_spec)) if task_spec else None
    plans = []
    for arm in arms:
        arm_dir = workdir / arm.name
        resolved = {k: config_lib.resolve_path(k, v) for k, v in arm.overrides.items()}
        pretrain_overrides = {k: v for k, v in resolved.items() if not k.startswith(FINETUNE_PREFIX)}
        finetune_overrides = dict(finetune_base)
        finetune_overrides.update({k[len(FINETUNE_PREFIX) :]: v for k, v in resolved.items() if k.startswith(FINETUNE_PREFIX)})
        pretrain = python + ["pretrain", "--config", config_spec, "--workdir", str(arm_dir / "pretrain")]
        pretrain += [f for f in user_pretrain if _flag_key(f) not in pretrain_overrides]
        pretrain += _path_flags(config, skip=pretrain_overrides)
        pretrain += _override_flags(pretrain_overrides)
        finetune = None
        if task_config is not None:
            finetune = python + ["finetune", "--config", task_spec, "--workdir", str(arm_dir / "finetune")]
            finetune += [f"--config.init_from={arm_dir / 'pretrain'}"]
            finetune += _path_flags(task_config, skip=set(finetune_overrides) | {"init_from"})
            finetune += _override_flags(finetune_overrides)
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
            (p.workdir / STATUS).write_text(json.dumps(dict(arm=p.arm.name, pretrain="printed", finetune="skipped" if p.finetune is None else "printed")))
            commands = [p.pretrain, ["touch", str(p.workdir / PRETRAIN_DONE)]] + ([p.finetune] if p.finetune else [])
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
    status = dict(arm=p.arm.name, pretrain="done", finetune="skipped" if p.finetune is None else "done")
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
    if p.finetune is not None and "failure" not in status:
        if (p.finetune_dir / "results.json").exists():
            log.info("  fine-tuning finished before: skipped")
        else:
            code = runner(p.finetune, p.workdir / "finetune.log")
            if code != 0:
                status.update(finetune="failed", failure=f"fine-tuning failed (exit {code})", log=str(p.workdir / "finetune.log"))
                log.error("  %s: see %s", status["failure"], status["log"])
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


PRETRAIN_COLUMNS = ("loss", "eval/mlm_loss", "eval/mlm_accuracy", "eval/nsp_accuracy", "eval/sop_accuracy")


def _last_values(rows: Iterable[dict], keys: Sequence[str]) -> dict:
    last = {}
    for row in rows:
        for key in keys:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                last[key] = float(value)
    return last


def _downstream(results_path: pathlib.Path) -> dict:
    """Dev metrics of a fine-tuning run, as lists: one value per fine-tuning seed."""
    if not results_path.exists():
        return {}
    results = json.loads(results_path.read_text())
    metrics = results.get("metrics", results)
    values = {}
    for name, value in metrics.items():
        if isinstance(value, dict) and "mean" in value:
            values[f"dev/{name}"] = [float(v) for v in value.get("runs", [value["mean"]])]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[f"dev/{name}"] = [float(value)]
    return values


def _arm_dirs(workdir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p.parent for p in workdir.glob("*/arm.json"))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def arm_status(arm_dir: pathlib.Path) -> dict:
    """An arm's outcome: {'state': 'done' | 'failed' | 'unfinished', and for a failed arm 'failure' and 'log'}."""
    recorded = json.loads((arm_dir / STATUS).read_text()) if (arm_dir / STATUS).exists() else {}
    finetuned = recorded.get("finetune") == "skipped" or (arm_dir / "finetune" / "results.json").exists()
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


def collect(workdir: str | pathlib.Path) -> str:
    """Write results.csv, results.md and plots for every arm under `workdir`; return the table.

    Every arm has a row's worth of say: the `status` column names the arms of a group that failed or
    have not finished, and results.md lists each failed arm with its log. The metrics of an arm whose
    pretraining failed are left out of the means (a crashed run's last values would pass for results).
    """
    workdir = pathlib.Path(workdir)
    arm_dirs = _arm_dirs(workdir)
    if not arm_dirs:
        raise UserError(f"no arms under {workdir} (each arm directory holds an arm.json): give the --workdir of a `bertjax sweep`")
    groups: dict[str, list[dict]] = {}
    members: dict[str, list[tuple[str, dict]]] = {}
    order = []
    for arm_dir in arm_dirs:
        arm = json.loads((arm_dir / "arm.json").read_text())
        status = arm_status(arm_dir)
        values = {} if status.get("failure", "").startswith("pretraining") else _last_values(read_metrics(arm_dir / "pretrain"), PRETRAIN_COLUMNS)
        values.update(_downstream(arm_dir / "finetune" / "results.json"))
        values["finished"] = float((arm_dir / PRETRAIN_DONE).exists())
        if arm["group"] not in groups:
            order.append(arm["group"])
        groups.setdefault(arm["group"], []).append(values)
        members.setdefault(arm["group"], []).append((arm_dir.name, status))
    columns = [c for c in PRETRAIN_COLUMNS if any(c in v for g in groups.values() for v in g)]
    columns += sorted({k for g in groups.values() for v in g for k in v if k.startswith("dev/")})
    rows = []
    for group in order:
        runs = groups[group]
        row = dict(arm=group, runs=len(runs), finished=int(sum(v["finished"] for v in runs)), status=_group_status(members[group]))
        for column in columns:
            # Pretraining metrics: one value per pretraining seed; dev metrics: one per (pretraining seed,
            # fine-tuning seed), since fine-tuning varies between seeds as much as the arms often do.
            present = [x for v in runs if column in v for x in (v[column] if isinstance(v[column], list) else [v[column]])]
            if present:
                row[column], row[column + " std"] = _mean_std(present)
        rows.append(row)
    header = ["arm", "runs", "finished"] + [c for column in columns for c in (column, column + " std")] + ["status"]
    with open(workdir / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    table = ["| arm | runs | " + " | ".join(columns) + " | status |", "|---|---|" + "---|" * len(columns) + "---|"]
    for row in rows:
        cells = [f"{row[c]:.4f} ± {row[c + ' std']:.4f}" if c in row else "–" for c in columns]
        table.append(f"| {row['arm']} | {row['finished']}/{row['runs']} | " + " | ".join(cells) + f" | {row['status']} |")
    failed = [(name, s) for group in order for name, s in members[group] if s["state"] == "failed"]
    if failed:
        table += ["", "Failed arms (left out of the means; run the sweep again to retry them):", ""]
        table += [f"- {name}: {s['failure']}, log `{s['log']}`" for name, s in failed]
    markdown = "\n".join(table) + "\n"
    (workdir / "results.md").write_text(markdown)
    _plot_sweep(workdir, arm_dirs, rows, columns)
    return markdown


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
    downstream = [c for c in columns if c.startswith("dev/")] or [c for c in columns if c.startswith("eval/")]
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
