"""Downstream evaluation a researcher can trust: per-example statistics that reproduce the metrics,
the two-level multi-bootstrap calibrated on synthetic runs, collapsed runs flagged, the dev split,
dev selection blind to the held-out labels, and collect's tables and comparisons.csv."""

import csv
import json

import ml_collections
import numpy as np
import pytest

from bertjax import config as config_lib
from bertjax import sweep
from bertjax.data import tasks
from bertjax.eval import metrics as metrics_lib
from bertjax.eval import per_example, stats
from bertjax.train import finetune


def _totals_metric(kind_stats, name, positive=None):
    fn = per_example.metric(kind_stats["kind"], name, kind_stats["classes"], positive)
    return float(fn(np.asarray(kind_stats["rows"], dtype=np.float64).sum(axis=0)))


@pytest.mark.parametrize("classes", [("0", "1"), ("contradiction", "entailment", "neutral")])
def test_per_example_statistics_reproduce_the_classification_metrics(classes):
    rng = np.random.default_rng(len(classes))
    gold = rng.choice(classes, size=300)
    predicted = np.where(rng.random(300) < 0.6, gold, rng.choice(classes, size=300))
    counts = per_example.statistics("single", False, list(predicted), list(gold), classes)
    assert _totals_metric(counts, "accuracy") == pytest.approx(metrics_lib.accuracy(predicted, gold))
    assert _totals_metric(counts, "mcc") == pytest.approx(metrics_lib.matthews_corrcoef(predicted, gold))
    assert _totals_metric(counts, "f1", classes[1]) == pytest.approx(metrics_lib.f1(predicted, gold, positive=classes[1]))
    assert per_example.metric("confusion", "spearman", classes) is None


def test_per_example_statistics_reproduce_tagging_and_pearson():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"], ["O", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "O"], ["B-MISC", "O"]]
    counts = per_example.statistics("tagging", False, predicted, gold, None)
    assert _totals_metric(counts, "entity_f1") == pytest.approx(metrics_lib.entity_f1(predicted, gold))
    assert _totals_metric(counts, "accuracy") == pytest.approx(metrics_lib.token_accuracy(predicted, gold))
    x = np.random.default_rng(0).normal(size=50)
    y = x + np.random.default_rng(1).normal(size=50)
    moments = per_example.statistics("pair", True, list(x), list(y), None)
    assert _totals_metric(moments, "pearson") == pytest.approx(metrics_lib.pearson(x, y))
    assert per_example.statistics("span", False, ["a"], [["a"]], None) is None


