"""Question generation on XQuAD (family seq2seq): the passage split, the text metrics, the features,
and `bertjax finetune --config configs/finetune.py:xquad_qg` end to end on a subset of the real file."""

import io
import json
import math
import sys

import numpy as np
import pytest

from bertjax import cli
from bertjax.data import tasks
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.eval import metrics, per_example


@pytest.fixture(scope="module")
def xquad(shared_data):
    return tasks.read_squad(shared_data / "squad-format/xquad.en.json")


def test_passage_split_shares_no_passage_on_the_real_file(xquad):
    train, dev, test = tasks.split_by_passage(xquad, (0.7, 0.15), seed=0)
    passages = [{example.context for example in part} for part in (train, dev, test)]
    assert not passages[0] & passages[1] and not passages[0] & passages[2] and not passages[1] & passages[2]
    # Every question lands in exactly one part, in file order; XQuAD's 240 passages cut 168 / 36 / 36.
    assert sorted(e.qid for part in (train, dev, test) for e in part) == sorted(e.qid for e in xquad)
    assert [len(p) for p in passages] == [168, 36, 36]
    order = {example.qid: index for index, example in enumerate(xquad)}
    assert all([order[e.qid] for e in part] == sorted(order[e.qid] for e in part) for part in (train, dev, test))
    # A fixed seed: the same parts every time; another seed: other parts.
    assert [e.qid for e in tasks.split_by_passage(xquad, (0.7, 0.15), seed=0)[2]] == [e.qid for e in test]
    assert [e.qid for e in tasks.split_by_passage(xquad, (0.7, 0.15), seed=1)[2]] != [e.qid for e in test]
    with pytest.raises(tasks.TaskDataError, match="passage_split"):
        tasks.split_by_passage(xquad, (0.9, 0.2), seed=0)


PREDICTIONS = ["the cat sat on the mat today", "who wrote the book", "what is the capital of france"]
REFERENCES = ["the cat sat on the mat", "who is the author of the book", "what is the capital city of france"]


def test_text_metrics_match_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer

    assert metrics.bleu(PREDICTIONS, REFERENCES) == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)])
    assert metrics.rouge_l(PREDICTIONS, REFERENCES) == pytest.approx(expected)
    assert metrics.compute(["bleu", "rougeL"], PREDICTIONS, REFERENCES, text=True) == {
        "bleu": metrics.bleu(PREDICTIONS, REFERENCES),
        "rougeL": metrics.rouge_l(PREDICTIONS, REFERENCES),
    }


def test_text_metrics_split_chinese_by_character_and_other_scripts_by_unicode_words(shared_data):
    """rouge-score's default tokeniser keeps only [a-z0-9] and sacrebleu's 13a does not split Chinese, so
    both score real Chinese questions 0; 'auto' picks 'zh' for them ('13a' for English XQuAD, whose few
    'Temüjin's stay on the default), and then ROUGE-L is the character LCS and BLEU is sacrebleu's 'zh'."""
    import sacrebleu

    def questions(language):
        data = json.loads((shared_data / f"squad-format/xquad.{language}.json").read_text(encoding="utf-8"))["data"]
        return [qa["question"] for article in data for paragraph in article["paragraphs"] for qa in paragraph["qas"]]

    english, chinese = questions("en"), questions("zh")
    assert metrics.text_tokenization(english) == "13a" and metrics.text_tokenization(chinese) == "zh"
    rng = np.random.default_rng(0)
    cjk = [q for q in chinese if all("\u4e00" <= c <= "\u9fff" or not c.isalnum() for c in q)]  # Han characters and punctuation only
    gold = list(rng.choice(cjk, size=60, replace=False))
    kept = [[c for c in q if "\u4e00" <= c <= "\u9fff" and rng.random() < 0.6] for q in gold]  # a subsequence of each question's characters
    predictions = ["".join(k) for k in kept]
    # By hand: the prediction is a subsequence of the reference, so LCS = its length; F = 2k / (k + n).
    han = [sum("\u4e00" <= c <= "\u9fff" for c in q) for q in gold]
    expected = np.mean([2 * len(k) / (len(k) + n) for k, n in zip(kept, han)])
    assert metrics.compute(["rougeL"], predictions, gold, text=True)["rougeL"] == pytest.approx(expected) and expected > 0.5
    scores = metrics.compute(["rougeL", "bleu"], predictions, gold, text=True)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [gold], tokenize="zh").score) and scores["bleu"] > 5
    assert metrics.rouge_l(predictions, gold, tokenize="13a") == 0.0 and metrics.bleu(predictions, gold, tokenize="13a") < 1  # the gap fixed
    # The bootstrap's per-example statistics resolve 'auto' the same way and sum to the same corpus scores.
    rows = per_example.statistics("seq2seq", False, predictions, gold, None)["rows"]
    totals = np.asarray(rows, dtype=np.float64).sum(axis=0)
    assert per_example.metric("text", "bleu")(totals) == pytest.approx(scores["bleu"], abs=1e-9)
    assert per_example.metric("text", "rougeL")(totals) == pytest.approx(scores["rougeL"])
    # Cyrillic: 'intl'; "привет мир" is 2 of the reference's 3 words, in order: P = 1, R = 2/3, F = 0.8.
    assert metrics.text_tokenization(["Привет, большой мир!"]) == "intl"
    assert metrics.compute(["rougeL"], ["Привет мир"], ["Привет, большой мир!"], text=True)["rougeL"] == pytest.approx(0.8)
    assert metrics.rouge_l(["Привет мир"], ["Привет, большой мир!"]) == 0.0  # rouge-score's own tokeniser deletes Cyrillic
    with pytest.raises(ValueError, match="unknown text tokenization 'ja'"):
        metrics.compute(["bleu"], ["a"], ["a"], text=True, tokenize="ja")


