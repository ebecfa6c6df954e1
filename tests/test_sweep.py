"""Sweeps: arm expansion, override precedence, skip/resume, failure isolation, collection and plots."""

import json
import pathlib
import shlex

import pytest

from bertjax import cli
from bertjax import config as config_lib
from bertjax import sweep
from bertjax.errors import UserError
from bertjax.sweep import Arm

SWEEP_FILE = '''
from bertjax import config as config_lib
from bertjax.sweep import Arm, product, seeds


def get_config():
    config = config_lib.ablation_config("tiny")
    config.sweep.task = "{task}"
    return config


def get_sweep():
    return product([Arm("nsp", {{"data.sentence_objective": "nsp"}}), Arm("sop", {{"data.sentence_objective": "sop"}})], seeds(2))
'''


def write_sweep(tmp_path, task="configs/finetune.py:sst2"):
    path = tmp_path / "two_arms.py"
    path.write_text(SWEEP_FILE.format(task=task))
    return str(path)


def test_product_names_groups_and_merges_overrides():
    arms = sweep.product([Arm("a", {"x": 1}), Arm("b", {"x": 2})], sweep.seeds([3, 4]))
    assert [a.name for a in arms] == ["a-seed3", "a-seed4", "b-seed3", "b-seed4"]
    assert [a.group for a in arms] == ["a", "a", "b", "b"]
    assert arms[1].overrides == {"x": 1, "train.seed": 4, "train.dropout_seed": 4}


def test_zip_pairs_axes_and_rejects_unequal_lengths():
    arms = sweep.zip_arms([Arm("lr1", {"optim.lr": 1e-3}), Arm("lr2", {"optim.lr": 1e-4})], [Arm("w1", {"optim.warmup_steps": 10}), Arm("w2", {"optim.warmup_steps": 20})])
    assert [a.name for a in arms] == ["lr1-w1", "lr2-w2"]
    assert arms[1].overrides == {"optim.lr": 1e-4, "optim.warmup_steps": 20}
    with pytest.raises(ValueError, match="one length"):
        sweep.zip_arms([Arm("a", {})], [Arm("b", {}), Arm("c", {})])


def test_combining_arms_that_set_the_same_key_is_an_error():
    with pytest.raises(ValueError, match="same keys"):
        sweep.product([Arm("a", {"x": 1})], [Arm("b", {"x": 2})])


def test_shipped_sweeps_expand_to_valid_configs():
    for path in sorted((config_lib.REPO_ROOT / "configs" / "ablations").glob("*.py")):
        module = config_lib.load_module(str(path))
        arms = module.get_sweep()
        assert len(arms) >= 2, path
        for arm in arms:
            config = module.get_config()
            for key, value in arm.overrides.items():
                parent = config
                *parents, leaf = key.split(".")
                for part in parents:
                    parent = parent[part]
                assert leaf in parent, f"{path.name}: arm {arm.name} sets unknown key {key}"
                parent[leaf] = value
            config_lib.validate(config)


def test_plan_user_overrides_apply_to_all_arms_but_arm_keys_win(tmp_path):
    spec = write_sweep(tmp_path)
    config = config_lib.load(spec)
    arms = sweep._load_sweep(spec)
    plans = sweep.plan(spec, config, tmp_path / "runs", ["--config.train.total_steps=7", "--config.data.sentence_objective=none"], arms)
    assert len(plans) == 4
    for p in plans:
        assert "--config.train.total_steps=7" in p.pretrain
        assert "--config.data.sentence_objective=none" not in p.pretrain
        assert f"--config.data.sentence_objective={p.arm.name.split('-')[0]}" in p.pretrain
        (finetune,) = p.finetune.values()
        assert finetune[finetune.index("--config") + 1] == str(config_lib.REPO_ROOT / "configs/finetune.py") + ":sst2"
        assert f"--config.init_from={p.workdir / 'pretrain'}" in finetune
        assert "--config.train.total_steps=500" in finetune and "--config.data.max_seq_length=64" in finetune
        assert "--config.seeds=3" in finetune and not any("suite" in flag for flag in finetune)


