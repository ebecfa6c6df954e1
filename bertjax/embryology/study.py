"""`bertjax embryology`: every measure at every kept checkpoint of one or more runs, as a table, a report and plots.

  run(config, sources, out, watch=False) -> Summary      the one entry point (the CLI verb calls it)

A source is anything `checkpoint_io.load_params` reads. A workdir stands for its whole series: step 0
(the initialisation, rebuilt by `features.Model.initial`) and every complete checkpoint on disk;
WORKDIR:STEP sources of one workdir form one run; a HuggingFace directory is a run of one point
(step 0, as it carries no step). Runs whose configs differ only in their seeds form a *group*: the
plots draw a group's mean and its spread over seeds, and groups that differ in more are compared
with the paired multi-bootstrap (`bertjax.eval.stats`).

Each (run, step, measure) is computed once and cached in OUT/cache/RUN/STEP/MEASURE.json (CKA's
token sample as cka_sample.npy beside it), keyed on the measure's settings and the checkpoint's
identity, so a re-run, a changed setting or `--watch` computes only what is missing. A checkpoint
that cannot be read yet (a save in flight: no metadata, or a load that fails checkpoint_io's
checks) is skipped and picked up by the next poll. CKA against the final / previous step, the run's
own metrics.jsonl and the tables are cheap and are derived afresh from the cache every time.

Outputs: OUT/embryology.csv (long form: run, step, tokens_seen, measure, layer, label, value, n; the
measure names are the contract of issue 10), OUT/embryology.md (learning speed per tag, best layer
per probe over time, rise and fall, final values, comparisons) and the PNGs of `plots`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from bertjax import checkpoint_io
from bertjax import config as config_lib
from bertjax.convert import hf
from bertjax.data import tasks
from bertjax.embryology import cka, features, plots, pos, probes
from bertjax.errors import UserError
from bertjax.eval import stats
from bertjax.sweep import SEED_KEYS, read_metrics

log = logging.getLogger(__name__)

COLUMNS = ("run", "step", "tokens_seen", "measure", "layer", "label", "value", "n")
# Config keys that do not change what a run learns, or that are its seeds: runs equal in every
# other key differ only in seed and are drawn as one group with a band.
NOT_THE_RECIPE = ("checkpoint.", "mesh.", "train.progress", "train.run_steps", "train.peak_tflops", "data.num_workers", "data.prefetch", "data.data_dir")
RUN_SEEDS = (*SEED_KEYS, "data.seed")
# Settings that only change the report, not a measure's values (not part of a cache key).
REPORT_ONLY = ("enabled", "function_tags", "content_tags")
FINETUNE_CONFIG = config_lib.REPO_ROOT / "configs" / "finetune.py"


# ---------------------------------------------------------------------------------------------
# Runs and their checkpoints


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    run: str
    step: int
    tokens_seen: int | None
    identity: str  # changes when the checkpoint is rewritten (a new run in the same workdir)
    load: Callable[[], features.Model]
    source: str  # for `init_from`: WORKDIR:STEP, a HuggingFace directory, or '' for step 0


@dataclasses.dataclass
class Run:
    """One studied series: a workdir (all of it, or chosen steps) or a HuggingFace directory."""

    path: pathlib.Path
    steps: tuple[int, ...] | None  # None: every complete checkpoint (and step 0)
    name: str = ""

    @property
    def is_huggingface(self) -> bool:
        return checkpoint_io.is_huggingface_dir(self.path)

    def config(self) -> ml_collections.ConfigDict | None:
        """The run's config (None while a watched run has not written it yet)."""
        if self.is_huggingface:
            config = config_lib.pretrain_config()
            config.model = hf.read_config(self.path)
            return config
        if not (self.path / "config.json").exists():
            return None
        return checkpoint_io.read_config(self.path)

    def complete_steps(self) -> dict[int, dict]:
        """step -> metadata of every checkpoint whose save has finished (listed without orbax, read-only)."""
        directory = self.path / checkpoint_io.CHECKPOINTS
        if not directory.is_dir():
            return {}
        listed = [int(entry.name) for entry in directory.iterdir() if entry.name.isdigit() and entry.is_dir()]
        found = {}
        for step in checkpoint_io.complete_steps(directory, listed):
            try:
                found[step] = checkpoint_io.read_metadata(directory, step)
            except (OSError, ValueError) as error:  # metadata still being written
                log.warning("%s: unreadable metadata (%s): skipped for now", directory / str(step), error)
        return found

    def checkpoints(self, watch: bool) -> list[Checkpoint]:
        if self.is_huggingface:
            model_file = next((self.path / name for name in ("model.safetensors", "pytorch_model.bin") if (self.path / name).exists()), self.path)
            identity = f"hf:{model_file.stat().st_mtime_ns}"
            return [Checkpoint(self.name, 0, None, identity, lambda: features.Model.load(str(self.path)), str(self.path))]
        config = self.config()
        if config is None:
            if watch:
                return []
            raise UserError(f"{self.path}: not a bertjax workdir (no config.json); give a pretraining run's workdir, WORKDIR:STEP or a HuggingFace directory")
        on_disk = self.complete_steps()
        if self.steps is None and not watch and not any(metadata.get("kept") for metadata in on_disk.values()):
            rolling = f"only the rolling checkpoint(s) at step {', '.join(map(str, sorted(on_disk)))}" if on_disk else "no checkpoint at all"
            raise UserError(
                f"{self.path}: no kept checkpoints ({rolling}); pretrain with --config.checkpoint.keep_log=16 "
                "(or checkpoint.keep_steps / keep_every) to keep a series to study"
            )
        wanted = sorted({0, *on_disk}) if self.steps is None else sorted(self.steps)
        run_identity = config_lib.config_hash(config)
        checkpoints = []
        for step in wanted:
            if step == 0 and step not in on_disk:
                checkpoints.append(Checkpoint(self.name, 0, 0, f"initial:{run_identity}", lambda: features.Model.initial(self.path), ""))
            elif step in on_disk:
                metadata = on_disk[step]
                identity = f"{metadata.get('config_hash')}:{metadata.get('time')}:{metadata.get('git_revision')}"
                source = f"{self.path}:{step}"
                checkpoints.append(Checkpoint(self.name, step, metadata.get("tokens_seen"), identity, lambda source=source: features.Model.load(source), source))
            elif not watch:
                raise UserError(f"{self.path}:{step}: no complete checkpoint at step {step}; there are {sorted(on_disk)}")
        return checkpoints

    def finished(self) -> bool:
        """Whether the run will write no more checkpoints: its final step (train.total_steps) is on disk."""
        if self.is_huggingface or self.steps is not None:
            return True
        config = self.config()
        return config is not None and int(config.train.total_steps) in self.complete_steps()


