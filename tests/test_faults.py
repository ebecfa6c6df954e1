"""Real faults, as users meet them: relative paths, two processes on one workdir, a stale lock left by
kill -9, a read-only workdir, a damaged checkpoint and a full disk. Each ends in a counted repair or a
one-line error, and none damages a run silently."""

import errno
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import pytest
from flax import linen as nn

from bertjax import checkpoint_io, cli, models
from bertjax import config as config_lib
from bertjax.data import tasks
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import UserError
from bertjax.train import finetune, pretrain
from bertjax.train import state as state_lib
from bertjax.train import workdir as workdir_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_pretrain_config(shared_data, **train):
    config = config_lib.pretrain_config("tiny")
    config.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=1000)
    config.data.update(corpus=str(shared_data / "corpus" / "moby-dick.txt"), max_seq_length=32, max_predictions=5, sentence_objective="sop")
    config.train.update(batch_size=8, total_steps=9, log_every=1, eval_batches=0, progress=False)
    config.train.update(train)
    config.optim.update(warmup_steps=2, lr=3e-3)
    config.checkpoint.update(every=3, keep=2)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config


def logged(workdir):
    return {record["step"]: record for record in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


# --------------------------------------------------------------------------------------------- the workdir lock


@pytest.fixture
def holder(tmp_path):
    """Another process (a real one) that holds tmp_path/run's lock until it is killed."""
    workdir = tmp_path / "run"
    code = "import sys, time\nfrom bertjax.train import workdir\nwith workdir.lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n"
    process = subprocess.Popen([sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert process.stdout.readline().strip() == "locked"
    yield workdir, process
    process.kill()
    process.wait()


def test_a_second_process_on_a_workdir_is_refused_and_writes_nothing(shared_data, holder, capsys):
    workdir, process = holder
    expected = f"workdir {workdir} is in use by process {process.pid} on host {socket.gethostname()} (started "
    # pretrain, through the CLI: one line, exit status 1.
    assert cli.main(["pretrain", "--workdir", str(workdir), f"--config.data.corpus={shared_data / 'corpus' / 'moby-dick.txt'}"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"bertjax pretrain: {expected}") and line.endswith(f"; lock file {workdir / '.lock'}: wait for that run to end, or choose another --workdir")
    # finetune too.
    config = config_lib.load("configs/finetune.py:sst2")
    config.data.update(train=str(shared_data / "glue/SST-2/dev.tsv"), dev=str(shared_data / "glue/SST-2/dev.tsv"))
    with pytest.raises(workdir_lib.WorkdirInUseError, match=expected.replace("(", r"\(")):
        finetune.train_and_evaluate(config, workdir)
    # Nothing written: no metrics rows, no checkpoint, no tokenizer, no config.
    assert sorted(os.listdir(workdir)) == [".lock"]
    assert json.loads((workdir / ".lock").read_text())["pid"] == process.pid


def test_a_lock_left_by_a_killed_process_is_taken_over(holder, caplog):
    workdir, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads((workdir / ".lock").read_text())["pid"] == process.pid  # stale information
    with workdir_lib.lock(workdir) as locked:
        assert locked == workdir
        assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()
    assert f"{workdir / '.lock'}: taking over the stale lock of process {process.pid} on host {socket.gethostname()}" in caplog.text
    assert (workdir / ".lock").read_text() == ""  # released cleanly: nothing stale left for the next run


def test_a_read_only_workdir_is_one_line_at_start(shared_data, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "readonly"
    workdir.mkdir()
    real_open = os.open

    def read_only_filesystem(path, *args, **kwargs):
        if pathlib.Path(path).parent == workdir:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_filesystem)  # tests run as root, whom chmod does not stop
    assert cli.main(["pretrain", "--workdir", str(workdir), f"--config.data.corpus={shared_data / 'corpus' / 'moby-dick.txt'}"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"bertjax pretrain: workdir {workdir} is not writable (Read-only file system): choose another --workdir or fix its permissions"
    )
    assert os.listdir(workdir) == []


# --------------------------------------------------------------------------------------------- damaged checkpoints, full disks


def test_a_damaged_checkpoint_is_named_set_aside_and_the_run_continues_exactly_from_the_last_verified(
    shared_data, tmp_path, monkeypatch, caplog, capsys
):
    """A real run (relative workdir) saves steps 3 and 6; 4 KB of a params file of step 6 are flipped.
    Loading step 6 is a one-line error; the resumed run names the file, sets step 6 aside and continues
    from step 3 with the same losses bit for bit. Its final save then meets a full disk: a one-line
    error naming the last complete step, and no step 9 that looks complete."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    first = pretrain.train_and_evaluate(tiny_pretrain_config(shared_data, run_steps=6), "W")
    workdir = tmp_path / "W"
    assert first["step"] == 6 and sorted(os.listdir(workdir / "checkpoints")) == ["3", "6", "index.json"]
    before = logged(workdir)

    damaged = max((p for p in (workdir / "checkpoints" / "6" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(damaged.read_bytes())
    start = max(0, len(data) // 2 - 2048)
    data[start : start + 4096] = bytes(byte ^ 0xFF for byte in data[start : start + 4096])
    damaged.write_bytes(bytes(data))

    assert cli.main(["convert", "--from", "W:6", "--to", "hf"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"bertjax convert: {damaged}: checksum mismatch: checkpoint step 6 is damaged, not loaded"
    assert not (tmp_path / "hf").exists()

    save_json = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_9(self, item, directory):
        if isinstance(item, dict) and item.get("step") == 9:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await save_json(self, item, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full_at_step_9)
    with pytest.raises(
        UserError,
        match=rf"^disk full: no space left on device while saving checkpoint step 9 in {workdir / 'checkpoints'}; the last complete checkpoint is step 6: ",
    ):
        pretrain.train_and_evaluate(tiny_pretrain_config(shared_data), "W")
    assert f"{damaged}: checksum mismatch: checkpoint step 6 is damaged, not loaded; trying the previous checkpoint" in caplog.text
    assert f"{workdir / 'checkpoints'}: resuming from step 3, the newest that verifies" in caplog.text
    assert f"resumed from {workdir / 'checkpoints'} step 3" in caplog.text
    assert os.listdir(workdir / "checkpoints_set_aside") == ["6"]
    after = logged(workdir)
    assert sorted(after) == list(range(1, 10))
    for step in (4, 5, 6):  # recomputed from step 3: the same numbers, bit for bit
        assert after[step]["loss"] == before[step]["loss"] and after[step]["grad_norm"] == before[step]["grad_norm"]
    # The failed save left nothing that looks complete; step 6 (saved again, verified) is the newest.
    assert [entry["step"] for entry in checkpoint_io.index("W")] == [3, 6]
    assert checkpoint_io.verify(workdir / "checkpoints", 6) is True


# --------------------------------------------------------------------------------------------- relative paths in fine-tuning


def test_finetune_from_a_relative_init_from_and_predict_with_a_relative_workdir(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lines = (shared_data / "glue/SST-2/train.tsv").read_text(encoding="utf-8").splitlines()[1:3000]
    tok = tokenizer_lib.load(tokenizer_lib.train_from_sentences(lines, 600, pathlib.Path("runs/pt/tokenizer")))
    config = config_lib.pretrain_config("tiny")
    config.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=tok.vocab_size)
    model = models.BertForPreTraining(models.BertConfig.from_config(config.model))
    checkpoint_io.save_params("runs/pt", config, nn.meta.unbox(model.init(jax.random.key(0), *state_lib.example_inputs(1, 16))["params"]))
    train = shared_data / "glue/SST-2/dev.tsv"
    status = cli.main(
        [
            "finetune",
            "--config",
            "configs/finetune.py:sst2",
            "--workdir",
            "runs/ft",
            "--config.init_from=runs/pt:0",
            f"--config.data.train={train}",
            f"--config.data.dev={train}",
            "--config.data.max_train_examples=64",
            "--config.data.max_dev_examples=32",
            "--config.data.max_seq_length=32",
            "--config.train.batch_size=16",
            "--config.train.eval_batch_size=32",
            "--config.train.epochs=0",
            "--config.train.total_steps=4",
            "--config.train.eval_every=4",
            "--config.train.progress=False",
        ]
    )
    assert status == 0, capsys.readouterr().err[-2000:]
    assert json.loads((tmp_path / "runs/ft/results.json").read_text())["init_from"].endswith("runs/pt:0")
    pathlib.Path("input.txt").write_text("a wonderful , moving film .\nterrible , boring and dull .\n")
    assert cli.main(["predict", "--workdir", "runs/ft", "--input", "input.txt", "--output", "out.txt"]) == 0
    predictions = pathlib.Path("out.txt").read_text().splitlines()
    labels = {example.label for example in tasks.read_tsv(train, "text", None, "label")}
    assert len(predictions) == 2 and set(predictions) <= labels