def test_printed_commands_run_from_any_directory_and_collect_finds_their_arms(tmp_path, monkeypatch, capsys):
    """Relative paths (the workdir, overrides, a config file's defaults under a relative $BERTJAX_SHARED_DATA) come out absolute."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BERTJAX_SHARED_DATA", "shared")
    (tmp_path / "two_arms.py").write_text(SWEEP_FILE.format(task="configs/finetune.py:sst2"))
    argv = ["sweep", "--config", "two_arms.py", "--workdir", "runs", "--print-commands", "--config.data.tokenizer=tok/sp.model", "--config.train.total_steps=7"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    for line, arm in zip(lines, ["nsp-seed0", "nsp-seed1", "sop-seed0", "sop-seed1"]):
        pretrain, touch, finetune = (shlex.split(command) for command in line.split(" && "))
        assert pretrain[pretrain.index("--config") + 1] == f"{tmp_path}/two_arms.py"
        assert pretrain[pretrain.index("--workdir") + 1] == f"{tmp_path}/runs/{arm}/pretrain"
        assert f"--config.data.corpus={tmp_path}/shared/corpus/*.txt" in pretrain
        assert f"--config.data.tokenizer={tmp_path}/tok/sp.model" in pretrain and "--config.data.tokenizer=tok/sp.model" not in pretrain
        assert "--config.train.total_steps=7" in pretrain
        assert touch == ["touch", f"{tmp_path}/runs/{arm}/{sweep.PRETRAIN_DONE}"]
        assert finetune[finetune.index("--config") + 1] == f"{config_lib.REPO_ROOT}/configs/finetune.py:sst2"
        assert finetune[finetune.index("--workdir") + 1] == f"{tmp_path}/runs/{arm}/finetune"
        assert f"--config.init_from={tmp_path}/runs/{arm}/pretrain" in finetune
        assert f"--config.data.train={tmp_path}/shared/glue/SST-2/train.tsv" in finetune
        assert f"--config.data.dev={tmp_path}/shared/glue/SST-2/dev.tsv" in finetune
    assert cli.main(["sweep", "collect", "runs"]) == 0
    assert "| unfinished: nsp-seed0, nsp-seed1 |" in (tmp_path / "runs" / "results.md").read_text()


def fake_finished_run(run_dir: pathlib.Path, losses, extra=None, results=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps(dict(step=step * 10, loss=loss, **(extra or {}))) + "\n")
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))


def test_run_skips_finished_arms_resumes_unfinished_and_survives_a_failure(tmp_path, capsys):
    spec = write_sweep(tmp_path)
    config = config_lib.load(spec)
    calls = []

    def runner(command, log_path):
        workdir = pathlib.Path(command[command.index("--workdir") + 1])
        calls.append((command[3], workdir.parent.name))
        if workdir.parent.name == "sop-seed1" and command[3] == "pretrain":
            return 3
        if command[3] == "pretrain":
            fake_finished_run(workdir, [5.0, 4.0], {"eval/nsp_accuracy": 0.7, "eval/sop_accuracy": 0.5})
        else:
            fake_finished_run(workdir, [0.7], results={"task": "sst2", "metrics": {"accuracy": {"mean": 0.8, "std": 0.0}}})
        return 0

    runs = tmp_path / "runs"
    with pytest.raises(sweep.ArmsFailed) as failure:
        sweep.run(spec, config, str(runs), [], runner=runner)
    statuses = failure.value.statuses
    assert [s["arm"] for s in statuses] == ["nsp-seed0", "nsp-seed1", "sop-seed0", "sop-seed1"]
    assert statuses[3]["failure"] == "pretraining failed (exit 3)" and statuses[3]["finetune"] == "not run"
    assert all(s["pretrain"] == s["finetune"] == "done" and "failure" not in s for s in statuses[:3])
    assert len(calls) == 7
    assert str(failure.value).startswith(f"1 of 4 arms failed: sop-seed1: pretraining failed (exit 3), log {runs / 'sop-seed1' / 'pretrain.log'}")
    table = (runs / "results.md").read_text()
    assert "| nsp | 2/2 |" in table and table.splitlines()[2].endswith("| done |")
    assert "sst2/accuracy (dev, selection)" in table, "a run without a held-out set is labelled as a selection score"
    assert table.splitlines()[3].startswith("| sop | 1/2 |") and table.splitlines()[3].endswith("| failed: sop-seed1 |")
    assert f"- sop-seed1: pretraining failed (exit 3), log `{runs / 'sop-seed1' / 'pretrain.log'}`" in table
    assert (runs / "results.csv").read_text().splitlines()[2].endswith(",failed: sop-seed1")

    calls.clear()
    with pytest.raises(sweep.ArmsFailed):
        sweep.run(spec, config, str(runs), [], runner=runner)
    assert calls == [("pretrain", "sop-seed1")], "finished arms must be skipped, the failed one retried"

    calls.clear()
    (runs / "nsp-seed0" / "finetune" / "results.json").unlink()
    statuses = sweep.run(spec, config, str(runs), [], runner=lambda command, log: runner(command, log) if "sop-seed1" not in str(log) else fake_ok(command))
    assert ("finetune", "nsp-seed0") in calls and ("pretrain", "nsp-seed0") not in calls
    assert [s["arm"] for s in statuses if "failure" in s] == []
    assert "failed" not in (runs / "results.md").read_text()


def fake_ok(command):
    workdir = pathlib.Path(command[command.index("--workdir") + 1])
    results = {"task": "sst2", "metrics": {"accuracy": {"mean": 0.8, "std": 0.0}}} if command[3] == "finetune" else None
    fake_finished_run(workdir, [0.7], results=results)
    return 0


def test_collect_aggregates_seeds_and_draws_plots(tmp_path):
    root = tmp_path / "runs"
    for name, group, loss, accuracy in [("a-seed0", "a", 3.0, 0.6), ("a-seed1", "a", 5.0, 0.8), ("b-seed0", "b", 4.0, 0.5)]:
        arm_dir = root / name
        fake_finished_run(arm_dir / "pretrain", [6.0, loss], {"eval/mlm_accuracy": accuracy / 2})
        runs = [accuracy - 0.1, accuracy + 0.1] if group == "b" else [accuracy]
        fake_finished_run(arm_dir / "finetune", [0.5], results={"task": "sst2", "accuracy": {"mean": accuracy, "std": 0.1, "runs": runs}})
        (arm_dir / "arm.json").write_text(json.dumps(dict(name=name, group=group, overrides={})))
        if group == "a":
            (arm_dir / sweep.PRETRAIN_DONE).touch()
    table = sweep.collect(root)
    assert "| a | 2/2 | 4.0000 ± 1.4142 |" in table
    rows = (root / "results.csv").read_text().splitlines()
    assert rows[0].startswith("arm,runs,finished,loss,loss std") and rows[0].endswith(",status")
    assert rows[1].startswith("a,2,2,4.0,1.414") and rows[1].endswith(",done")
    assert "sst2/accuracy (dev, selection)" in rows[0]
    assert table.splitlines()[3].endswith("| 0.5000 ± 0.1414 | unfinished: b-seed0 |"), "dev metrics pool every fine-tuning seed"
    assert "| 0.7000 ± 0.1414 |" in table.splitlines()[2]
    for png in ("loss_curves.png", "downstream.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sweep.plot_run(root / "a-seed0" / "pretrain").endswith("curves.png")


def test_metrics_with_a_line_cut_by_a_kill_are_read_and_the_line_counted(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 5.0}\n{"step": 20, "loss": 4.0}\n{"step": 30, "lo')
    with caplog.at_level("WARNING"):
        assert sweep.read_metrics(tmp_path) == [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0}]
    assert f"{tmp_path / 'metrics.jsonl'}: skipped 1 line(s) that are not JSON (a run killed while writing?): line 3" in caplog.text


def test_collect_without_arms_says_so(tmp_path):
    with pytest.raises(UserError, match="no arms"):
        sweep.collect(tmp_path)


TINY_SWEEP = '''
from bertjax import config as config_lib
from bertjax.sweep import Arm, product, seeds


def get_config():
    config = config_lib.ablation_config("tiny")
    config.data.corpus = "{corpus}"
    config.data.data_dir = "{cache}"
    config.data.max_seq_length = 32
    config.data.max_predictions = 5
    config.data.eval_fraction = 0.05
    config.model.update(dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=600))
    config.train.update(dict(batch_size=8, total_steps=40, eval_every=3, eval_batches=1, log_every=1, progress=False))
    config.checkpoint.every = 3
    config.optim.warmup_steps = 1
    config.sweep.finetune.suite = "{suite}"
    config.sweep.finetune.seeds = 1
    return config


def get_sweep():
    return product([Arm("nsp", {{"data.sentence_objective": "nsp"}}), Arm("sop", {{"data.sentence_objective": "sop"}})], seeds(1))
'''


# Two tasks of the local suite, a few steps each on small subsets.
TINY_SUITE = """
import ml_collections