def parse_sources(sources: Sequence[str]) -> list[Run]:
    """Runs from the sources in order: WORKDIR:STEP sources of one workdir join one run."""
    runs: dict[pathlib.Path, Run] = {}
    for source in sources:
        path, colon, step = str(source).rpartition(":")
        if path and step.isdigit():
            path = pathlib.Path(os.path.abspath(path))
            run = runs.setdefault(path, Run(path, ()))
            if run.steps is None:
                raise UserError(f"{source}: {path} is also given as a whole workdir; give either WORKDIR or WORKDIR:STEP sources")
            run.steps = (*run.steps, int(step))
        else:
            path = pathlib.Path(os.path.abspath(source))
            if path in runs and runs[path].steps is not None:
                raise UserError(f"{source}: also given as WORKDIR:STEP sources; give either WORKDIR or WORKDIR:STEP sources")
            runs[path] = Run(path, None)
    for run in runs.values():
        if not run.path.is_dir():
            raise UserError(f"{run.path}: no such directory; give a pretraining workdir, WORKDIR:STEP or a HuggingFace directory")
    names = _short_names([run.path for run in runs.values()])
    for run, name in zip(runs.values(), names):
        run.name = name
    return list(runs.values())


def _short_names(paths: Sequence[pathlib.Path]) -> list[str]:
    """The shortest trailing parts of the paths that tell them apart (runs/sweep/nsp/pretrain -> nsp/pretrain)."""
    for depth in range(1, max(len(path.parts) for path in paths) + 1):
        names = ["/".join(path.parts[-depth:]) for path in paths]
        if len(set(names)) == len(names):
            return names
    return [str(path) for path in paths]


def _shape(model_config) -> str:
    return f"L{model_config.num_layers}/H{model_config.hidden_size}/A{model_config.num_heads}/I{model_config.intermediate_size}"


def check_shapes(runs: Sequence[Run]) -> None:
    """Layer-by-layer comparisons need one model shape; name the runs that differ."""
    shapes = {run.name: _shape(config.model) for run in runs if (config := run.config()) is not None}
    if len(set(shapes.values())) > 1:
        first, *others = shapes.items()
        odd = next((name, shape) for name, shape in others if shape != first[1])
        raise UserError(
            f"runs of different model shapes in one comparison: {first[0]} is {first[1]} but {odd[0]} is {odd[1]}; "
            "study runs of one shape together (and the others in a separate --out)"
        )


