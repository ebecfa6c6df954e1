"""`bertjax <verb>`: flags only. Each verb parses its flags, loads its config and calls one function.

  bertjax pretrain   --config configs/pretrain.py:tiny --workdir runs/x [--config.KEY=VALUE ...]
  bertjax finetune   --config configs/finetune.py:sst2 --workdir runs/sst2 [--config.init_from=runs/x]
  bertjax predict    --workdir runs/sst2 [--input FILE] [--seed K]  (text on stdin without --input)
  bertjax generate   --workdir RUN [--num-beams 4]             (seq2seq or HF BART: lines on stdin -> stdout)
  bertjax data       stats|show|prepare --config configs/pretrain.py:tiny [--batches N | --examples N | --shard I/N]
  bertjax tokenizer  train --input FILE... --vocab-size N --out DIR [--model-type unigram|bpe|wordpiece]
  bertjax convert    --from DIR --to DIR                       (HuggingFace <-> bertjax, by what DIR holds)
  bertjax sweep      --config configs/ablations/FILE.py --workdir runs/s [--print-commands]
  bertjax sweep      collect runs/s
  bertjax plot       runs/x
  bertjax embryology --workdir runs/x[,runs/y...] [--out DIR] [--watch] [--config.KEY=VALUE ...]

`bertjax VERB --help` explains a verb's flags. A bad input is one line on stderr and exit status 1
(2 for bad usage); add --verbose (or set BERTJAX_VERBOSE=1) for the traceback. Configs are ml_collections ConfigDicts chosen as
`file.py:argument` and overridden key by key with `--config.a.b=value`; a key that does not
exist is an error, never a silently new setting.

Paths are resolved here, once: every path a user gives (--workdir, --input, --from/--to, and the config
keys that name files, config.PATH_KEYS) is made absolute against the working directory before a verb runs.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import pathlib
import signal
import sys

from absl import flags
from ml_collections import config_flags

from bertjax import config as config_lib
from bertjax import errors
from bertjax import host_memory


class UsageError(errors.UserError):
    """A verb called wrongly (an unknown flag, a missing required flag): exit status 2, as argparse and absl use."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`bertjax VERB: ...`, exit 2) like every other failure."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _path(path: str) -> str:
    """A path the user typed, made absolute against the working directory ('-' is stdin/stdout)."""
    return path if path == "-" else config_lib.absolute(path)


def _existing(path: str, flag: str) -> str:
    resolved = _path(path)
    if resolved != "-" and not os.path.exists(resolved):
        raise errors.MissingInputError(f"{flag} {path}: no such file or directory ({resolved})")
    return resolved


def _flag_error(error: Exception) -> str:
    """ml_collections puts its did-you-mean hint inside a repr'd KeyError; unwrap it for the user."""
    text = str(error.args[0] if error.args else error)
    while text[:1] in "'\"" and text[-1:] == text[:1]:
        text = text[1:-1]
    return text.replace("\\n", " ").replace("\n", " ").replace("\\'", "'").replace("\\", "")


def _unknown_key(spec: str, overrides: list[str]) -> str | None:
    """The first `--config.KEY=...` whose KEY the config does not have, with the nearest keys it does have."""
    config = config_lib.load(spec)
    for flag in overrides:
        key = flag.split("=", 1)[0][len("--config.") :]
        node, path = config, []
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                siblings = list(node.keys()) if hasattr(node, "keys") else []
                near = difflib.get_close_matches(part, siblings, n=3)
                where = f"config.{'.'.join(path)}" if path else "the config"
                hint = f"; did you mean {', '.join('.'.join(path + [n]) for n in near)}?" if near else f"; {where} has {sorted(siblings)}" if siblings else ""
                return f"{flag}: {where} has no key {part!r}{hint}"
            node, path = node[part], path + [part]
    return None


def _absolute_config(argv: list[str]) -> tuple[list[str], str | None]:
    """argv with `--config PATH[:ARG]` made absolute (a relative path missing here is taken from the repo), and that spec."""
    resolved, spec = [], None
    for index, arg in enumerate(argv):
        previous = argv[index - 1] if index else ""
        if previous == "--config" or arg.startswith("--config="):
            prefix, value = ("", arg) if previous == "--config" else ("--config=", arg.split("=", 1)[1])
            spec = config_lib.absolute_spec(value)
            arg = prefix + spec
        resolved.append(arg)
    return resolved, spec