def get_config(name=""):
    tiny = dict(data=dict(max_train_examples=64, max_dev_examples=64, max_seq_length=32), train=dict(epochs=0.0, total_steps=3, batch_size=8, eval_every=3))
    return ml_collections.ConfigDict(dict(sst2=dict(config="configs/finetune.py:sst2", settings=tiny), cola=dict(config="configs/finetune.py:cola", settings=tiny)))
"""


def test_shipped_suites_expand_to_valid_configs():
    for name in ("local", "glue"):
        for task, entry in config_lib.load(f"configs/suites.py:{name}").items():
            config = config_lib.load(entry.config)
            for key, value in sweep._flatten(entry.settings).items():
                *parents, leaf = key.split(".")
                parent = config
                for part in parents:
                    parent = parent[part]
                assert leaf in parent, f"suite {name}: task {task} sets unknown key {key}"
                parent[leaf] = value
            config_lib.validate(config)
            assert config.data.test or config.data.dev_split, f"suite {name}: task {task} has no held-out set"


def test_two_arm_sweep_end_to_end(tmp_path, shared_data, monkeypatch):
    """The real CLI: two arms pretrain on real text and fine-tune on a suite of two tasks (SST-2, CoLA);
    the table has both arms and comparisons.csv a row per metric."""
    monkeypatch.setenv("BERTJAX_SHARED_DATA", str(shared_data))
    monkeypatch.chdir(config_lib.REPO_ROOT)
    (tmp_path / "tiny_suite.py").write_text(TINY_SUITE)
    spec_path = tmp_path / "tiny_sweep.py"
    spec_path.write_text(TINY_SWEEP.format(corpus=shared_data / "corpus" / "moby-dick.txt", cache=tmp_path / "cache", suite=tmp_path / "tiny_suite.py"))
    spec = str(spec_path)
    config = config_lib.load(spec)
    overrides = ["--config.train.total_steps=3"]
    config.train.total_steps = 3
    statuses = sweep.run(spec, config, str(tmp_path / "runs"), overrides)
    assert statuses == [dict(arm=a, pretrain="done", finetune="done", tasks=["cola", "sst2"]) for a in ("nsp-seed0", "sop-seed0")], statuses
    for arm, objective in (("nsp-seed0", "nsp"), ("sop-seed0", "sop")):
        pretrain = json.loads((tmp_path / "runs" / arm / "pretrain" / "config.json").read_text())
        assert pretrain["train"]["total_steps"] == 3, "the sweep-level override reaches every arm"
        assert pretrain["data"]["sentence_objective"] == objective, "the arm's own key wins"
        last = sweep.read_metrics(tmp_path / "runs" / arm / "pretrain")[-1]
        assert last["step"] == 3 and {"eval/nsp_accuracy", "eval/sop_accuracy"} <= set(last)
        for task in ("sst2", "cola"):
            results = json.loads((tmp_path / "runs" / arm / "finetune" / task / "results.json").read_text())
            assert results["heldout"] == "data.dev_split" and 0.0 <= results["test"]["accuracy"]["mean"] <= 1.0
            assert len(results["per_seed"][0]["heldout_examples"]["rows"]) == 32
    table = (tmp_path / "runs" / "results.md").read_text()
    assert "| nsp | 1/1 |" in table and "| sop | 1/1 |" in table and "sst2/accuracy" in table and "cola/mcc" in table
    comparisons = (tmp_path / "runs" / "comparisons.csv").read_text().splitlines()
    assert [line.split(",")[:3] for line in comparisons[1:]] == [
        [metric, "nsp", "sop"] for metric in ("cola/accuracy", "cola/mcc", "sst2/accuracy", sweep.SUITE_MEAN)
    ]
    calls = []
    sweep.run(spec, config, str(tmp_path / "runs"), overrides, runner=lambda command, log: calls.append(command) or 0)
    assert calls == [], "a finished sweep re-run runs nothing"


def test_collect_reports_the_seq2seq_reconstruction_loss(tmp_path):
    """A seq2seq denoising arm (configs/ablations/noising.py) logs eval/loss, eval/nll and eval/token_accuracy, not MLM's."""
    root = tmp_path / "runs"
    for name, eval_loss in [("infilling-seed0", 6.5), ("rotation-seed0", 7.25)]:
        fake_finished_run(root / name / "pretrain", [8.0, 7.0], {"eval/loss": eval_loss, "eval/nll": eval_loss, "eval/token_accuracy": 0.125})
        (root / name / "arm.json").write_text(json.dumps(dict(name=name, group=name.removesuffix("-seed0"), overrides={})))
        (root / name / sweep.PRETRAIN_DONE).touch()
    lines = sweep.collect(root).splitlines()
    header = [cell.strip() for cell in lines[0].split("|")]
    assert {"eval/loss", "eval/nll", "eval/token_accuracy"} <= set(header)
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")] for line in lines[2:4]}
    assert rows["infilling"][header.index("eval/loss")].startswith("6.5000") and rows["rotation"][header.index("eval/loss")].startswith("7.2500")