def seed_groups(runs: Sequence[Run]) -> dict[str, list[str]]:
    """Group name -> run names, for runs whose configs differ only in their seeds."""
    recipes: dict[str, list[str]] = {}
    for run in runs:
        config = run.config()
        flat = _flatten(config.to_dict()) if config is not None else {"path": str(run.path)}
        recipe = {key: value for key, value in flat.items() if key not in RUN_SEEDS and not key.startswith(NOT_THE_RECIPE)}
        recipes.setdefault(json.dumps(recipe, sort_keys=True, default=str), []).append(run.name)
    return {(members[0] if len(members) == 1 else f"{_common_name(members)} ({len(members)} seeds)"): members for members in recipes.values()}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _common_name(names: Sequence[str]) -> str:
    """seed0, seed1 -> seed*; a/seed0, a/seed1 -> a/seed*."""
    prefix = os.path.commonprefix(list(names))
    suffix = os.path.commonprefix([name[::-1] for name in names])[::-1]
    if len(prefix) + len(suffix) >= min(len(name) for name in names):
        suffix = ""
    return f"{prefix}*{suffix}" if prefix or suffix else "+".join(names)


# ---------------------------------------------------------------------------------------------
# Data the measures read (loaded once per study)


class Data:
    """The files of the enabled measures, checked up front and read on first use."""

    def __init__(self, config):
        self.config = config
        self.notes: list[str] = []
        self._cache: dict[str, object] = {}
        for key, path in self.files().items():
            if not pathlib.Path(path).is_file():
                raise UserError(
                    f"config.{key}={path}: no such file; set BERTJAX_SHARED_DATA to the shared data directory, give "
                    f"--config.{key}=PATH, or switch the measure off with --config.{key.split('.')[0]}.enabled=False"
                )
        if config.pos.enabled:
            skipped = pos.skipped_lines(config.pos.conllu)
            self.notes.append(
                f"{config.pos.conllu}: {skipped['multiword_tokens']} multiword-token lines and {skipped['empty_nodes']} empty nodes "
                "skipped (the syntactic words are scored, as in UD's evaluation)"
            )

    def probe_tasks(self) -> list[str]:
        return [name for name, task in self.config.probes.items() if isinstance(task, ml_collections.ConfigDict) and task.enabled]

    def files(self) -> dict[str, str]:
        config, files = self.config, {}
        if config.pos.enabled:
            files["pos.conllu"] = config.pos.conllu
        if config.cka.enabled:
            files["cka.conllu"] = config.cka.conllu
        if config.probes.enabled:
            for name in self.probe_tasks():
                files[f"probes.{name}.train"] = config.probes[name].train
                files[f"probes.{name}.test"] = config.probes[name].test
        return files

    def _once(self, key: str, read):
        if key not in self._cache:
            self._cache[key] = read()
        return self._cache[key]

    def _conllu(self, path: str, tag_column: int = 3) -> list[tasks.TaggedSentence]:
        return self._once(f"conllu:{path}:{tag_column}", lambda: tasks.read_conllu(path, tag_column))

    def pos_sentences(self) -> list[tasks.TaggedSentence]:
        """The whole file: pos.evaluate draws its seeded sample of pos.max_sentences."""
        return self._conllu(self.config.pos.conllu, self.config.pos.tag_column)

    def cka_sentences(self) -> list[tasks.TaggedSentence]:
        """The whole file: cka.sample_features draws its seeded sample of about cka.max_tokens words."""
        return self._conllu(self.config.cka.conllu)

    def probe_task(self, name: str) -> probes.ProbeTask:
        """The task's whole files: probes.evaluate draws its seeded samples (probes.max_train_tokens etc.)."""
        task = self.config.probes[name]
        return self._once(f"probe:{name}", lambda: probes.ProbeTask(task.kind, probes.read(task.train), probes.read(task.test), task.metric))


# ---------------------------------------------------------------------------------------------
# The cache: one file per (run, step, measure)


@functools.cache
def _source_hash(module) -> str:
    return hashlib.sha256(pathlib.Path(module.__file__).read_bytes()).hexdigest()[:16]


def _key(settings, checkpoint: Checkpoint, code: tuple) -> str:
    """What a cached result depends on: the measure's settings, the checkpoint, and the measure's code."""
    settings = {key: value for key, value in settings.items() if key not in REPORT_ONLY}
    text = json.dumps(
        {"settings": settings, "checkpoint": checkpoint.identity, "code": [_source_hash(module) for module in code]}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Unit:
    """One cached measure of one checkpoint."""

    name: str  # pos | probe_TASK | cka | downstream_TASK
    settings: dict
    code: tuple = ()  # the modules that compute it: an edit there makes the cached result stale

    def path(self, directory: pathlib.Path) -> pathlib.Path:
        return directory / f"{self.name}.json"

    def cached(self, directory: pathlib.Path, checkpoint: Checkpoint) -> dict | None:
        """{'rows', 'seconds', 'cpu_seconds'} if the cache holds this result for this checkpoint, settings and code."""
        path = self.path(directory)
        if not path.exists():
            return None
        stored = json.loads(path.read_text())
        if stored.get("key") != _key(self.settings, checkpoint, self.code):
            return None
        if self.name == "cka" and not (directory / "cka_sample.npy").exists():
            return None
        return stored

    def store(self, directory: pathlib.Path, checkpoint: Checkpoint, rows: list[dict], seconds: float, cpu_seconds: float) -> dict:
        stored = {"key": _key(self.settings, checkpoint, self.code), "seconds": seconds, "cpu_seconds": cpu_seconds, "rows": rows}
        directory.mkdir(parents=True, exist_ok=True)
        temporary = self.path(directory).with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(stored, indent=0) + "\n")
        temporary.replace(self.path(directory))  # a study killed mid-write leaves no half file
        return stored


