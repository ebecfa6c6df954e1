"""Do a question-generation model's questions depend on their passage? Per fine-tuning seed: how many
different questions it generates for the held-out inputs, and how many of their content words come from
their own passage against from an unrelated one.

    python experiments/question_generation/grounding.py runs/qg-pretrained runs/qg-scratch [--out DIR]

For each DIR (a `bertjax finetune --config configs/finetune.py:xquad_qg` workdir) and each of its seeds,
the held-out questions of DIR's passage split are generated with `bertjax.train.finetune.predict` (what
`bertjax predict --seed K` runs: input `answer TAB passage`, greedy, the seed's dev-selected parameters).
Printed per seed:
- distinct: different questions among the held-out inputs (1: a constant question, whatever the input);
- top share: the fraction of inputs that get the most frequent question;
- own / other: of the question's content words (lower-cased `[a-z0-9]+` words of 3 or more characters,
  less a short list of question and function words), the fraction found in its own passage and in the
  passage of the held-out question half the list away (another passage, mostly of another article).
  A model that reads its passage has own well above other; the gold questions give the scale.
ROUGE-L and BLEU come from results.json (scored during fine-tuning); --out DIR writes the generations.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re

import compare  # this folder's compare.py: the held-out split

from bertjax import checkpoint_io
from bertjax.train import finetune

STOP = set(
    "what is the of a an in to and was were did does do how who whom which when where why for on by with as at from "
    "that this are be name its it his her their or has have had can not".split()
)


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2 and w not in STOP}


def grounding(questions: list[str], passages: list[str]) -> tuple[float, float]:
    """(own, other): the fraction of the questions' content words in their own passage, and in the passage
    half the list away."""
    n = len(questions)
    own = other = total = 0
    for i, question in enumerate(questions):
        words = content_words(question)
        total += len(words)
        own += len(words & content_words(passages[i]))
        other += len(words & content_words(passages[(i + n // 2) % n]))
    return own / max(total, 1), other / max(total, 1)


def heldout(workdir: pathlib.Path) -> list:
    return compare.heldout(checkpoint_io.read_config(workdir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path, help="question-generation fine-tuning workdirs")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write each seed's generations to DIR/NAME-seedK.txt")
    args = parser.parse_args()

    examples = heldout(args.workdirs[0])
    passages = [example.context for example in examples]
    lines = [f"{example.answers[0]}\t{example.context}".replace("\n", " ") for example in examples]
    gold = [example.question for example in examples]
    own, other = grounding(gold, passages)
    print(f"{len(examples)} held-out questions; gold questions: own {own:.2f}, other {other:.2f}")
    print(f"{'workdir':<40} {'seed':>4} {'distinct':>9} {'top share':>9} {'own':>5} {'other':>5} {'ROUGE-L':>7} {'BLEU':>6}")
    for workdir in args.workdirs:
        if [e.qid for e in heldout(workdir)] != [e.qid for e in examples]:
            raise SystemExit(f"{workdir}: its held-out questions differ from {args.workdirs[0]}'s (another file or split)")
        results = json.loads((workdir / "results.json").read_text())
        for run in results["per_seed"]:
            questions = list(finetune.predict(workdir, lines, seed=run["seed"]))
            counts = collections.Counter(questions)
            own, other = grounding(questions, passages)
            test = run.get("test", {})
            print(
                f"{str(workdir)[-40:]:<40} {run['seed']:>4} {len(counts):>9} {counts.most_common(1)[0][1] / len(questions):>9.2f} "
                f"{own:>5.2f} {other:>5.2f} {test.get('rougeL', float('nan')):>7.3f} {test.get('bleu', float('nan')):>6.2f}"
            )
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"{workdir.name}-seed{run['seed']}.txt").write_text("\n".join(questions) + "\n")


if __name__ == "__main__":
    main()
