"""`bertjax <verb>`: flags only. Each verb parses its flags, loads its config and calls one function.

  bertjax pretrain   --config configs/pretrain.py:tiny --workdir runs/x [--config.KEY=VALUE ...]
  bertjax finetune   --config configs/finetune.py:sst2 --workdir runs/sst2 [--config.init_from=runs/x]
  bertjax predict    --workdir runs/sst2 [--input FILE]       (text on stdin without --input)
  bertjax data       stats|show --config configs/pretrain.py:tiny [--batches N | --examples N]
  bertjax tokenizer  train --input FILE... --vocab-size N --out DIR [--model-type unigram|bpe]
  bertjax convert    --from DIR --to DIR                       (HuggingFace <-> bertjax, by what DIR holds)
  bertjax sweep      --config configs/ablations/FILE.py --workdir runs/s [--print-commands]
  bertjax sweep      collect runs/s
  bertjax plot       runs/x

`bertjax VERB --help` explains a verb's flags. A bad input is one line on stderr and exit status 1
(2 for bad usage); add --verbose (or set BERTJAX_VERBOSE=1) for the traceback. Configs are ml_collections ConfigDicts chosen as
`file.py:argument` and overridden key by key with `--config.a.b=value`; a key that does not
exist is an error, never a silently new setting.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from bertjax import config as config_lib
from bertjax import errors


def _flag_error(error: Exception) -> str:
    """ml_collections puts its did-you-mean hint inside a repr'd KeyError; unwrap it for the user."""
    text = str(error.args[0] if error.args else error)
    while text[:1] in "'\"" and text[-1:] == text[:1]:
        text = text[1:-1]
    return text.replace("\\n", " ").replace("\n", " ").replace("\\'", "'").replace("\\", "")


def _repo_relative_config(argv: list[str]) -> list[str]:
    """`--config configs/x.py:arg` also works outside the clone: a relative path missing here is taken from the repo."""
    resolved = []
    for index, arg in enumerate(argv):
        previous = argv[index - 1] if index else ""
        if previous == "--config" or arg.startswith("--config="):
            prefix, spec = ("", arg) if previous == "--config" else ("--config=", arg.split("=", 1)[1])
            path, colon, variant = spec.partition(":")
            if not pathlib.Path(path).exists():
                if not (config_lib.REPO_ROOT / path).exists():
                    raise SystemExit(f"bertjax: config file {path!r} does not exist (here or under {config_lib.REPO_ROOT})")
                arg = f"{prefix}{config_lib.REPO_ROOT / path}{colon}{variant}"
        resolved.append(arg)
    return resolved


def _parse_config_flags(verb: str, argv: list[str], default_config: str | None, define_extra=None, doc: str = ""):
    """Parse `--config file.py:arg --config.key=value ...` plus the verb's own absl flags."""
    argv = _repo_relative_config(argv)
    flag_values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_file(
            "config",
            default=default_config,
            help_string="Config file and argument, `path/to/file.py:arg`; override keys with --config.KEY=VALUE.",
            flag_values=flag_values,
            lock_config=True,
            # The overrides are read from this argv, not sys.argv, so that cli.main([...]) applies them.
            sys_argv=[f"bertjax {verb}"] + list(argv),
        )
    except (flags.Error, AttributeError, KeyError, ValueError, OSError) as error:
        raise SystemExit(f"bertjax {verb}: {_flag_error(error)}") from None
    if define_extra:
        define_extra(flag_values)
    if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv):
        print(doc.strip() or f"bertjax {verb}")
        print()
        print(flag_values.get_help().split("\nabsl.flags:")[0])
        raise SystemExit(0)
    if default_config is None and not any(a == "--config" or a.startswith("--config=") for a in argv):
        raise SystemExit(f"bertjax {verb}: --config is required (see bertjax {verb} --help)")
    try:
        unparsed = flag_values([f"bertjax {verb}"] + argv)
    except (flags.Error, AttributeError, KeyError, ValueError, OSError) as error:
        raise SystemExit(f"bertjax {verb}: {_flag_error(error)}") from None
    if len(unparsed) > 1:
        raise SystemExit(f"bertjax {verb}: unexpected arguments {unparsed[1:]} (see bertjax {verb} --help)")
    config = flag_values.config
    if config is None:
        raise SystemExit(f"bertjax {verb}: could not load the config")
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as error:
        raise SystemExit(f"bertjax {verb}: {error}") from None
    overrides = [a for a in argv if a.startswith("--config.")]
    return config, flag_values, overrides