def units(config, data: Data) -> list[Unit]:
    found = []
    if config.pos.enabled:
        found.append(Unit("pos", config.pos.to_dict(), (features, pos)))
    if config.probes.enabled:
        shared = {key: value for key, value in config.probes.items() if not isinstance(value, ml_collections.ConfigDict)}
        found += [Unit(f"probe_{name}", {**shared, "task": config.probes[name].to_dict()}, (features, probes)) for name in data.probe_tasks()]
    if config.cka.enabled:
        found.append(Unit("cka", config.cka.to_dict(), (features, cka)))
    if config.downstream.enabled:
        shared = {key: value for key, value in config.downstream.items() if key not in ("tasks", "steps")}
        found += [Unit(f"downstream_{task}", {**shared, "task": task}) for task in config.downstream.tasks]
    return found


def _wanted(unit: Unit, config, checkpoint: Checkpoint) -> bool:
    if unit.name.startswith("downstream_") and config.downstream.steps:
        return checkpoint.step in config.downstream.steps
    return True


# ---------------------------------------------------------------------------------------------
# Computing a measure


def _rows(rows) -> list[dict]:
    """The measures' rows as plain JSON values (numpy scalars become floats; no layer is None)."""
    clean = []
    for row in rows:
        clean.append(
            {
                "measure": str(row["measure"]),
                "layer": None if row.get("layer") is None else int(row["layer"]),
                "label": "" if row.get("label") is None else str(row["label"]),
                "value": float(row["value"]),
                "n": None if row.get("n") is None else int(row["n"]),
            }
        )
    return clean


def compute(unit: Unit, model: features.Model, checkpoint: Checkpoint, data: Data, config, directory: pathlib.Path, out: pathlib.Path) -> list[dict]:
    if unit.name == "pos":
        return _rows(pos.evaluate(model, data.pos_sentences(), config.pos))
    if unit.name.startswith("probe_"):
        name = unit.name.removeprefix("probe_")
        return _rows(probes.evaluate(model, {name: data.probe_task(name)}, config.probes))
    if unit.name == "cka":
        cka_config = config.cka
        sample = cka.sample_features(
            model, data.cka_sentences(), cka_config.max_tokens, cka_config.seed, max_seq_length=cka_config.max_seq_length, batch_size=cka_config.batch_size
        )
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "cka_sample.npy", np.asarray(sample, np.float32))
        return []  # cka_final and cka_previous need the other steps: derived in `cka_rows`
    if unit.name.startswith("downstream_"):
        return downstream(unit.name.removeprefix("downstream_"), model, checkpoint, config.downstream, directory, out)
    raise ValueError(f"unknown measure {unit.name}")


def downstream(task: str, model: features.Model, checkpoint: Checkpoint, downstream_config, directory: pathlib.Path, out: pathlib.Path) -> list[dict]:
    """Fine-tune from this checkpoint through `bertjax finetune` (a subprocess, as a user would) and read results.json."""
    source = checkpoint.source
    if not source:  # step 0 exists nowhere on disk: write the initial parameters (and tokenizer) for init_from
        source = str(directory / "initial")
        if not (pathlib.Path(source) / checkpoint_io.CHECKPOINTS).exists():
            checkpoint_io.save_params(source, model.config, model.params, step=0)
            shutil.copytree(model.tokenizer.path.parent if model.tokenizer.path.is_file() else model.tokenizer.path, pathlib.Path(source) / checkpoint_io.TOKENIZER, dirs_exist_ok=True)
    workdir = out / "downstream" / checkpoint.run / str(checkpoint.step) / task
    command = [
        sys.executable,
        "-m",
        "bertjax",
        "finetune",
        "--config",
        f"{FINETUNE_CONFIG}:{task}",
        "--workdir",
        str(workdir),
        f"--config.init_from={source}",
        f"--config.seeds={downstream_config.seeds}",
        *downstream_config.overrides,
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    log.info("downstream %s at %s step %d: %s", task, checkpoint.run, checkpoint.step, " ".join(command))
    with open(workdir / "finetune.log", "w") as log_file:
        status = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT).returncode
    results_path = workdir / "results.json"
    if status != 0 or not results_path.exists():
        raise UserError(f"downstream {task} at {checkpoint.run} step {checkpoint.step}: `bertjax finetune` failed (exit {status}); see {workdir / 'finetune.log'}")
    results = json.loads(results_path.read_text())
    seeds = len(results.get("seeds", [])) or None
    return [
        {"measure": f"downstream:{task}", "layer": None, "label": name, "value": value["mean"], "n": seeds}
        for name, value in results.items()
        if isinstance(value, dict) and "mean" in value
    ]


