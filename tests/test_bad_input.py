"""Bad input through the real CLI, as a user types it (relative paths): one line on stderr, the right exit status.

Every case fails before any training: reading a file, parsing a flag, or checking a workdir. Each row
is (argv, exit status, the words the line must hold); `{here}` stands for the working directory.
"""

import pytest

from bertjax import cli

SST2 = ["finetune", "--config", "configs/finetune.py:sst2", "--workdir", "ft"]

FAILING_SWEEP = """
from bertjax import config as config_lib
from bertjax.sweep import Arm


def get_config():
    config = config_lib.ablation_config("tiny")
    config.sweep.task = ""
    return config


def get_sweep():
    return [Arm("heads3", {"model.num_heads": 3}), Arm("heads5", {"model.num_heads": 5})]
"""

FILES = {
    "train.tsv": "sentence\tlabel\na fine film\t1\na bad film\t0\nthe best film of the year\t1\n",
    "dev.tsv": "sentence\tlabel\nan ok film\tmaybe\n",
    "text_label.tsv": "text\tlabel\na fine film\t1\n",
    "empty.tsv": "",
    "crlf.tsv": "sentence\r\nfine\r\n",
    "bad.conll": "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ O\n",
    "cut.json": '{"data": [{"paragraphs": [{"context": "Paris", "qas": [',
    "failing_sweep.py": FAILING_SWEEP,
    "notrun/placeholder.txt": "not a run\n",
}

CASES = {
    "finetune: a missing task file": (
        SST2 + ["--config.data.train=nothere.tsv"],
        1,
        ["task data file {here}/nothere.tsv does not exist (config data.train): give --config.data.train=PATH"],
    ),
    "finetune: a TSV without the configured column": (
        SST2 + ["--config.data.train=text_label.tsv", "--config.data.text_a=sentence"],
        1,
        ["{here}/text_label.tsv:1: no column 'sentence' (config data.text_a); the header line has ['text', 'label']"],
    ),
    "finetune: an empty file": (SST2 + ["--config.data.train=empty.tsv"], 1, ["{here}/empty.tsv is empty"]),
    "finetune: a binary file": (SST2 + ["--config.data.train=/bin/sh"], 1, ["/bin/sh is not a text file (a NUL byte at offset"]),
    "finetune: a row without the label column": (
        SST2 + ["--config.data.train=crlf.tsv", "--config.data.text_a=sentence"],
        1,
        ["{here}/crlf.tsv:1: no column 'label' (config data.label); the header line has ['sentence']"],
    ),
    "finetune: a CoNLL line with the wrong number of columns": (
        ["finetune", "--config", "configs/finetune.py:conll2003", "--workdir", "ft", "--config.data.train=bad.conll"],
        1,
        ["{here}/bad.conll:4: 3 columns ['rejects', 'VBZ', 'O'], but line 3 (the first word line) has 4"],
    ),
    "finetune: truncated SQuAD JSON": (
        ["finetune", "--config", "configs/finetune.py:xquad", "--workdir", "ft", "--config.data.train=cut.json"],
        1,
        ["{here}/cut.json:1:56: not valid JSON (Expecting value); is the file truncated?"],
    ),
    "finetune: a dev label unseen in train": (
        SST2 + ["--config.data.train=train.tsv", "--config.data.dev=dev.tsv", "--config.data.text_a=sentence", "--config.model.vocab_size=320", "--config.data.dev_split=0"],
        1,
        ["{here}/dev.tsv:2: label 'maybe' does not occur in the training data (data.train has ['0', '1'])"],
    ),
    "finetune: a config key that does not exist": (
        SST2 + ["--config.data.trian=train.tsv"],
        1,
        ["--config.data.trian=train.tsv: config.data has no key 'trian'; did you mean data.train"],
    ),
    "finetune: init_from that does not exist": (
        SST2 + ["--config.init_from=runs/none:600"],
        1,
        ["config.init_from={here}/runs/none:600: no such file or directory; give a pretraining workdir, WORKDIR:STEP or a HuggingFace directory"],
    ),
    "finetune: no --config": (["finetune", "--workdir", "ft"], 2, ["--config is required"]),
    "pretrain: a corpus glob that matches nothing": (
        ["pretrain", "--workdir", "pt", "--config.data.corpus=nowhere/*.txt"],
        1,
        ["config.data.corpus", "{here}/nowhere/*.txt", "matches no file"],
    ),
    "pretrain: an unknown flag": (["pretrain", "--workdir", "pt", "--steps=3"], 2, ["Unknown command line flag 'steps'"]),
    "data stats: a corpus glob that matches nothing": (
        ["data", "stats", "--config.data.corpus=nowhere/*.txt"],
        1,
        ["config.data.corpus", "{here}/nowhere/*.txt", "matches no file"],
    ),
    "sweep: every arm fails": (
        ["sweep", "--config", "failing_sweep.py", "--workdir", "sw"],
        1,
        ["2 of 2 arms failed: heads3: pretraining failed (exit 1), log {here}/sw/heads3/pretrain.log; heads5:", "{here}/sw/results.md"],
    ),
    "sweep collect: not a sweep": (["sweep", "collect", "notrun"], 1, ["no arms under {here}/notrun"]),
    "predict: a workdir that does not exist": (["predict", "--workdir", "runs/none"], 1, ["--workdir runs/none: no such file or directory ({here}/runs/none)"]),
    "predict: a directory that is not a fine-tuning run": (["predict", "--workdir", "notrun"], 1, ["{here}/notrun", "not a finished fine-tuning run"]),
    "convert: from a directory that does not exist": (["convert", "--from", "hf/none", "--to", "out"], 1, ["--from hf/none: no such file or directory"]),
    "convert: from a directory that is not a checkpoint": (["convert", "--from", "notrun", "--to", "out"], 1, ["{here}/notrun", "not a bertjax workdir"]),
    "convert: without --to": (["convert", "--from", "notrun"], 2, ["the following arguments are required: --to"]),
    "tokenizer: a missing input file": (
        ["tokenizer", "train", "--input", "none.txt", "--vocab-size", "400", "--out", "tok"],
        1,
        ["--input none.txt: no such file or directory ({here}/none.txt)"],
    ),
}


@pytest.fixture
def here(tmp_path, monkeypatch):
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_an_exit_status(case, here, capsys):
    argv, status, words = CASES[case]
    code = cli.main(argv)
    err = capsys.readouterr().err
    # Progress bars (tqdm redraws its line after a carriage return) are not messages.
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert code == status, (code, err)
    assert lines[0].startswith(f"bertjax {argv[0]}: "), lines[0]
    for word in words:
        assert word.format(here=here) in lines[0], lines[0]