def _define_workdir(flag_values):
    flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints (resumed if present).", flag_values=flag_values)


def _require_workdir(verb: str, flag_values) -> str:
    if not flag_values.workdir:
        raise SystemExit(f"bertjax {verb}: --workdir is required")
    return flag_values.workdir


PRETRAIN_DOC = """bertjax pretrain: pretrain an encoder (MLM + NSP|SOP|none) from a config.

  bertjax pretrain --workdir runs/tiny                       # tiny model, default corpus, no download
  bertjax pretrain --config configs/pretrain.py:mini --workdir runs/mini --config.optim.lr=3e-4

A workdir that already holds checkpoints resumes from the newest complete one."""


def pretrain(argv):
    config, flag_values, _ = _parse_config_flags("pretrain", argv, config_lib.DEFAULT_PRETRAIN_CONFIG, _define_workdir, PRETRAIN_DOC)
    from bertjax.train import pretrain as pretrain_lib

    pretrain_lib.train_and_evaluate(config, _require_workdir("pretrain", flag_values))


FINETUNE_DOC = """bertjax finetune: fine-tune on a downstream task; writes results.json in the workdir.

  bertjax finetune --config configs/finetune.py:sst2 --workdir runs/sst2 --config.init_from=runs/tiny
  bertjax finetune --config configs/finetune.py:conll2003 --workdir runs/ner --config.finetune.regime=features

init_from: a pretraining workdir, WORKDIR:STEP for a kept step, or a HuggingFace BERT directory."""


def finetune(argv):
    config, flag_values, _ = _parse_config_flags("finetune", argv, None, _define_workdir, FINETUNE_DOC)
    from bertjax.train import finetune as finetune_lib

    finetune_lib.train_and_evaluate(config, _require_workdir("finetune", flag_values))


def predict(argv):
    parser = argparse.ArgumentParser(
        prog="bertjax predict",
        description="Predict with a fine-tuned workdir: one input per line (tab between the texts of a pair; "
        "for QA, question TAB passage); writes the label, the tags or the answer per line.",
    )
    parser.add_argument("--workdir", required=True, help="A fine-tuning workdir (holds config.json and checkpoints).")
    parser.add_argument("--input", default="-", help="Input file; '-' (the default) reads stdin.")
    parser.add_argument("--output", default="-", help="Output file; '-' (the default) writes stdout.")
    args = parser.parse_args(argv)
    from bertjax.train import finetune as finetune_lib

    lines = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    with lines, out:
        for prediction in finetune_lib.predict(args.workdir, (line.rstrip("\n") for line in lines)):
            out.write(prediction + "\n")


DATA_DOC = """bertjax data stats|show: inspect the pretraining batches a config produces, before training.

  bertjax data stats --config configs/pretrain.py:tiny --batches 50    # one JSON line of statistics
  bertjax data show  --config configs/pretrain.py:tiny --examples 3    # decoded examples, masks marked"""


def data(argv):
    if not argv or argv[0] not in ("stats", "show"):
        raise SystemExit(DATA_DOC)
    action, rest = argv[0], argv[1:]

    def define(flag_values):
        flags.DEFINE_integer("batches", 20, "stats: how many batches to read.", flag_values=flag_values)
        flags.DEFINE_integer("examples", 3, "show: how many examples to print.", flag_values=flag_values)
        flags.DEFINE_string("split", "train", "train or eval.", flag_values=flag_values)

    config, flag_values, _ = _parse_config_flags(f"data {action}", rest, config_lib.DEFAULT_PRETRAIN_CONFIG, define, DATA_DOC)
    from bertjax.data import inspect as inspect_lib

    if action == "stats":
        import json

        print(json.dumps(inspect_lib.stats(config, flag_values.split, flag_values.batches)))
    else:
        print(inspect_lib.show(config, flag_values.split, flag_values.examples))