def cka_rows(directory: pathlib.Path, run: str, steps: Sequence[int]) -> dict[int, list[dict]]:
    """step -> cka_final and cka_previous rows, per layer, from the cached token samples of one run."""
    samples = {step: directory / run / str(step) / "cka_sample.npy" for step in steps}
    steps = [step for step in steps if samples[step].exists()]
    if not steps:
        return {}
    final = np.load(samples[steps[-1]])
    rows: dict[int, list[dict]] = {}
    previous = None
    for step in steps:
        current = np.load(samples[step])
        rows[step] = [
            {"measure": measure, "layer": layer, "label": "", "value": value, "n": current.shape[1]}
            for measure, against in (("cka_final", final), ("cka_previous", previous))
            if against is not None
            for layer, value in enumerate(cka.per_layer(current, against))
        ]
        previous = current
    return rows


def metric_rows(workdir: pathlib.Path, steps: Sequence[int]) -> dict[int, list[dict]]:
    """step -> the run's own metrics (metrics.jsonl names) at the latest logged step at or before it."""
    records = read_metrics(workdir)
    rows: dict[int, list[dict]] = {}
    for step in steps:
        latest: dict[str, float] = {}
        for record in records:
            if record.get("step", math.inf) > step:
                continue
            for name, value in record.items():
                if name not in ("step", "tokens_seen") and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    latest[name] = float(value)
        rows[step] = [{"measure": name, "layer": None, "label": "", "value": value, "n": None} for name, value in sorted(latest.items())]
    return rows


# ---------------------------------------------------------------------------------------------
# The study


@dataclasses.dataclass
class Summary:
    out: pathlib.Path
    runs: int = 0
    checkpoints: int = 0
    computed: int = 0
    reused: int = 0
    skipped: dict = dataclasses.field(default_factory=dict)  # "run:step" -> why
    costs: dict = dataclasses.field(default_factory=dict)  # (run, step, measure) -> (wall, CPU seconds) when computed
    notes: list = dataclasses.field(default_factory=list)
    plots: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        line = (
            f"embryology: {self.runs} run(s), {self.checkpoints} checkpoints; computed {self.computed}, reused {self.reused}"
            f"{f', skipped {len(self.skipped)} unreadable (a later run picks them up)' if self.skipped else ''} in {self.seconds:.0f}s; "
            f"wrote {self.out / 'embryology.csv'}, embryology.md and {len(self.plots)} plots"
        )
        return "\n".join([line, *self.notes])


