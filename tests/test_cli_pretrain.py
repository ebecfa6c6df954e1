"""`bertjax pretrain` as a user runs it (a subprocess): on real text the MLM loss falls; kill -9
then the same command resumes from the last complete checkpoint; SIGTERM saves a checkpoint and exits with
143 (not 0: `pretrain && finetune` must not go on as if training had finished)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """One device (fast compiles) and a shared compilation cache: the resumed run reuses the program."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def command(shared_data, workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "bertjax",
        "pretrain",
        f"--workdir={workdir}",
        f"--config.data.corpus={shared_data / 'corpus' / 'moby-dick.txt'}",
        "--config.model.num_layers=1",
        "--config.model.hidden_size=64",
        "--config.model.num_heads=2",
        "--config.model.intermediate_size=128",
        "--config.model.vocab_size=1000",
        "--config.data.max_seq_length=64",
        "--config.data.max_predictions=10",
        "--config.train.batch_size=16",
        "--config.train.progress=False",
        "--config.optim.warmup_steps=10",
        *overrides,
    ]


def records(workdir):
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def complete_steps(workdir):
    directory = workdir / "checkpoints"
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit()) if directory.exists() else []


def wait_for(condition, process, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early: {process.communicate()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_pretrain_on_real_text_lowers_the_mlm_loss(shared_data, tmp_path, environment):
    run = subprocess.run(
        command(shared_data, tmp_path, "--config.train.total_steps=40", "--config.train.log_every=10", "--config.train.eval_every=20", "--config.train.eval_batches=2"),
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pretrain done: step=40" in run.stdout
    logged = records(tmp_path)
    assert [record["step"] for record in logged] == [10, 20, 30, 40]
    assert logged[-1]["mlm_loss"] < logged[0]["mlm_loss"] - 0.5
    assert logged[-1]["eval/mlm_loss"] < logged[1]["eval/mlm_loss"]
    assert {"eval/mlm_accuracy", "eval/nsp_accuracy", "eval/sop_accuracy", "learning_rate", "tokens_per_second"} <= set(logged[-1])
    assert (tmp_path / "config.json").exists() and (tmp_path / "tokenizer").is_dir()
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))


def test_kill_9_then_the_same_command_resumes_from_a_complete_checkpoint(shared_data, tmp_path, environment):
    # A checkpoint every other step, written asynchronously: the kill lands during training or a save.
    args = command(shared_data, tmp_path, "--config.train.total_steps=40", "--config.train.log_every=1", "--config.train.eval_batches=0", "--config.checkpoint.every=2")
    process = subprocess.Popen(args, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: complete_steps(tmp_path) and complete_steps(tmp_path)[-1] >= 6, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    killed_at = records(tmp_path)[-1]["step"]
    assert killed_at < 40
    resumed = subprocess.run(args, env=environment, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_from = int(re.search(r"resumed from \S+ step (\d+)", resumed.stderr).group(1))
    assert 6 <= resumed_from <= killed_at
    assert "pretrain done: step=40" in resumed.stdout
    # One uninterrupted record per step: the lines the killed run wrote past the checkpoint were dropped.
    assert [record["step"] for record in records(tmp_path)] == list(range(1, 41))
    assert not [path.name for path in (tmp_path / "checkpoints").iterdir() if "tmp" in path.name]


def test_sigterm_saves_a_checkpoint_and_exits_143(shared_data, tmp_path, environment):
    args = command(shared_data, tmp_path, "--config.train.total_steps=100000", "--config.train.log_every=1", "--config.train.eval_batches=0", "--config.checkpoint.every=100000")
    process = subprocess.Popen(args, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(records(tmp_path)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "pretrain stopped" in stdout and "stopped_by=SIGTERM" in stdout
    assert "stopped by SIGTERM at step" in stderr and "run the same command to resume" in stderr
    saved = complete_steps(tmp_path)
    assert len(saved) == 1 and saved[0] >= 3
    assert saved[0] == records(tmp_path)[-1]["step"]