def _parse_config_flags(verb: str, argv: list[str], default_config: str | None, define_extra=None, doc: str = ""):
    """Parse `--config file.py:arg --config.key=value ...` plus the verb's own absl flags.

    Returns (config, flag values, the --config.KEY=VALUE overrides, the absolute config spec). Every
    path-valued key of the config is made absolute here (config.resolve_paths), once.
    """
    argv, spec = _absolute_config(argv)
    spec = spec or default_config
    if spec:
        config_lib.load(spec)  # a config file that does not load is named here, in one line, before absl wraps the error
    overrides = [a for a in argv if a.startswith("--config.")]
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
    except (AttributeError, KeyError) as error:
        raise config_lib.ConfigError((spec and _unknown_key(spec, overrides)) or _flag_error(error)) from None
    except (flags.Error, ValueError, OSError) as error:
        raise config_lib.ConfigError(_flag_error(error)) from None
    if define_extra:
        define_extra(flag_values)
    if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv):
        print(doc.strip() or f"bertjax {verb}")
        print()
        print(flag_values.get_help().split("\nabsl.flags:")[0])
        raise SystemExit(0)
    if spec is None:
        raise UsageError(f"--config is required (see bertjax {verb} --help)")
    try:
        unparsed = flag_values([f"bertjax {verb}"] + argv)
    except (AttributeError, KeyError) as error:
        raise config_lib.ConfigError(_unknown_key(spec, overrides) or _flag_error(error)) from None
    except flags.UnrecognizedFlagError as error:
        raise UsageError(f"{_flag_error(error)} (see bertjax {verb} --help)") from None
    except (flags.Error, ValueError, OSError) as error:
        message = _flag_error(error)
        if message.startswith("flag --config.") or message.startswith("--config."):
            raise config_lib.ConfigError(message) from None
        raise UsageError(f"{message} (see bertjax {verb} --help)") from None
    if len(unparsed) > 1:
        raise UsageError(f"unexpected arguments {unparsed[1:]} (see bertjax {verb} --help)")
    config = flag_values.config
    if config is None:
        raise config_lib.ConfigError(f"could not load the config {spec}")
    config_lib.validate(config)
    config_lib.resolve_paths(config)
    if config.get("init_from") and not os.path.exists(config_lib.split_step(config.init_from)[0]):
        raise errors.MissingInputError(
            f"config.init_from={config.init_from}: no such file or directory; give a pretraining workdir, WORKDIR:STEP or a HuggingFace directory"
        )
    return config, flag_values, overrides, spec


def _define_workdir(flag_values):
    flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints (resumed if present).", flag_values=flag_values)


def _require_workdir(verb: str, flag_values) -> str:
    if not flag_values.workdir:
        raise UsageError(f"--workdir is required (see bertjax {verb} --help)")
    return _path(flag_values.workdir)


PRETRAIN_DOC = """bertjax pretrain: pretrain an encoder (MLM + NSP|SOP|none) from a config.

  bertjax pretrain --workdir runs/tiny                       # tiny model, default corpus, no download
  bertjax pretrain --config configs/pretrain.py:mini --workdir runs/mini --config.optim.lr=3e-4

A workdir that already holds checkpoints resumes from the newest complete one."""


def pretrain(argv):
    config, flag_values, _, _ = _parse_config_flags("pretrain", argv, config_lib.DEFAULT_PRETRAIN_CONFIG, _define_workdir, PRETRAIN_DOC)
    from bertjax.train import pretrain as pretrain_lib

    summary = pretrain_lib.train_and_evaluate(config, _require_workdir("pretrain", flag_values))
    stopped_by = summary.get("stopped_by")
    if stopped_by in ("SIGTERM", "SIGINT"):
        # Not 0: a chain such as `pretrain && finetune` (a scheduler's, or `sweep --print-commands`) must
        # not go on as if training had finished. 128 + the signal's number, as a shell reports it.
        print(
            f"bertjax pretrain: stopped by {stopped_by} at step {summary['step']}, checkpoint saved; run the same command to resume",
            file=sys.stderr,
        )
        return 128 + signal.Signals[stopped_by].value
    return 0