def run(config, sources: Sequence[str], out, *, watch: bool = False) -> Summary:
    """Study the runs in `sources`; write OUT/embryology.csv, OUT/embryology.md and the plots.

    With `watch`, keep polling every config.watch.poll_seconds for new checkpoints until every
    workdir has its final step (train.total_steps) on disk.
    """
    started = time.perf_counter()
    out = pathlib.Path(out).absolute()
    runs = parse_sources(sources)
    check_shapes(runs)
    data = Data(config)
    measures = units(config, data)
    summary = Summary(out, runs=len(runs))
    seen: set[tuple[str, int, str]] = set()
    while True:
        rows, checkpoints = _study_once(config, runs, data, measures, out, watch, summary, seen)
        summary.checkpoints = len(checkpoints)
        summary.notes = list(data.notes)
        if rows:
            summary.plots = write_outputs(config, runs, rows, data.notes, out, summary.costs)
        finished = all(run.finished() for run in runs)
        if not watch or finished and not summary.skipped:
            break
        log.info("watching %s: %d checkpoints studied; next look in %.0fs", ", ".join(run.name for run in runs), len(checkpoints), config.watch.poll_seconds)
        _sleep(config.watch.poll_seconds)
    summary.seconds = time.perf_counter() - started
    return summary


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _study_once(config, runs, data, measures, out, watch, summary, seen) -> tuple[list[dict], list[Checkpoint]]:
    """One pass over every run: compute what the cache lacks; return every row of the table."""
    cache = out / "cache"
    summary.skipped = {}
    table, all_checkpoints = [], []
    check_shapes(runs)  # a watched run may have written its config.json since the last look
    for study_run in runs:
        checkpoints = study_run.checkpoints(watch)
        studied = []
        for checkpoint in checkpoints:
            directory = cache / study_run.name / str(checkpoint.step)
            model, rows, ok = None, [], True
            for unit in (unit for unit in measures if _wanted(unit, config, checkpoint)):
                stored = unit.cached(directory, checkpoint)
                first_look = (study_run.name, checkpoint.step, unit.name) not in seen
                if stored is None:
                    if model is None:
                        try:
                            model = checkpoint.load()
                        except Exception as error:  # noqa: BLE001 - any failure to read a checkpoint in flight: retry later
                            if checkpoint.step == 0 and not watch:
                                raise
                            summary.skipped[f"{study_run.name}:{checkpoint.step}"] = " ".join(str(error).split())[:200]
                            log.warning("%s step %d: cannot be read yet (%s): skipped, picked up by a later look", study_run.name, checkpoint.step, error)
                            ok = False
                            break
                    log.info("%s step %d: computing %s", study_run.name, checkpoint.step, unit.name)
                    wall, cpu = time.perf_counter(), time.process_time()
                    computed = compute(unit, model, checkpoint, data, config, directory, out)
                    stored = unit.store(directory, checkpoint, computed, time.perf_counter() - wall, time.process_time() - cpu)
                    summary.computed += 1
                elif first_look:
                    summary.reused += 1
                seen.add((study_run.name, checkpoint.step, unit.name))
                summary.costs[(study_run.name, checkpoint.step, unit.name)] = (stored.get("seconds"), stored.get("cpu_seconds"))
                rows += stored["rows"]
            if ok:
                studied.append((checkpoint, rows))
        steps = [checkpoint.step for checkpoint, _ in studied]
        derived = cka_rows(cache, study_run.name, steps) if config.cka.enabled else {}
        own = metric_rows(study_run.path, steps) if config.metrics.enabled and not study_run.is_huggingface else {}
        for checkpoint, rows in studied:
            for row in rows + derived.get(checkpoint.step, []) + own.get(checkpoint.step, []):
                table.append({"run": study_run.name, "step": checkpoint.step, "tokens_seen": checkpoint.tokens_seen, **row})
        all_checkpoints += [checkpoint for checkpoint, _ in studied]
    return table, all_checkpoints


# ---------------------------------------------------------------------------------------------
# Outputs


def write_outputs(config, runs: Sequence[Run], rows: list[dict], notes: Sequence[str], out: pathlib.Path, costs: dict | None = None) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["run"], r["step"], r["measure"], -1 if r["layer"] is None else r["layer"], r["label"]))
    write_csv(rows, out / "embryology.csv")
    groups = seed_groups(runs)
    (out / "embryology.md").write_text(report(config, rows, groups, notes) + (_cost(costs) if costs else ""))
    return plots.draw(rows, groups, out) if config.plots else []


def write_csv(rows: Sequence[dict], path: pathlib.Path) -> None:
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    with open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: "" if row.get(column) is None else row[column] for column in COLUMNS})
    temporary.replace(path)


def curves(rows: Sequence[dict], runs: Sequence[str], measure: str, layer=None, label: str = "") -> dict[str, dict[int, float]]:
    """run -> {step: value} for one cell (measure, layer, label)."""
    found: dict[str, dict[int, float]] = {run: {} for run in runs}
    for row in rows:
        if row["run"] in found and row["measure"] == measure and row["layer"] == layer and row["label"] == label:
            found[row["run"]][row["step"]] = row["value"]
    return found


def mean_curve(per_run: dict[str, dict[int, float]]) -> dict[int, float]:
    """The mean over runs at the steps every run has (seeds of one recipe share a kept schedule)."""
    present = [curve for curve in per_run.values() if curve]
    if not present:
        return {}
    steps = sorted(set.intersection(*(set(curve) for curve in present)))
    return {step: float(np.mean([curve[step] for curve in present])) for step in steps}


def first_step_reaching(curve: dict[int, float], fraction: float) -> int | None:
    """The first step at which the curve reaches `fraction` of its final value (None if the final value is 0)."""
    if not curve:
        return None
    steps = sorted(curve)
    final = curve[steps[-1]]
    if final <= 0:
        return None
    return next(step for step in steps if curve[step] >= fraction * final)


def _cells(rows: Sequence[dict], measure: str) -> list[tuple]:
    return sorted({(row["layer"], row["label"]) for row in rows if row["measure"] == measure}, key=lambda cell: (-1 if cell[0] is None else cell[0], cell[1]))


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], lines: Sequence[Sequence]) -> str:
    text = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(_fmt(cell) for cell in line) + " |" for line in lines]
    return "\n".join(text) + "\n"