def test_text_metrics_by_hand_and_perfect():
    # One sentence with every n-gram precision non-zero: 6/7, 5/6, 4/5, 3/4 and no brevity penalty
    # (the prediction is longer), so BLEU = (3/7) ** (1/4).
    assert metrics.bleu(PREDICTIONS[:1], REFERENCES[:1]) == pytest.approx(100 * (3 / 7) ** 0.25)
    # ROUGE-L: the longest common subsequence "the cat on the mat" is 5 of 6 words either way.
    assert metrics.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    assert metrics.bleu(REFERENCES, REFERENCES) == pytest.approx(100.0)
    assert metrics.rouge_l(REFERENCES, REFERENCES) == pytest.approx(1.0)
    assert metrics.rouge_l(["zebra"], ["the cat"]) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.bleu(REFERENCES[:2], REFERENCES[:1])


@pytest.fixture(scope="module")
def tokenizer(xquad, tmp_path_factory):
    texts = [text for example in xquad[:200] for text in (example.question, example.context)]
    return tokenizer_lib.load(tokenizer_lib.train_from_sentences(texts, 512, tmp_path_factory.mktemp("tok")))


def test_features_put_the_answer_first_and_centre_the_passage_on_it(xquad, tokenizer):
    long_passage = max(xquad[:200], key=lambda example: len(example.context))
    features = tasks.encode_question_generation(tokenizer, [long_passage], 48, 12, 8, decoder_start_id=tokenizer.sep_id)
    ids = features["input_ids"][0][features["attention_mask"][0] == 1].tolist()
    answer = tokenizer.encode(long_passage.answers[0])[:8]
    assert ids[: len(answer) + 2] == [tokenizer.cls_id, *answer, tokenizer.sep_id] and ids[-1] == tokenizer.sep_id and len(ids) == 48
    # The window holds the answer's pieces as the passage tokenises them, with context on both sides.
    start = long_passage.answer_starts[0]
    in_passage = tokenizer.encode(long_passage.context[start : start + len(long_passage.answers[0])])
    window = ids[len(answer) + 2 : -1]
    position = next(i for i in range(len(window)) if window[i : i + len(in_passage)] == in_passage)
    assert abs(position - (len(window) - len(in_passage) - position)) <= 1
    # The target is [CLS] question [SEP], cut to 12; the decoder reads it shifted right after [SEP].
    question = tokenizer.encode(long_passage.question)[:10]
    labels, weights = features["labels"][0], features["label_weights"][0]
    assert labels[weights == 1].tolist() == [tokenizer.cls_id, *question, tokenizer.sep_id]
    assert features["decoder_input_ids"][0][weights == 1].tolist() == [tokenizer.sep_id, tokenizer.cls_id, *question]


