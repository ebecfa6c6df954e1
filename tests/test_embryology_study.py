"""`bertjax embryology` around the measures: checkpoints found, cached, re-used, watched, tabled and plotted.

One test runs the real measures end to end through the CLI on a tiny run written with
`checkpoint_io.save_params`; the others replace the measures with fakes (no JAX), so that caching,
watching and the bad-input messages are tested in well under a second each.
"""

import csv
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import linen as nn

from bertjax import checkpoint_io, cli, models
from bertjax import config as config_lib
from bertjax.data import tasks
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.embryology import study
from bertjax.train import state as state_lib

TINY = dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64)
# Small enough for a test: the shipped sizes are for a study (configs/embryology.py).
SMALL = [
    "--config.pos.max_sentences=12",
    "--config.probes.max_train_tokens=150",
    "--config.probes.max_test_tokens=80",
    "--config.probes.steps=10",
    "--config.probes.ner.enabled=False",
    "--config.probes.sst2.enabled=False",
    "--config.cka.max_tokens=60",
    "--config.plots=False",
]


def run_config(total_steps: int, seed: int = 0, **model):
    config = config_lib.pretrain_config("tiny")
    config.model.update({**TINY, **model})
    config.data.max_seq_length = 32
    config.train.total_steps = total_steps
    config.train.seed = seed
    return config