def report(config, rows: Sequence[dict], groups: dict[str, list[str]], notes: Sequence[str]) -> str:
    """embryology.md: the tables that answer the paper's questions, from the long table alone."""
    measures = sorted({row["measure"] for row in rows})
    steps = sorted({row["step"] for row in rows})
    described = ", ".join(f"**{group}** ({', '.join(members)})" for group, members in groups.items())
    parts = [
        "# Embryology\n",
        f"Runs: {described}. "
        f"Steps studied: {', '.join(map(str, steps))}. A group is a set of runs whose configs differ only in their seeds; "
        "its value is the mean over them (per seed in brackets).\n",
        *[f"- {note}" for note in notes],
        "",
    ]
    for measure in ("prediction", "reconstruction"):
        if measure in measures:
            parts.append(_learning_speed(config, rows, groups, measure))
    probe_tasks = sorted({m.split(":", 1)[1] for m in measures if m.startswith("probe:")})
    if probe_tasks:
        parts.append(_best_layers(rows, groups, probe_tasks, steps))
        parts.append(_rise_and_fall(rows, groups, probe_tasks))
    parts.append(_final_values(rows, groups, measures))
    if len(groups) > 1:
        parts.append(_comparisons(config, rows, groups, measures))
    return "\n".join(parts)


def _learning_speed(config, rows, groups, measure) -> str:
    labels = sorted({label for layer, label in _cells(rows, measure)} - {"ALL"}) + ["ALL"]
    text = [
        f"## Learning speed: {measure} by part of speech\n",
        f"The first step at which a tag's {measure} accuracy reaches 50% and 90% of its final value (the paper's central comparison).\n",
    ]
    counts = {row["label"]: row["n"] for row in rows if row["measure"] == measure}
    for group, members in groups.items():
        lines = []
        speed = {}
        for label in labels:
            per_run = curves(rows, members, measure, None, label)
            mean = mean_curve(per_run)
            t50, t90 = first_step_reaching(mean, 0.5), first_step_reaching(mean, 0.9)
            speed[label] = (t50, t90)
            each = lambda fraction: ", ".join(_fmt(first_step_reaching(curve, fraction)) for curve in per_run.values())  # noqa: E731
            suffix = (lambda fraction: f" ({each(fraction)})") if len(members) > 1 else (lambda fraction: "")
            final = mean[max(mean)] if mean else None
            lines.append((label, counts.get(label), final, f"{_fmt(t50)}{suffix(0.5)}", f"{_fmt(t90)}{suffix(0.9)}"))
        lines.sort(key=lambda line: (line[0] == "ALL", speed[line[0]][1] if speed[line[0]][1] is not None else math.inf))
        text.append(f"**{group}**\n")
        text.append(_table(["tag", "words", "final accuracy", "step to 50%", "step to 90%"], lines))
        classes = []
        for name, tags in (("function words", config.pos.function_tags), ("content words", config.pos.content_tags)):
            reached = [speed[tag] for tag in tags if tag in speed]
            if reached:
                t50 = [t for t, _ in reached if t is not None]
                t90 = [t for _, t in reached if t is not None]
                classes.append((f"{name} ({', '.join(tag for tag in tags if tag in speed)})", f"{len(t90)} of {len(reached)}", _median(t50), _median(t90)))
        if classes:
            text.append(_table(["class", "tags above 0 at the end", "median step to 50%", "median step to 90%"], classes))
    return "\n".join(text)


def _median(values):
    return f"{np.median(values):g}" if values else None


def _best_layers(rows, groups, probe_tasks, steps) -> str:
    header = ["step"] + [f"{task} · {group}" for task in probe_tasks for group in groups]
    lines = []
    for step in steps:
        line = [step]
        for task in probe_tasks:
            for members in groups.values():
                values = {}
                for layer, label in _cells(rows, f"probe:{task}"):
                    curve = mean_curve(curves(rows, members, f"probe:{task}", layer, label))
                    if step in curve:
                        values[layer] = curve[step]
                best = max(values, key=values.get) if values else None
                line.append(f"L{best} ({values[best]:.3f})" if best is not None else "–")
        lines.append(line)
    return (
        "## Best layer per probe over time\n\nThe layer whose probe scores highest at each step (layer 0 = the embeddings; the score in brackets; "
        "mean over a group's seeds).\n\n" + _table(header, lines)
    )