def test_cli_end_to_end_on_xquad(shared_data, tmp_path, capsys, monkeypatch):
    """A tiny encoder-decoder from scratch on 64 XQuAD questions: results.json holds BLEU and ROUGE-L
    on dev and on the held-out passages, and predict generates a question per line."""
    workdir = tmp_path / "qg"
    tiny = [
        "--config.data.max_train_examples=64",
        "--config.data.max_dev_examples=16",
        "--config.data.max_test_examples=16",
        "--config.model.hidden_size=32",
        "--config.model.intermediate_size=64",
        "--config.model.num_layers=1",
        "--config.model.num_decoder_layers=1",
        "--config.model.vocab_size=512",
        # Dropout's random bits take XLA's CPU compiler ~20 s more to compile, most of this test's time.
        "--config.model.hidden_dropout=0",
        "--config.model.attention_dropout=0",
        "--config.data.max_seq_length=48",
        "--config.data.max_target_length=12",
        "--config.generation.max_length=8",
        "--config.train.epochs=2",
        "--config.train.eval_every=4",
        "--config.train.eval_batch_size=16",
        "--config.train.progress=False",
    ]
    assert cli.main(["finetune", "--config", "configs/finetune.py:xquad_qg", "--workdir", str(workdir), *tiny]) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert results["family"] == "seq2seq" and results["heldout"] == "data.passage_split" and results["primary_metric"] == "rougeL"
    for part in ("dev", "test"):
        for name, upper in (("bleu", 100.0), ("rougeL", 1.0)):
            assert 0.0 <= results[part][name]["mean"] <= upper and math.isfinite(results[part][name]["std"])
    run = results["per_seed"][0]
    assert run["total_steps"] == 8 and run["best_step"] in (4, 8)
    # Per-example statistics of the held-out questions, so that sweep collect can compare arms on them.
    examples = run["heldout_examples"]
    assert examples["kind"] == "text" and len(examples["rows"]) == 16
    totals = np.asarray(examples["rows"], np.float64).sum(0)
    for name in ("bleu", "rougeL"):
        assert float(per_example.metric("text", name)(totals)) == pytest.approx(run["test"][name], abs=1e-9)
    assert any("eval/bleu" in line for line in (workdir / "seed_0/metrics.jsonl").read_text().splitlines())

    passage = "The Panthers defense gave up just 308 points, ranking sixth in the league."
    (tmp_path / "input.txt").write_text(f"308\t{passage}\nsixth\t{passage}\n")
    assert cli.main(["predict", "--workdir", str(workdir), "--input", str(tmp_path / "input.txt"), "--output", str(tmp_path / "out.txt")]) == 0
    assert len((tmp_path / "out.txt").read_text().split("\n")) == 3  # two lines, each ended
    # --seed picks a seed's parameters: the one seed run here gives the same questions; another is named.
    assert cli.main(["predict", "--workdir", str(workdir), "--seed", "0", "--input", str(tmp_path / "input.txt"), "--output", str(tmp_path / "out0.txt")]) == 0
    assert (tmp_path / "out0.txt").read_text() == (tmp_path / "out.txt").read_text()
    capsys.readouterr()
    assert cli.main(["predict", "--workdir", str(workdir), "--seed", "5", "--input", str(tmp_path / "input.txt"), "--output", str(tmp_path / "out5.txt")]) == 1
    err = capsys.readouterr().err
    assert "--seed 5: " in err and "ran seeds [0]" in err, err
    # generate is for pretraining runs: on a fine-tuning run it names predict instead.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"308\n")))
    assert cli.main(["generate", "--workdir", str(workdir)]) == 1
    assert f"a fine-tuning run; generate from it with `bertjax predict --workdir {workdir}`" in capsys.readouterr().err

    (tmp_path / "bad.txt").write_text("no tab here\n")
    capsys.readouterr()
    assert cli.main(["predict", "--workdir", str(workdir), "--input", str(tmp_path / "bad.txt"), "--output", str(tmp_path / "bad_out.txt")]) == 1
    assert "answer TAB passage" in capsys.readouterr().err