def write_metrics(workdir: pathlib.Path, steps) -> None:
    lines = [json.dumps({"step": step, "loss": 10.0 - step, "mlm_accuracy": step / 100, "tokens_seen": 64 * step}) for step in steps]
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data):
    """A real run's layout: config.json, tokenizer/, metrics.jsonl and params-only checkpoints at steps 1, 2, 4."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    sentences = [" ".join(s.words) for s in tasks.read_conllu(shared_data / "ud-english-ewt/en_ewt-ud-dev.conllu")[:800]]
    tokenizer = tokenizer_lib.load(tokenizer_lib.train_from_sentences(sentences, 400, workdir / checkpoint_io.TOKENIZER))
    config = run_config(total_steps=4, vocab_size=tokenizer.vocab_size)
    module = models.BertForPreTraining(models.BertConfig.from_config(config.model))
    params = nn.meta.unbox(module.init(jax.random.key(0), *state_lib.example_inputs(1, 16))["params"])
    for step in (1, 2, 4):
        params = jax.tree.map(lambda leaf, step=step: leaf * (1.0 + 0.05 * step), params)
        checkpoint_io.save_params(workdir, config, params, step=step)
    write_metrics(workdir, [1, 3])
    return workdir


def read_table(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_cli_end_to_end_then_a_rerun_computes_nothing(tiny_run, tmp_path, capsys):
    out = tmp_path / "study"
    assert cli.main(["embryology", "--workdir", str(tiny_run), "--out", str(out), *SMALL]) == 0
    first = capsys.readouterr().out
    # 4 checkpoints (step 0 rebuilt from the config, 1, 2, 4) x 3 cached measures (pos, probe_pos, cka).
    assert "4 checkpoints; computed 12, reused 0" in first
    rows = read_table(out / "embryology.csv")
    assert list(rows[0]) == ["run", "step", "tokens_seen", "measure", "layer", "label", "value", "n"]
    measures = {row["measure"] for row in rows}
    assert {"reconstruction", "prediction", "probe:pos", "control:pos", "selectivity:pos", "cka_final", "cka_previous"} <= measures
    assert {"loss", "mlm_accuracy"} <= measures  # metrics.jsonl, under its own names
    assert sorted({int(row["step"]) for row in rows}) == [0, 1, 2, 4]
    assert {row["layer"] for row in rows if row["measure"] == "probe:pos"} == {"0", "1"}  # embeddings + 1 layer
    assert {row["layer"] for row in rows if row["measure"] == "reconstruction"} == {""}
    # The run's metrics at the latest logged step at or before each checkpoint: step 2 and 4 see steps 1 and 3.
    loss = {int(row["step"]): float(row["value"]) for row in rows if row["measure"] == "loss"}
    assert loss == {1: 9.0, 2: 9.0, 4: 7.0}
    cka_final = {int(row["layer"]): float(row["value"]) for row in rows if row["measure"] == "cka_final" and row["step"] == "4"}
    assert cka_final == pytest.approx({0: 1.0, 1: 1.0})
    report = (out / "embryology.md").read_text()
    for section in ("Learning speed: prediction", "Best layer per probe over time", "Rise and fall", "Final values"):
        assert section in report

    assert cli.main(["embryology", "--workdir", str(tiny_run), "--out", str(out), *SMALL]) == 0
    assert "computed 0, reused 12" in capsys.readouterr().out
    assert read_table(out / "embryology.csv") == rows


# ---------------------------------------------------------------------------------------------
# With fake measures


class FakeModel:
    def __init__(self, step: int):
        self.step = step


@pytest.fixture
def fakes(monkeypatch):
    """Measures that cost nothing and depend on the step; `calls` counts the model loads."""
    calls = []

    def load(source):
        calls.append(source)
        return FakeModel(int(str(source).rpartition(":")[2]))

    def pos_evaluate(model, sentences, pos_config):
        counts = {}
        for sentence in sentences:
            for tag in sentence.tags:
                counts[tag] = counts.get(tag, 0) + 1
        rows = [{"measure": m, "layer": None, "label": tag, "value": min(1.0, model.step / 4), "n": n} for m in ("reconstruction", "prediction") for tag, n in counts.items()]
        return rows + [{"measure": m, "layer": None, "label": "ALL", "value": min(1.0, model.step / 4), "n": sum(counts.values())} for m in ("reconstruction", "prediction")]

    def probes_evaluate(model, probe_tasks, probes_config):
        return [
            {"measure": f"{kind}:{name}", "layer": layer, "label": "accuracy", "value": 0.1 * layer + 0.01 * model.step, "n": 10}
            for name in probe_tasks
            for kind in ("probe", "control", "selectivity")
            for layer in range(3)
        ]

    def sample_features(model, sentences, max_tokens, seed, **kwargs):
        return np.random.default_rng(model.step).normal(size=(3, 40, 8))

    monkeypatch.setattr(study.features.Model, "load", staticmethod(load))
    monkeypatch.setattr(study.features.Model, "initial", staticmethod(lambda workdir: load(f"{workdir}:0")))
    monkeypatch.setattr(study.pos, "evaluate", pos_evaluate)
    monkeypatch.setattr(study.probes, "evaluate", probes_evaluate)
    monkeypatch.setattr(study.cka, "sample_features", sample_features)
    return calls


def fake_checkpoint(workdir: pathlib.Path, step: int, kept: bool = True) -> None:
    """A checkpoint directory as checkpoint_io lists it (params/ and metadata); the fakes never read the params."""
    step_dir = workdir / checkpoint_io.CHECKPOINTS / str(step)
    (step_dir / "params").mkdir(parents=True, exist_ok=True)
    (step_dir / "metadata").mkdir(exist_ok=True)
    metadata = {"step": step, "kept": kept, "tokens_seen": 64 * step, "config_hash": "x", "time": 1.0}
    (step_dir / "metadata" / "metadata").write_text(json.dumps(metadata))


def fake_run(workdir: pathlib.Path, steps=(1, 2, 4), total_steps: int = 4, seed: int = 0, **model) -> pathlib.Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_lib.to_json(run_config(total_steps, seed, **model)))
    for step in steps:
        fake_checkpoint(workdir, step)
    write_metrics(workdir, steps)
    return workdir


def small_config():
    config = config_lib.load(f"{config_lib.REPO_ROOT}/configs/embryology.py")
    config.probes.ner.enabled = config.probes.sst2.enabled = False
    config.plots = False
    return config


def test_changing_a_setting_recomputes_only_that_measure(fakes, tmp_path, shared_data):
    workdir = fake_run(tmp_path / "run")
    config = small_config()
    first = study.run(config, [str(workdir)], tmp_path / "out")
    assert (first.computed, first.reused) == (12, 0)
    config.probes.steps = 7
    second = study.run(config, [str(workdir)], tmp_path / "out")
    assert (second.computed, second.reused) == (4, 8)
    config.pos.function_tags = ("DET",)  # changes the report, not a value: nothing to recompute
    assert study.run(config, [str(workdir)], tmp_path / "out").computed == 0


def test_watch_skips_a_half_written_checkpoint_and_stops_when_the_run_has_finished(fakes, tmp_path, shared_data, monkeypatch):
    workdir = fake_run(tmp_path / "run", steps=(1, 2))
    final = workdir / checkpoint_io.CHECKPOINTS / "4"
    (final / "params").mkdir(parents=True)  # the final step is being saved: params written, no metadata yet
    looks = []

    def damaged_once(source, load=study.features.Model.load):
        if source.endswith(":4") and len(looks) == 1:
            raise checkpoint_io.DamagedCheckpointError(f"{source}: checksum mismatch")
        return load(source)

    def next_look(seconds):
        looks.append(seconds)
        if len(looks) == 1:
            fake_checkpoint(workdir, 4)  # the save completes, but the first load of it fails checkpoint_io's checks

    monkeypatch.setattr(study.features.Model, "load", staticmethod(damaged_once))
    monkeypatch.setattr(study, "_sleep", next_look)
    config = small_config()
    config.watch.poll_seconds = 5.0
    summary = study.run(config, [str(workdir)], tmp_path / "out", watch=True)
    assert looks == [5.0, 5.0]  # step 4 missing, then unreadable, then studied: and the run is finished
    assert (summary.computed, summary.reused, summary.skipped) == (12, 0, {})
    assert sorted({int(row["step"]) for row in read_table(tmp_path / "out" / "embryology.csv")}) == [0, 1, 2, 4]


def test_a_conllu_file_with_multiword_tokens_and_empty_nodes_is_read_and_counted(fakes, tmp_path, capsys):
    conllu = tmp_path / "tiny.conllu"
    conllu.write_text(
        "# text = I don't know.\n"
        "1\tI\tI\tPRON\t_\t_\t3\tnsubj\t_\t_\n"
        "2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_\n"
        "2\tdo\tdo\tAUX\t_\t_\t4\taux\t_\t_\n"
        "3\tn't\tnot\tPART\t_\t_\t4\tadvmod\t_\t_\n"
        "4\tknow\tknow\tVERB\t_\t_\t0\troot\t_\t_\n"
        "4.1\tit\tit\tPRON\t_\t_\t_\t_\t4:obj\t_\n"
        "5\t.\t.\tPUNCT\t_\t_\t4\tpunct\t_\t_\n\n"
    )
    workdir = fake_run(tmp_path / "run")
    args = ["embryology", "--workdir", str(workdir), f"--config.pos.conllu={conllu}", "--config.probes.enabled=False", "--config.cka.enabled=False", "--config.plots=False"]
    assert cli.main(args) == 0
    assert f"{conllu}: 1 multiword-token lines and 1 empty nodes skipped" in capsys.readouterr().out
    rows = read_table(workdir / "embryology" / "embryology.csv")
    counts = {row["label"]: int(row["n"]) for row in rows if row["measure"] == "reconstruction" and row["step"] == "4"}
    assert counts == {"PRON": 1, "AUX": 1, "PART": 1, "VERB": 1, "PUNCT": 1, "ALL": 5}


def test_runs_differing_only_in_seed_are_one_group_and_other_groups_are_compared(fakes, tmp_path, shared_data):
    runs = [fake_run(tmp_path / f"a/seed{seed}", seed=seed) for seed in (0, 1)]
    runs += [fake_run(tmp_path / f"b/seed{seed}", seed=seed) for seed in (0, 1)]
    for run in runs[2:]:
        config = checkpoint_io.read_config(run)
        config.optim.lr = 5e-4
        (run / "config.json").write_text(config_lib.to_json(config))
    config = small_config()
    config.plots = True
    summary = study.run(config, [str(run) for run in runs], tmp_path / "out")
    assert summary.runs == 4
    expected = ["pos_prediction.png", "pos_reconstruction.png", "probes_pos.png", "cka.png"]
    assert sorted(pathlib.Path(path).name for path in summary.plots) == sorted(expected)
    assert all((tmp_path / "out" / name).stat().st_size > 10_000 for name in expected)
    groups = study.seed_groups(study.parse_sources([str(run) for run in runs]))
    assert list(groups.values()) == [["a/seed0", "a/seed1"], ["b/seed0", "b/seed1"]]
    report = (tmp_path / "out" / "embryology.md").read_text()
    assert "## Comparisons" in report and "a/seed* (2 seeds)" in report


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 1


def fails(args, capsys, *fragments):
    assert cli.main(["embryology", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bertjax embryology: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_a_workdir_without_kept_checkpoints(tmp_path, capsys, shared_data):
    workdir = fake_run(tmp_path / "rolling", steps=())
    fake_checkpoint(workdir, 500, kept=False)
    fails(["--workdir", str(workdir)], capsys, "no kept checkpoints", "rolling checkpoint(s) at step 500", "checkpoint.keep_log")


def test_runs_of_different_shapes_are_named(tmp_path, capsys, shared_data):
    small = fake_run(tmp_path / "small")
    wide = fake_run(tmp_path / "wide", hidden_size=64)
    fails(["--workdir", f"{small},{wide}", "--out", str(tmp_path / "out")], capsys, "different model shapes", "small is L1/H32/A2/I64", "wide is L1/H64/A2/I64")


def test_a_missing_data_file(tmp_path, capsys):
    workdir = fake_run(tmp_path / "run")
    fails(["--workdir", str(workdir), f"--config.pos.conllu={tmp_path}/none.conllu"], capsys, f"config.pos.conllu={tmp_path}/none.conllu: no such file", "BERTJAX_SHARED_DATA")


def test_several_sources_need_an_out(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    assert cli.main(["embryology", "--workdir", f"{run}:1,{run}:2"]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_downstream_fine_tunes_the_chosen_steps_and_reads_results(fakes, tmp_path, shared_data, monkeypatch):
    """`bertjax finetune` runs as a subprocess per chosen step (faked here: it writes results.json as finetune does)."""
    workdir = fake_run(tmp_path / "run")
    commands = []

    def finetune(command, **kwargs):
        commands.append(command)
        out = pathlib.Path(command[command.index("--workdir") + 1])
        (out / "results.json").write_text(json.dumps({"seeds": [0, 1], "accuracy": {"mean": 0.75, "std": 0.01, "runs": [0.74, 0.76]}}))
        return study.subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(study.subprocess, "run", finetune)
    config = small_config()
    config.pos.enabled = config.probes.enabled = config.cka.enabled = False
    config.downstream.enabled = True
    config.downstream.steps = (2, 4)
    config.downstream.seeds = 2
    study.run(config, [str(workdir)], tmp_path / "out")
    assert [c[c.index("finetune") + 1 :][:2] for c in commands] == [["--config", f"{study.FINETUNE_CONFIG}:sst2"]] * 2
    assert [next(a for a in c if a.startswith("--config.init_from=")) for c in commands] == [f"--config.init_from={workdir}:{step}" for step in (2, 4)]
    assert "--config.seeds=2" in commands[0]
    rows = [row for row in read_table(tmp_path / "out" / "embryology.csv") if row["measure"] == "downstream:sst2"]
    assert [(row["step"], row["label"], float(row["value"]), row["n"]) for row in rows] == [("2", "accuracy", 0.75, "2"), ("4", "accuracy", 0.75, "2")]