def _rise_and_fall(rows, groups, probe_tasks) -> str:
    lines = []
    for task in probe_tasks:
        for group, members in groups.items():
            for measure in (f"probe:{task}", f"selectivity:{task}"):
                for layer, label in _cells(rows, measure):
                    curve = mean_curve(curves(rows, members, measure, layer, label))
                    if not curve:
                        continue
                    peak_step = max(curve, key=curve.get)
                    final = curve[max(curve)]
                    rises = sum(b > a for a, b in itertools.pairwise(curve[s] for s in sorted(curve)))
                    lines.append((measure, group, layer, curve[peak_step], peak_step, final, curve[peak_step] - final, f"{rises}/{len(curve) - 1}"))
    return (
        "## Rise and fall\n\nEach probe's peak over the studied steps against its final value: a drop means the layer "
        "held more of the property earlier (steps up = how many consecutive steps improved).\n\n"
        + _table(["measure", "group", "layer", "peak", "peak step", "final", "peak − final", "steps up"], lines)
    )


def _reported(measure: str) -> bool:
    """The measures of the final-values table: the study's own, and the run's losses and accuracies."""
    return ":" in measure or measure in (*pos.MEASURES, "cka_final", "cka_previous") or "loss" in measure or "accuracy" in measure


def _final_values(rows, groups, measures) -> str:
    lines = []
    for measure in filter(_reported, measures):
        for layer, label in _cells(rows, measure):
            if measure in ("reconstruction", "prediction") and label != "ALL":
                continue
            line = [measure, "" if layer is None else layer, label]
            for members in groups.values():
                per_run = curves(rows, members, measure, layer, label)
                finals = [curve[max(curve)] for curve in per_run.values() if curve]
                line.append(f"{np.mean(finals):.4f}" + (f" ± {np.std(finals, ddof=1):.4f}" if len(finals) > 1 else "") if finals else "–")
            lines.append(line)
    return "## Final values\n\nAt each run's last studied step (mean ± std over a group's seeds).\n\n" + _table(["measure", "layer", "label", *groups], lines)


def _comparisons(config, rows, groups, measures) -> str:
    """Each group against the first: the multi-bootstrap over seeds and the measure's cells (tags or layers)."""
    names = list(groups)
    base = names[0]
    lines = []
    for other in names[1:]:
        for measure in measures:
            cells = [cell for cell in _cells(rows, measure) if cell[1] != "ALL"]
            scores = []
            for members in (groups[other], groups[base]):
                matrix = []
                for run_name in members:
                    finals = []
                    for layer, label in cells:
                        curve = curves(rows, [run_name], measure, layer, label)[run_name]
                        finals.append(curve[max(curve)] if curve else math.nan)
                    matrix.append(finals)
                scores.append(np.asarray(matrix, dtype=np.float64))
            keep = ~np.isnan(np.concatenate(scores)).any(axis=0)
            if not keep.any() or (keep.sum() == 1 and min(len(s) for s in scores) == 1):
                continue  # one number a side: nothing to resample
            result = stats.paired_bootstrap(
                scores[0][:, keep], scores[1][:, keep], num_samples=config.compare.num_samples, confidence=config.compare.confidence, seed=config.compare.seed
            )
            lines.append((measure, f"{other} − {base}", int(keep.sum()), f"{result.seeds[0]}/{result.seeds[1]}", result.difference, f"[{result.low:+.4f}, {result.high:+.4f}]", f"{result.p_value:.3g}"))
    return (
        "## Comparisons\n\nFinal values, each group against the first: the mean over a measure's cells (its tags or layers) and "
        f"seeds, with a {config.compare.confidence:.0%} interval and p-value from the paired multi-bootstrap (Sellam et al., 2022) "
        "that resamples the seeds of each group and the cells, paired.\n\n"
        + _table(["measure", "difference", "cells", "seeds", "mean difference", "interval", "p"], lines)
    )


def _cost(costs: dict) -> str:
    """What each measure cost per checkpoint when it was computed (from the cache: a reused result keeps its cost)."""
    by_measure: dict[str, list[tuple[float, float]]] = {}
    by_checkpoint: dict[tuple, list[float]] = {}
    for (run_name, step, measure), (wall, cpu) in costs.items():
        if wall is not None:
            by_measure.setdefault(measure, []).append((wall, cpu))
            by_checkpoint.setdefault((run_name, step), []).append(wall)
    lines = [(measure, len(values), float(np.mean([w for w, _ in values])), float(np.mean([c for _, c in values])), float(np.sum([w for w, _ in values]))) for measure, values in sorted(by_measure.items())]
    totals = [sum(values) for values in by_checkpoint.values()]
    return (
        "\n## Cost\n\nWall-clock and process CPU seconds per checkpoint when each result was computed (the first "
        "checkpoint of a process also pays the compilations).\n\n"
        + _table(["measure", "checkpoints", "wall s / checkpoint", "CPU s / checkpoint", "wall s in all"], lines)
        + (f"\nAll measures: {np.mean(totals):.1f} s per checkpoint on average, {np.sum(totals):.0f} s for {len(totals)} checkpoints.\n" if totals else "")
    )

