"""The CLI's flag handling: help, config overrides, and clear errors for bad flags (no traceback)."""

import pytest

from bertjax import cli


def run_cli(argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


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
        ("--config.model.num_lyers=3", 'Did you mean "num_layers"'),
        ("--config.model.num_layers=abc", "--config.model.num_layers=abc"),
        ("--config.model.num_heads=3", "config.model.hidden_size=128: must be divisible by model.num_heads=3"),
        ("--config.model.position_embedding=rotary", "config.model.position_embedding='rotary'"),
        ("--config.data.masking.mask=0.5", "must sum to 1"),
        ("--config.data.max_predictions=500", "config.data.max_predictions=500: larger than data.max_seq_length=128"),
    ],
)
def test_bad_overrides_name_the_key_and_value(flag, message):
    code = run_cli(["pretrain", "--workdir", "unused", flag])
    assert isinstance(code, str) and message in code, code


def test_missing_config_file_and_missing_config_are_named():
    assert "config file 'no/such.py' does not exist" in run_cli(["pretrain", "--config", "no/such.py:tiny"])
    assert "--config is required" in run_cli(["finetune", "--workdir", "unused"])


def test_config_paths_resolve_from_outside_the_clone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["pretrain", "--config", "configs/pretrain.py:mini", "--help"]) == 0