def tokenizer(argv):
    parser = argparse.ArgumentParser(prog="bertjax tokenizer", description="Train a sentencepiece tokenizer with BERT's special tokens.")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="Train a unigram or BPE model with [PAD] [UNK] [CLS] [SEP] [MASK] and byte fallback.")
    train.add_argument("--input", nargs="+", required=True, help="Text files (UTF-8; other bytes are replaced and counted).")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="Directory for tokenizer.model and tokenizer.vocab.")
    train.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"))
    args = parser.parse_args(argv)
    from bertjax.data import tokenizer as tokenizer_lib

    path = tokenizer_lib.train(args.input, args.vocab_size, args.out, model_type=args.model_type)
    print(path)


def convert(argv):
    parser = argparse.ArgumentParser(
        prog="bertjax convert",
        description="Convert between a HuggingFace BERT directory (config.json + model.safetensors) and a bertjax "
        "checkpoint. The direction follows from what --from holds: a HuggingFace directory becomes a bertjax "
        "workdir; a bertjax workdir (or WORKDIR:STEP) becomes a HuggingFace directory.",
    )
    parser.add_argument("--from", dest="source", required=True, help="HF directory, bertjax workdir, or WORKDIR:STEP.")
    parser.add_argument("--to", dest="target", required=True, help="Output directory (must not exist or be empty).")
    args = parser.parse_args(argv)
    from bertjax import checkpoint_io

    print(checkpoint_io.convert(args.source, args.target))


SWEEP_DOC = """bertjax sweep: run every arm of an ablation, resume unfinished ones, collect a table and plots.

  bertjax sweep --config configs/ablations/sentence_objective.py --workdir runs/sop
  bertjax sweep --config configs/ablations/masking_rate.py --workdir runs/mask --config.train.total_steps=50
  bertjax sweep --config configs/ablations/masking_rate.py --workdir runs/mask --print-commands
  bertjax sweep collect runs/sop

--config.KEY=VALUE applies to every arm; an arm's own settings win for the keys it names."""


def sweep(argv):
    from bertjax import sweep as sweep_lib

    if argv and argv[0] == "collect":
        if len(argv) != 2:
            raise SystemExit("usage: bertjax sweep collect WORKDIR")
        print(sweep_lib.collect(argv[1]))
        return

    def define(flag_values):
        _define_workdir(flag_values)
        flags.DEFINE_bool("print_commands", False, "Print one command per arm (for a cluster scheduler) instead of running.", flag_values=flag_values)

    argv = ["--print_commands" if a == "--print-commands" else a for a in argv]
    config, flag_values, overrides = _parse_config_flags("sweep", argv, None, define, SWEEP_DOC)
    config_spec = next(a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
    sweep_lib.run(config_spec, config, _require_workdir("sweep", flag_values), overrides, print_commands=flag_values.print_commands)


def plot(argv):
    parser = argparse.ArgumentParser(prog="bertjax plot", description="Draw the loss and metric curves of a run (metrics.jsonl) to PNG.")
    parser.add_argument("workdir")
    args = parser.parse_args(argv)
    from bertjax import sweep as sweep_lib

    print(sweep_lib.plot_run(args.workdir))


VERBS = {
    "pretrain": pretrain,
    "finetune": finetune,
    "predict": predict,
    "data": data,
    "tokenizer": tokenizer,
    "convert": convert,
    "sweep": sweep,
    "plot": plot,
}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "--verbose" in argv or os.environ.get("BERTJAX_VERBOSE", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--verbose"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0
    verb = VERBS.get(argv[0])
    if verb is None:
        print(f"bertjax: unknown verb {argv[0]!r}; choose one of {', '.join(VERBS)}\n", file=sys.stderr)
        print(__doc__.strip(), file=sys.stderr)
        return errors.EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Orbax reports every phase of every save at INFO through absl; our own progress lines say enough.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        verb(argv[1:])
    except errors.UserError as error:
        if verbose:
            raise
        print(f"bertjax {argv[0]}: {_one_line(error)}", file=sys.stderr)
        return errors.EXIT_ERROR
    except KeyboardInterrupt:
        print(f"bertjax {argv[0]}: interrupted", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
