"""The CLI's flag handling: help, config overrides, clear errors for bad flags (no traceback), and paths as users type them."""

import pytest

from bertjax import cli
from bertjax import errors


def run_cli(argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


def failure(argv, capsys) -> tuple[int, str]:
    """(exit status, the one line on stderr) of a CLI call that fails before any work."""
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return code, err


def test_help_lists_verbs_and_a_verb_lists_its_flags(capsys):
    assert cli.main(["--help"]) == 0
    assert "bertjax pretrain" in capsys.readouterr().out
    assert run_cli(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--workdir" in out


def test_unknown_verb_is_refused(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown verb 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.model.num_lyers=3", "--config.model.num_lyers=3: config.model has no key 'num_lyers'; did you mean model.num_layers, model.num_heads?"),
        ("--config.model.num_layers=abc", "--config.model.num_layers=abc"),
        ("--config.model.num_heads=3", "config.model.hidden_size=128: must be divisible by model.num_heads=3"),
        ("--config.model.position_embedding=rotary", "config.model.position_embedding='rotary'"),
        ("--config.data.masking.mask=0.5", "must sum to 1"),
        ("--config.data.max_predictions=500", "config.data.max_predictions=500: larger than data.max_seq_length=128"),
    ],
)
def test_bad_overrides_name_the_key_and_value(flag, message, capsys):
    code, err = failure(["pretrain", "--workdir", "unused", flag], capsys)
    assert code == 1 and err.startswith("bertjax pretrain: ") and message in err, err


def test_unknown_keys_are_named_with_the_nearest_ones(capsys):
    assert failure(["pretrain", "--workdir", "unused", "--config.data.corpuss=x"], capsys) == (
        1,
        "bertjax pretrain: --config.data.corpuss=x: config.data has no key 'corpuss'; did you mean data.corpus, data.eval_corpus, data.corpus_format?",
    )
    code, err = failure(["pretrain", "--workdir", "unused", "--config.nothing.x=1"], capsys)
    assert code == 1 and err.startswith("bertjax pretrain: --config.nothing.x=1: the config has no key 'nothing'; the config has ['checkpoint', 'data',")


def test_usage_errors_exit_2_on_one_line(capsys):
    assert failure(["pretrain", "--worklir=x"], capsys) == (2, "bertjax pretrain: Unknown command line flag 'worklir'. Did you mean: workdir ? (see bertjax pretrain --help)")
    assert failure(["pretrain", "stray"], capsys) == (2, "bertjax pretrain: unexpected arguments ['stray'] (see bertjax pretrain --help)")
    assert failure(["pretrain"], capsys) == (2, "bertjax pretrain: --workdir is required (see bertjax pretrain --help)")
    assert failure(["predict"], capsys) == (2, "bertjax predict: the following arguments are required: --workdir (see bertjax predict --help)")
    assert failure(["convert", "--from", "x", "--sideways"], capsys)[0] == 2
    assert failure(["sweep", "collect"], capsys) == (2, "bertjax sweep: usage: bertjax sweep collect WORKDIR")
    assert cli.main(["sweep", "collect", "--help"]) == 0 and "sweep collect WORKDIR: write results.csv" in capsys.readouterr().out
    assert failure(["data", "plot"], capsys) == (2, "bertjax data: choose 'stats', 'show' or 'prepare', not 'plot' (see bertjax data --help)")


def test_missing_config_file_and_missing_config_are_named(capsys):
    code, err = failure(["pretrain", "--config", "no/such.py:tiny"], capsys)
    assert code == 1 and err.startswith("bertjax pretrain: config file 'no/such.py' does not exist (here or under")
    assert failure(["finetune", "--workdir", "unused"], capsys) == (2, "bertjax finetune: --config is required (see bertjax finetune --help)")


def test_every_path_a_user_gives_is_made_absolute_once(tmp_path, monkeypatch):
    """Config keys that are paths resolve against the working directory; names (tfds:, python-docs) do not."""
    here = tmp_path / "here"
    for directory in (here / "runs/old", tmp_path / "pt"):
        directory.mkdir(parents=True)
    monkeypatch.chdir(here)
    monkeypatch.setenv("BERTJAX_SHARED_DATA", "shared")
    seen = {}
    monkeypatch.setattr(cli, "_parse_config_flags", _spy(cli._parse_config_flags, seen))
    from bertjax.train import finetune as finetune_lib
    from bertjax.train import pretrain as pretrain_lib

    # Like the real one, pretraining returns its summary (the CLI reads `stopped_by` from it).
    monkeypatch.setattr(pretrain_lib, "train_and_evaluate", lambda config, workdir: seen.update(workdir=workdir) or {"step": 0})
    monkeypatch.setattr(finetune_lib, "train_and_evaluate", lambda config, workdir: seen.update(workdir=workdir))
    argv = ["pretrain", "--workdir", "runs/pt", "--config.data.corpus=books/*.txt, more.txt", "--config.init_from=runs/old:600"]
    assert cli.main(argv + ["--config.data.tokenizer=tok/sp.model", "--config.data.eval_corpus=tfds:wiki40b"]) == 0
    config = seen["config"]
    assert seen["workdir"] == str(here / "runs/pt")
    assert config.data.corpus == f"{here}/books/*.txt,{here}/more.txt"
    assert config.init_from == f"{here}/runs/old:600" and config.data.tokenizer == f"{here}/tok/sp.model"
    assert config.data.eval_corpus == "tfds:wiki40b" and config.data.data_dir == "", "names and unset paths stay as they are"
    assert cli.main(["finetune", "--config", "configs/finetune.py:mnli", "--workdir", "ft", "--config.init_from=../pt", "--config.data.train=my.tsv"]) == 0
    config = seen["config"]
    assert config.init_from == str(tmp_path / "pt") and config.data.train == f"{here}/my.tsv"
    assert config.data.dev == str(here / "data/glue/MNLI/dev_matched.tsv"), "a config file's relative default resolves here too"
    assert config.data.other_dev.mismatched == str(here / "data/glue/MNLI/dev_mismatched.tsv")


def _spy(function, seen):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        seen["config"] = result[0]
        return result

    return wrapper


def test_predict_and_convert_resolve_their_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/x").mkdir(parents=True)
    (tmp_path / "in.txt").write_bytes(b"\xef\xbb\xbfa fine film\r\nbad\r\n")
    calls = []
    from bertjax import checkpoint_io
    from bertjax.train import finetune as finetune_lib

    monkeypatch.setattr(finetune_lib, "predict", lambda workdir, lines, seed=None: (calls.append((workdir, list(lines))), ["1", "0"])[1])
    monkeypatch.setattr(checkpoint_io, "convert", lambda source, target: calls.append((source, target)) or target)
    assert cli.main(["predict", "--workdir", "runs/x", "--input", "in.txt", "--output", "out.txt"]) == 0
    assert calls[-1] == (str(tmp_path / "runs/x"), ["a fine film", "bad"]), "BOM and CRLF are dropped"
    assert (tmp_path / "out.txt").read_text() == "1\n0\n"
    assert cli.main(["convert", "--from", "runs/x:600", "--to", "hf"]) == 0
    assert calls[-1] == (f"{tmp_path}/runs/x:600", str(tmp_path / "hf"))
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    assert failure(["predict", "--workdir", "runs/x", "--input", "latin1.txt"], capsys) == (
        1,
        f"bertjax predict: --input {tmp_path}/latin1.txt:2: not UTF-8 (byte 0xe9 at column 4); re-save the file as UTF-8",
    )


def test_config_paths_resolve_from_outside_the_clone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["pretrain", "--config", "configs/pretrain.py:mini", "--help"]) == 0


def test_verbose_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.MissingInputError, match="sweep collect nowhere: no such file or directory"):
        cli.main(["--verbose", "sweep", "collect", "nowhere"])
    monkeypatch.setenv("BERTJAX_VERBOSE", "1")
    with pytest.raises(cli.UsageError, match="--workdir is required"):
        cli.main(["pretrain"])
