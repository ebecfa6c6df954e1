"""Held-out question-generation scores of fine-tuning workdirs, and the multi-bootstrap difference
between them and against constant questions.

    python experiments/question_generation/compare.py runs/qg-pretrained runs/qg-scratch \
        --constant "What is the?" --constant "What is the name of the"

Each DIR is a `bertjax finetune --config configs/finetune.py:xquad_qg` workdir (its results.json, with
the per-example statistics of each seed's held-out generations). The first DIR is compared with every
other and with each constant question: the difference of the seed-mean ROUGE-L F and corpus BLEU, its
95% interval and p-value from `bertjax.eval.stats.multi_bootstrap` (fine-tuning seeds and held-out
questions resampled, the questions paired), as `bertjax sweep collect` computes them for the arms of a
sweep. A constant question is scored on the same held-out questions (read from the first DIR's config:
the same file, split by passage with the same seed): the floor a model must clear to show that its
questions depend on the passage.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from bertjax import checkpoint_io, sweep
from bertjax.eval import per_example, stats
from bertjax.train import finetune

METRICS = ("rougeL", "bleu")


def workdir_runs(workdir: pathlib.Path, metric: str) -> stats.Runs:
    task_runs = sweep._task_runs("", workdir)
    runs = sweep._runs([(str(workdir), task_runs)], task_runs.task, metric, without_failed=False)
    if runs is None:
        raise SystemExit(f"{workdir}: results.json has no held-out per-example statistics for {metric!r}; rerun the fine-tuning with this version")
    return runs


def heldout(config) -> list:
    """The held-out examples of a question-generation workdir's config (its file, split by passage)."""
    return finetune._passage_split(config, "seq2seq")[2]


def constant_runs(text: str, questions: list[str], metric: str, tokenize: str) -> stats.Runs:
    examples = per_example.statistics("seq2seq", False, [text] * len(questions), questions, None, tokenize)
    return stats.Runs(np.asarray(examples["rows"], np.float64)[None], ("constant",), per_example.metric("text", metric))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path, help="fine-tuning workdirs; the first is compared with the others")
    parser.add_argument("--constant", action="append", default=[], help="a constant question to score and compare against (repeatable)")
    parser.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args()

    first = args.workdirs[0]
    config = checkpoint_io.read_config(first)
    tokenize = config.task.get("text_tokenize", "auto")
    questions = [example.question for example in heldout(config)] if args.constant else []
    sides = {str(w): {m: workdir_runs(w, m) for m in METRICS} for w in args.workdirs}
    sides.update({repr(text): {m: constant_runs(text, questions, m, tokenize) for m in METRICS} for text in args.constant})

    print(f"held-out questions: {sides[str(first)]['rougeL'].stats.shape[1]}")
    print(f"{'system':<48} {'runs':>4} {'ROUGE-L F (per run)':>34} {'BLEU (per run)':>30}")
    for name, runs in sides.items():
        cells = []
        for metric in METRICS:
            values = runs[metric].metric(runs[metric].stats.sum(axis=1))
            cells.append(f"{np.mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})")
        print(f"{name[-48:]:<48} {len(runs['bleu'].groups):>4} {cells[0]:>34} {cells[1]:>30}")
    print(f"\nmulti-bootstrap, {args.samples} resamples (seeds and questions), 95% interval:")
    for name, runs in sides.items():
        if name == str(first):
            continue
        for metric in METRICS:
            result = stats.multi_bootstrap([(sides[str(first)][metric], runs[metric])], num_samples=args.samples)
            print(
                f"  {str(first)[-30:]} - {name[-30:]:<30} {metric:<7} {result.difference:+.3f}  [{result.low:+.3f}, {result.high:+.3f}]  p={result.p_value:.4f}"
            )


if __name__ == "__main__":
    main()
