"""What a run reports: config.json, metrics.jsonl, TensorBoard events and a progress bar.

Only process 0 writes (the others get a writer that does nothing), so a multi-host run leaves one
set of files. metrics.jsonl holds one JSON object per logged step; a resumed run first drops the
lines past the step it resumed from, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
from tqdm import tqdm

from bertjax import config as config_lib

# Dense bf16 matmul peak per device in FLOP/s, by `device_kind` prefix, for MFU.
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 70e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops_per_device(device=None, override_tflops: float = 0.0) -> float | None:
    """The device's peak FLOP/s (None where unknown, e.g. a CPU, unless `override_tflops` is given)."""
    if override_tflops:
        return override_tflops * 1e12
    device = device or jax.devices()[0]
    for prefix, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(prefix):
            return flops
    return None


def read_jsonl(path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Writer:
    """config.json, metrics.jsonl and TensorBoard events in the workdir (process 0 only)."""

    def __init__(self, workdir, config, resumed_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = pathlib.Path(workdir)
        self.metrics_path = self.workdir / "metrics.jsonl"
        self.tensorboard = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.json").write_text(config_lib.to_json(config) + "\n")
        kept = [record for record in read_jsonl(self.metrics_path) if record["step"] <= resumed_step]
        self.metrics_path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{key: _plain(value) for key, value in values.items()}}
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _plain(value):
    """Plain Python values for JSON (device scalars and numpy numbers become floats)."""
    if value is None:
        return None
    return float(value) if not isinstance(value, (int, str)) else value


class Throughput:
    """Tokens per second and MFU over the steps since the last call."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops_total: float | None):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self.start = time.perf_counter()

    def restart(self) -> None:
        """Exclude what is not training (evaluation, checkpoints, compilation) from the next rate."""
        self.start = time.perf_counter()

    def measure(self, steps: int) -> dict:
        now = time.perf_counter()
        tokens_per_second = self.tokens_per_step * steps / max(now - self.start, 1e-9)
        self.start = now
        mfu = tokens_per_second * self.flops_per_token / self.peak_flops_total if self.peak_flops_total else None
        return {"tokens_per_second": tokens_per_second, "mfu": mfu}


class Progress:
    """A tqdm bar over the training steps (time left is tqdm's) showing the latest metrics."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", disable=not enabled, dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def show(self, values: dict) -> None:
        shown = {
            "loss": f"{values['loss']:.3f}",
            "lr": f"{values['learning_rate']:.2e}",
        }
        if values.get("tokens_per_second") is not None:
            shown["tok/s"] = f"{values['tokens_per_second']:.0f}"
        if values.get("mfu") is not None:
            shown["mfu"] = f"{100 * values['mfu']:.1f}%"
        self.bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        self.bar.close()