FINETUNE_DOC = """bertjax finetune: fine-tune on a downstream task; writes results.json in the workdir.

  bertjax finetune --config configs/finetune.py:sst2 --workdir runs/sst2 --config.init_from=runs/tiny
  bertjax finetune --config configs/finetune.py:conll2003 --workdir runs/ner --config.finetune.regime=features

init_from: a pretraining workdir, WORKDIR:STEP for a kept step, or a HuggingFace BERT directory."""


def finetune(argv):
    config, flag_values, _, _ = _parse_config_flags("finetune", argv, None, _define_workdir, FINETUNE_DOC)
    from bertjax.train import finetune as finetune_lib

    finetune_lib.train_and_evaluate(config, _require_workdir("finetune", flag_values))


def predict(argv):
    parser = _ArgumentParser(
        prog="bertjax predict",
        description="Predict with a fine-tuned workdir: one input per line (tab between the texts of a pair; "
        "for QA, question TAB passage; for question generation, answer TAB passage); writes the label, the tags, "
        "the answer or the question per line.",
    )
    parser.add_argument("--workdir", required=True, help="A fine-tuning workdir (holds config.json and checkpoints).")
    parser.add_argument("--input", default="-", help="Input file; '-' (the default) reads stdin.")
    parser.add_argument("--output", default="-", help="Output file; '-' (the default) writes stdout.")
    parser.add_argument("--seed", type=int, default=None, help="Use this fine-tuning seed's parameters (default: the seed with the best dev score).")
    args = parser.parse_args(argv)
    workdir, source = _existing(args.workdir, "--workdir"), _existing(args.input, "--input")
    from bertjax.train import finetune as finetune_lib

    with contextlib.ExitStack() as files:  # closes the files opened here, never stdin or stdout
        lines = sys.stdin.buffer if source == "-" else files.enter_context(open(source, "rb"))
        out = sys.stdout if args.output == "-" else files.enter_context(open(_path(args.output), "w", encoding="utf-8"))
        for prediction in finetune_lib.predict(workdir, _text_lines(lines, "stdin" if source == "-" else source), seed=args.seed):
            out.write(prediction + "\n")


def _text_lines(lines, name: str):
    """Lines of UTF-8 text (BOM and line ends dropped); a line that is not UTF-8 is an error naming it."""
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise errors.UserError(f"--input {name}:{number}: not UTF-8 (byte {line[error.start]:#04x} at column {error.start + 1}); re-save the file as UTF-8") from None
        yield text.rstrip("\r\n")


DATA_DOC = """bertjax data stats|show|prepare: inspect the pretraining batches a config produces, or prepare them, before training.

  bertjax data stats --config configs/pretrain.py:tiny --batches 50    # one JSON line of statistics
  bertjax data show  --config configs/pretrain.py:tiny --examples 3    # decoded examples, masks marked
  bertjax data prepare --config configs/pretrain.py:tiny [--shard I/N] # tokenize and store (I/N: every N-th file from the I-th)"""


def data(argv):
    if argv[:1] in ([], ["-h"], ["--help"]):
        print(DATA_DOC)
        return
    if argv[0] not in ("stats", "show", "prepare"):
        raise UsageError(f"choose 'stats', 'show' or 'prepare', not {argv[0]!r} (see bertjax data --help)")
    action, rest = argv[0], argv[1:]

    def define(flag_values):
        flags.DEFINE_integer("batches", 20, "stats: how many batches to read.", flag_values=flag_values)
        flags.DEFINE_integer("examples", 3, "show: how many examples to print.", flag_values=flag_values)
        flags.DEFINE_string("split", "train", "train or eval.", flag_values=flag_values)
        flags.DEFINE_string("shard", "", "prepare: I/N prepares only every N-th file from the I-th (one of N hosts).", flag_values=flag_values)

    config, flag_values, _, _ = _parse_config_flags(f"data {action}", rest, config_lib.DEFAULT_PRETRAIN_CONFIG, define, DATA_DOC)
    from bertjax.data import inspect as inspect_lib

    if action == "stats":
        import json

        print(json.dumps(inspect_lib.stats(config, flag_values.split, flag_values.batches)))
    elif action == "prepare":
        import json

        from bertjax.data import loader

        print(json.dumps(loader.prepare(config, loader.parse_shard(flag_values.shard))))
    else:
        print(inspect_lib.show(config, flag_values.split, flag_values.examples))