def test_per_example_statistics_reproduce_corpus_bleu_and_rouge_l_on_any_resample(shared_data):
    """Question generation's held-out texts: summed per-example statistics give sacrebleu's corpus BLEU and
    rouge-score's ROUGE-L, on the whole set and on resamples with repeats (what the bootstrap draws), for
    real questions against predictions from exact to empty."""
    squad_file = shared_data / "squad-format" / "xquad.en.json"
    questions = [qa["question"] for article in json.loads(squad_file.read_text())["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    rng = np.random.default_rng(0)
    gold = list(rng.choice(questions, size=120, replace=False))
    predictions = []
    for i, question in enumerate(gold):
        words = question.split()
        kind = i % 5
        predictions.append(
            question if kind == 0 else "" if kind == 1 else "What is the?" if kind == 2 else " ".join(words[: max(1, len(words) // 2)]) if kind == 3 else " ".join(rng.permutation(words))
        )
    counts = per_example.statistics("seq2seq", False, predictions, gold, None)
    assert counts["kind"] == "text" and len(counts["rows"]) == 120
    assert _totals_metric(counts, "bleu") == pytest.approx(metrics_lib.bleu(predictions, gold), abs=1e-9)
    assert _totals_metric(counts, "rougeL") == pytest.approx(metrics_lib.rouge_l(predictions, gold), abs=1e-12)
    rows = np.asarray(counts["rows"])
    for draw in range(5):
        picked = rng.integers(0, 120, size=60 if draw < 4 else 3)  # repeats, and a tiny resample where 4-grams may vanish
        resampled_bleu = float(per_example.metric("text", "bleu")(rows[picked].sum(0)))
        assert resampled_bleu == pytest.approx(metrics_lib.bleu([predictions[i] for i in picked], [gold[i] for i in picked]), abs=1e-9)
    nothing = per_example.statistics("seq2seq", False, ["", ""], gold[:2], None)
    assert _totals_metric(nothing, "bleu") == 0.0 == metrics_lib.bleu(["", ""], gold[:2])
    assert per_example.metric("text", "accuracy") is None


# ------------------------------------------------------------------------ the two-level multi-bootstrap

ACCURACY = per_example.metric("tagging", "accuracy")  # totals [correct, count] -> correct / count


def _system(rng, difficulty, shift, pretraining_seeds, finetuning_seeds, spread):
    """Per-example [correct, 1] of every run: a pretraining seed and a fine-tuning seed each shift the
    run's log-odds (what the interval must cover besides the examples)."""
    rows, groups = [], []
    for p in range(pretraining_seeds):
        pretrain_shift = rng.normal(0.0, spread)
        for _ in range(finetuning_seeds):
            logits = difficulty + shift + pretrain_shift + rng.normal(0.0, spread / 2)
            correct = rng.random(len(difficulty)) < 1 / (1 + np.exp(-logits))
            rows.append(np.stack([correct, np.ones_like(correct)], axis=1).astype(float))
            groups.append(p)
    return stats.Runs(np.stack(rows), tuple(groups), ACCURACY)


def _draw(rng, shift, examples=150, pretraining_seeds=6, finetuning_seeds=2, spread=0.3):
    difficulty = rng.normal(0.0, 1.5, size=examples)
    a = _system(rng, difficulty, shift, pretraining_seeds, finetuning_seeds, spread)
    b = _system(rng, difficulty, 0.0, pretraining_seeds, finetuning_seeds, spread)
    return a, b


def test_multi_bootstrap_covers_the_true_difference_near_the_nominal_rate():
    shift = 0.3
    big = _draw(np.random.default_rng(99), shift, examples=20_000, pretraining_seeds=300, finetuning_seeds=1)
    truth = big[0].observed() - big[1].observed()
    rng = np.random.default_rng(1)
    repetitions = 200
    covered = sum(
        (result := stats.multi_bootstrap([_draw(rng, shift)], num_samples=300, seed=r)).low <= truth <= result.high for r in range(repetitions)
    )
    # 200 repetitions measure coverage to about +-3 points; six pretraining seeds make the percentile
    # interval a little narrow (the bootstrap of few groups), which this bound allows and no more.
    assert 0.86 <= covered / repetitions <= 0.99, covered / repetitions


def test_multi_bootstrap_p_value_is_roughly_uniform_without_an_effect():
    rng = np.random.default_rng(2)
    p_values = np.sort([stats.multi_bootstrap([_draw(rng, 0.0)], num_samples=300, seed=r).p_value for r in range(200)])
    distance = np.max(np.abs(p_values - np.arange(1, 201) / 200))
    assert distance < 0.15, distance
    assert np.mean(p_values < 0.05) < 0.12


def test_multi_bootstrap_resamples_seeds_not_only_examples():
    """One pretraining seed per side hides the seed's effect; six seeds widen the interval."""
    rng = np.random.default_rng(3)
    few = stats.multi_bootstrap([_draw(rng, 0.0, examples=400, pretraining_seeds=1, finetuning_seeds=1, spread=0.6)], num_samples=400)
    many = stats.multi_bootstrap([_draw(rng, 0.0, examples=400, pretraining_seeds=6, finetuning_seeds=2, spread=0.6)], num_samples=400)
    assert many.seeds == (6, 6) and few.seeds == (1, 1)
    assert (many.high - many.low) > (few.high - few.low) * 0.5
    a, b = _draw(rng, 0.0)
    with pytest.raises(ValueError, match="share their examples"):
        stats.multi_bootstrap([(a, stats.Runs(b.stats[:, :10], b.groups, ACCURACY))])


# ------------------------------------------------------------------------ failed runs and the dev split


def _config(family="single", metrics=("accuracy",), margin=0.01):
    task = dict(family=family, metrics=metrics, regression=False, positive_label="1")
    return ml_collections.ConfigDict(dict(task=task, finetune=dict(failed_margin=margin)))


def test_a_constant_prediction_run_is_flagged_failed():
    config = _config(metrics=("mcc", "accuracy"))
    train = [tasks.TextExample(("x",), label, "t") for label in ["1"] * 7 + ["0"] * 3]
    dev = [tasks.TextExample(("x",), label, "d") for label in ["1", "1", "0", "1", "0"]]
    labels = tasks.Labels(["0", "1"])
    majority = finetune.majority_predictions(config, labels, train, dev)
    assert majority == ["1"] * 5
    baseline = finetune.score(config, majority, dev)
    assert baseline == {"mcc": 0.0, "accuracy": 0.6}
    assert finetune.failure(config, majority, baseline, baseline) == "constant prediction '1'"
    # Not constant, but no better than the majority class: failed too.
    near = ["0", "1", "1", "1", "1"]
    assert "majority class" in finetune.failure(config, near, finetune.score(config, near, dev), baseline)
    good = ["1", "1", "0", "1", "1"]
    assert finetune.failure(config, good, finetune.score(config, good, dev), baseline) is None


def test_a_tagger_that_tags_everything_O_is_flagged_failed():
    config = _config(family="tagging", metrics=("entity_f1", "accuracy"))
    train = [tasks.TaggedSentence(("a", "b", "c"), ("O", "B-PER", "O"), "t")]
    dev = [tasks.TaggedSentence(("d", "e"), ("B-LOC", "O"), "d")]
    majority = finetune.majority_predictions(config, tasks.Labels(["B-PER", "O"]), train, dev)
    assert majority == [["O", "O"]]
    baseline = finetune.score(config, majority, dev)
    assert finetune.failure(config, majority, baseline, baseline).startswith("constant prediction")


def test_dev_split_is_fixed_disjoint_and_checked():
    records = list(range(101))
    select, held = finetune.split_dev(records, 0.5)
    assert (select, held) == finetune.split_dev(records, 0.5)
    assert sorted(select + held) == records and len(held) == 50 and select == sorted(select)
    with pytest.raises(config_lib.ConfigError, match="dev_split"):
        finetune.split_dev([1], 0.5)
    config = config_lib.load("configs/finetune.py:sst2")
    assert config.data.dev_split == 0.5
    config.data.test = "test.tsv"
    with pytest.raises(config_lib.ConfigError, match="data.dev_split"):
        config_lib.validate(config)
    assert config_lib.load("configs/finetune.py:conll2003").data.test.endswith("eng.testb")


def test_dev_selection_never_reads_the_held_out_labels(shared_data, tmp_path):
    """The same run with the held-out labels shuffled: same steps chosen, same dev scores, other test scores."""
    lines = (shared_data / "glue/SST-2/dev.tsv").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    (tmp_path / "dev.tsv").write_text("\n".join([header] + rows[:200]) + "\n")
    test_rows = rows[200:400]
    labels = [row.rsplit("\t", 1)[1] for row in test_rows]
    shuffled = list(np.random.default_rng(0).permutation(labels))
    assert shuffled != labels
    (tmp_path / "test.tsv").write_text("\n".join([header] + test_rows) + "\n")
    (tmp_path / "shuffled.tsv").write_text("\n".join([header] + [r.rsplit("\t", 1)[0] + "\t" + l for r, l in zip(test_rows, shuffled)]) + "\n")
    results = {}
    for name in ("test", "shuffled"):
        config = config_lib.load("configs/finetune.py:sst2")
        config.model.update(dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=400))
        config.data.update(dict(train=str(shared_data / "glue/SST-2/train.tsv"), dev=str(tmp_path / "dev.tsv"), test=str(tmp_path / f"{name}.tsv")))
        config.data.update(dict(dev_split=0.0, max_train_examples=400, max_seq_length=24))
        config.train.update(dict(batch_size=16, eval_batch_size=40, epochs=0.0, total_steps=9, eval_every=3, log_every=3, progress=False))
        config.optim.lr = 3e-3
        results[name] = finetune.train_and_evaluate(config, tmp_path / name)
    normal, shuffled_run = results["test"], results["shuffled"]
    assert normal["heldout"] == "data.test"
    assert normal["best_step"] == shuffled_run["best_step"]
    assert normal["dev"] == shuffled_run["dev"] and normal["accuracy"] == normal["dev"]["accuracy"]
    # The held-out labels are read (for the held-out score) after selection: the per-example cells differ.
    run = normal["per_seed"][0]
    assert run["heldout_examples"] != shuffled_run["per_seed"][0]["heldout_examples"]
    assert run["heldout_examples"]["kind"] == "confusion" and len(run["heldout_examples"]["rows"]) == 200
    assert _totals_metric(run["heldout_examples"], "accuracy") == pytest.approx(run["test"]["accuracy"])


# ------------------------------------------------------------------------ collect on synthetic runs


def _fake_task_run(task_dir, task, primary, gold, accuracies, failed, rng):
    """A finished fine-tuning run of a binary task whose seeds get the given held-out accuracies."""
    per_seed = []
    for seed, (accuracy, is_failed) in enumerate(zip(accuracies, failed)):
        correct = rng.random(len(gold)) < accuracy
        predicted = ["1"] * len(gold) if is_failed else [g if c else ("0" if g == "1" else "1") for g, c in zip(gold, correct)]
        examples = per_example.statistics("single", False, predicted, gold, ["0", "1"])
        test = {"accuracy": metrics_lib.accuracy(np.array(predicted), np.array(gold))}
        if primary == "mcc":
            test = {"mcc": metrics_lib.matthews_corrcoef(np.array(predicted), np.array(gold)), **test}
        per_seed.append(dict(seed=seed, best_step=10, failed=is_failed, failure="constant prediction '1'" if is_failed else None, metrics=test, test=test, heldout_examples=examples))
    results = dict(task=task, primary_metric=primary, per_seed=per_seed, failed_seeds=[r["seed"] for r in per_seed if r["failed"]])
    results.update({name: finetune.summarize([r["metrics"][name] for r in per_seed]) for name in per_seed[0]["metrics"]})
    task_dir.mkdir(parents=True)
    (task_dir / "results.json").write_text(json.dumps(results))
    (task_dir / "config.json").write_text(json.dumps({"task": {"positive_label": "1"}}))


def test_collect_reports_held_out_scores_failed_runs_and_comparisons(tmp_path):
    rng = np.random.default_rng(0)
    gold = {"sst2": list(rng.choice(["0", "1"], size=300)), "cola": list(rng.choice(["0", "1"], size=200, p=[0.3, 0.7]))}
    accuracy = {"strong": 0.9, "weak": 0.6, "weak2": 0.6}
    for group in accuracy:
        for pretraining_seed in range(2):
            arm_dir = tmp_path / f"{group}-seed{pretraining_seed}"
            arm_dir.mkdir()
            (arm_dir / "arm.json").write_text(json.dumps(dict(name=arm_dir.name, group=group, overrides={})))
            (arm_dir / sweep.PRETRAIN_DONE).touch()
            (arm_dir / sweep.STATUS).write_text(json.dumps(dict(arm=arm_dir.name, pretrain="done", finetune="done", tasks=["sst2", "cola"])))
            for task, primary in (("sst2", "accuracy"), ("cola", "mcc")):
                failed = [group == "weak" and pretraining_seed == 0 and task == "sst2", False]
                _fake_task_run(sweep.finetune_dir(arm_dir, task), task, primary, gold[task], [accuracy[group]] * 2, failed, rng)
    table = sweep.collect(tmp_path, num_samples=300)
    assert "sst2/accuracy" in table and "cola/mcc" in table and sweep.SUITE_MEAN in table and "(dev, selection)" not in table
    assert "- weak: cola 0/4, sst2 1/4" in table and "- strong: none" in table
    assert "The same, without the failed runs:" in table
    with open(tmp_path / "comparisons.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = ["cola/accuracy", "cola/mcc", "sst2/accuracy", sweep.SUITE_MEAN]
    assert [(r["metric"], r["arm_a"], r["arm_b"]) for r in rows] == [(m, a, b) for a, b in (("strong", "weak"), ("strong", "weak2"), ("weak", "weak2")) for m in metrics]
    by_key = {(r["metric"], r["arm_a"], r["arm_b"]): r for r in rows}
    strong = by_key[("sst2/accuracy", "strong", "weak2")]
    assert strong["separated"] == "True" and float(strong["low"]) > 0.2 and strong["pretraining_seeds_a"] == "2" and strong["finetuning_seeds_a"] == "2"
    assert strong["examples"] == "300" and float(strong["p_value"]) < 0.01
    null = by_key[("cola/mcc", "weak", "weak2")]
    assert null["separated"] == "False" and float(null["low"]) < 0 < float(null["high"])
    failed = by_key[("sst2/accuracy", "weak", "weak2")]
    assert failed["failed_a"] == "1" and failed["failed_b"] == "0" and failed["difference_without_failed"] != failed["difference"]
    assert "| cola/mcc | weak | weak2 |" in table and "not separated at this budget" in table and "| strong higher |" in table
    assert (tmp_path / "comparisons.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"sst2/accuracy", "sst2/accuracy without failed", "failed runs"} <= set(header)