def tokenizer(argv):
    parser = _ArgumentParser(prog="bertjax tokenizer", description="Train a tokenizer (sentencepiece or WordPiece) with BERT's special tokens.")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="Train a unigram or BPE model (byte fallback) or a WordPiece vocab.txt, with [PAD] [UNK] [CLS] [SEP] [MASK].")
    train.add_argument("--input", nargs="+", required=True, help="Text files (UTF-8; other bytes are replaced and counted).")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="Directory for tokenizer.model and tokenizer.vocab (wordpiece: vocab.txt).")
    train.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "wordpiece"))
    args = parser.parse_args(argv)
    from bertjax.data import tokenizer as tokenizer_lib

    inputs = [_existing(path, "--input") for path in args.input]
    path = tokenizer_lib.train(inputs, args.vocab_size, _path(args.out), model_type=args.model_type)
    print(path)


def convert(argv):
    parser = _ArgumentParser(
        prog="bertjax convert",
        description="Convert between a HuggingFace BERT, BART or mBART directory (config.json + model.safetensors) and a bertjax "
        "checkpoint. The direction follows from what --from holds: a HuggingFace directory becomes a bertjax "
        "workdir; a bertjax workdir (or WORKDIR:STEP) becomes a HuggingFace directory.",
    )
    parser.add_argument("--from", dest="source", required=True, help="HF directory, bertjax workdir, or WORKDIR:STEP.")
    parser.add_argument("--to", dest="target", required=True, help="Output directory (must not exist or be empty).")
    args = parser.parse_args(argv)
    from bertjax import checkpoint_io

    path, step = config_lib.split_step(args.source)
    source = _existing(path, "--from") + ("" if step is None else f":{step}")
    print(checkpoint_io.convert(source, _path(args.target)))


def generate(argv):
    parser = _ArgumentParser(
        prog="bertjax generate",
        description="Generate with a seq2seq model (a configs/seq2seq.py run or a HuggingFace BART directory): "
        "one input per line on stdin, one output per line on stdout; greedy, or beam search with --num-beams.",
    )
    parser.add_argument("--workdir", required=True, help="A seq2seq workdir, WORKDIR:STEP, or a HuggingFace BART directory.")
    parser.add_argument("--num-beams", type=int, default=1, help="1: greedy; more: beam search (HF's rules).")
    parser.add_argument("--max-length", type=int, default=64, help="Most target tokens, the decoder start token included (HF's max_length).")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="Beam scores are sum(log p) / length ** this (HF's).")
    parser.add_argument("--batch-size", type=int, default=32, help="Lines generated together.")
    args = parser.parse_args(argv)
    path, step = config_lib.split_step(args.workdir)
    workdir = _existing(path, "--workdir") + ("" if step is None else f":{step}")
    from bertjax.models import generate as generate_lib

    outputs = generate_lib.run(
        workdir,
        _text_lines(sys.stdin.buffer, "stdin"),
        num_beams=args.num_beams,
        max_length=args.max_length,
        length_penalty=args.length_penalty,
        batch_size=args.batch_size,
    )
    for output in outputs:
        print(output, flush=True)


SWEEP_DOC = """bertjax sweep: run every arm of an ablation, resume unfinished ones, collect a table and plots.

  bertjax sweep --config configs/ablations/sentence_objective.py --workdir runs/sop
  bertjax sweep --config configs/ablations/masking_rate.py --workdir runs/mask --config.train.total_steps=50
  bertjax sweep --config configs/ablations/masking_rate.py --workdir runs/mask --print-commands
  bertjax sweep collect runs/sop

--config.KEY=VALUE applies to every arm; an arm's own settings win for the keys it names."""


def sweep(argv):
    from bertjax import sweep as sweep_lib

    if argv and argv[0] == "collect":
        if len(argv) == 2 and argv[1] in ("-h", "--help", "-help", "--helpfull"):
            print(f"{SWEEP_DOC}\n\nbertjax sweep collect WORKDIR: write results.csv, results.md, comparisons.csv and plots for the arms under WORKDIR; print the table.")
            return
        if len(argv) != 2:
            raise UsageError("usage: bertjax sweep collect WORKDIR")
        print(sweep_lib.collect(_existing(argv[1], "sweep collect")))
        return

    def define(flag_values):
        _define_workdir(flag_values)
        flags.DEFINE_bool("print_commands", False, "Print one command per arm (for a cluster scheduler) instead of running.", flag_values=flag_values)

    argv = ["--print_commands" if a == "--print-commands" else a for a in argv]
    config, flag_values, overrides, spec = _parse_config_flags("sweep", argv, None, define, SWEEP_DOC)
    sweep_lib.run(spec, config, _require_workdir("sweep", flag_values), overrides, print_commands=flag_values.print_commands)


def plot(argv):
    parser = _ArgumentParser(prog="bertjax plot", description="Draw the loss and metric curves of a run (metrics.jsonl) to PNG.")
    parser.add_argument("workdir")
    args = parser.parse_args(argv)
    from bertjax import sweep as sweep_lib

    print(sweep_lib.plot_run(_existing(args.workdir, "plot")))


EMBRYOLOGY_CONFIG = str(config_lib.REPO_ROOT / "configs" / "embryology.py")
EMBRYOLOGY_DOC = """bertjax embryology: probe every kept checkpoint of one or more pretraining runs (Chiang et al., 2020).

  bertjax embryology --workdir runs/mini                                # -> runs/mini/embryology
  bertjax embryology --workdir runs/a,runs/b --out runs/cmp             # several runs, overlaid
  bertjax embryology --workdir runs/mini:100,runs/mini:1000 --out DIR   # chosen steps; HF directories too
  bertjax embryology --workdir runs/mini --watch                        # follow a run while it trains

Writes OUT/embryology.csv, OUT/embryology.md and PNG plots; results are cached per (run, step,
measure) in OUT/cache, so a re-run computes only what is missing. Measures and sizes: configs/embryology.py."""


def embryology(argv):
    def define(flag_values):
        flags.DEFINE_string("workdir", None, "Comma-separated sources: WORKDIR (every kept checkpoint + step 0), WORKDIR:STEP, HF_DIR.", flag_values=flag_values)
        flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/embryology for a single workdir).", flag_values=flag_values)
        flags.DEFINE_bool("watch", False, "Keep polling for new checkpoints until the run has finished.", flag_values=flag_values)

    config, flag_values, _, _ = _parse_config_flags("embryology", argv, EMBRYOLOGY_CONFIG, define, EMBRYOLOGY_DOC)
    sources = [source.strip() for source in (flag_values.workdir or "").split(",") if source.strip()]
    if not sources:
        raise UsageError("--workdir is required (see bertjax embryology --help)")
    sources = [config_lib.resolve_path("init_from", source) for source in sources]
    if flag_values.out:
        out = _path(flag_values.out)
    elif len(sources) == 1 and not sources[0].rpartition(":")[2].isdigit():
        out = os.path.join(sources[0], "embryology")
    else:
        raise UsageError("--out is required when studying several sources (see bertjax embryology --help)")
    from bertjax.embryology import study

    print(study.run(config, sources, out, watch=flag_values.watch))


VERBS = {
    "pretrain": pretrain,
    "finetune": finetune,
    "predict": predict,
    "generate": generate,
    "data": data,
    "tokenizer": tokenizer,
    "convert": convert,
    "sweep": sweep,
    "plot": plot,
    "embryology": embryology,
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
    # Before JAX starts its threads: XLA:CPU's per-step temporaries then stay in the process (host_memory).
    host_memory.keep()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Orbax reports every phase of every save at INFO through absl; our own progress lines say enough.
    logging.getLogger("absl").setLevel(logging.WARNING)
    # JAX says at INFO that it found no TPU on every machine without one.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        status = verb(argv[1:])
    except errors.UserError as error:
        if verbose:
            raise
        print(f"bertjax {argv[0]}: {_one_line(error)}", file=sys.stderr)
        return errors.EXIT_USAGE if isinstance(error, UsageError) else errors.EXIT_ERROR
    except KeyboardInterrupt:
        print(f"bertjax {argv[0]}: interrupted", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
