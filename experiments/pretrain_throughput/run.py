"""Pretraining throughput: bertjax's train step against HuggingFace transformers' BertForPreTraining.

Both sides train the same architecture (vocabulary 30522, dropout 0.1, AdamW) on random batches of
the same shape on the same machine, one after the other; the script prints one JSON line per side
and the ratio. bertjax's step is the one `bertjax pretrain` runs (`pretrain.make_train_step`: MLM
logits only at the masked positions, gradient clipping, donated state); the peer computes MLM logits
at every position, as transformers does.

  python experiments/pretrain_throughput/run.py                                  # CPU: mini, seq 128, batch 32
  python experiments/pretrain_throughput/run.py --size base --batch 256 --dtype bfloat16 --attention cudnn --steps 30   # GPU

--peer names the peer script (default: ../shared/bench/peer_hf_torch.py beside the repository).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from bertjax import host_memory

if "--no-keep-memory" not in sys.argv:
    host_memory.keep()  # before numpy, JAX or torch start threads, as bertjax.cli.main does

import jax
import numpy as np

from bertjax import config as config_lib
from bertjax import models
from bertjax.train import metrics, optim, partitioning, pretrain
from bertjax.train import state as state_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PEER = REPO_ROOT.parent / "shared" / "bench" / "peer_hf_torch.py"


def benchmark_config(args):
    config = config_lib.pretrain_config(args.size)
    config.model.update(vocab_size=30522, dtype=args.dtype, attention_implementation=args.attention)
    config.data.update(max_seq_length=args.seq, max_predictions=args.predictions)
    config.train.update(batch_size=args.batch, total_steps=10_000)
    config.optim.update(lr=1e-4, warmup_steps=0)
    return config_lib.validate(config)


def random_batch(config, seed: int = 0) -> dict:
    """Full-length sequences; masked positions and labels drawn like the loader's (15%, capped at P)."""
    rng = np.random.default_rng(seed)
    batch_size, seq_len, predictions = config.train.batch_size, config.data.max_seq_length, config.data.max_predictions
    positions = np.sort(np.stack([rng.choice(seq_len, predictions, replace=False) for _ in range(batch_size)]), axis=1)
    return {
        "input_ids": rng.integers(5, config.model.vocab_size, (batch_size, seq_len), dtype=np.int32),
        "token_type_ids": np.zeros((batch_size, seq_len), np.int32),
        "attention_mask": np.ones((batch_size, seq_len), np.int32),
        "masked_positions": positions.astype(np.int32),
        "masked_ids": rng.integers(5, config.model.vocab_size, (batch_size, predictions), dtype=np.int32),
        "masked_weights": np.ones((batch_size, predictions), np.int32),
        "sentence_label": rng.integers(0, 2, batch_size, dtype=np.int32),
    }


def bertjax_throughput(config, steps: int, warmup: int, peak_tflops: float) -> dict:
    mesh = partitioning.make_mesh(config.mesh)
    rule_table = partitioning.rules(config.mesh)
    model_cfg = models.BertConfig.from_config(config.model)
    model = models.BertForPreTraining(model_cfg)
    seq_len = config.data.max_seq_length
    boxed = state_lib.abstract_params(model, seq_len)
    schedule = optim.learning_rate_schedule(config.optim, config.train.total_steps)
    tx = optim.create(config.optim, config.train.total_steps, boxed)
    state, spec = state_lib.create(model, tx, 0, seq_len, mesh, rule_table)
    batch = partitioning.global_batch(random_batch(config), mesh, rule_table)
    step = jax.jit(
        pretrain.make_train_step(model, tx, schedule, config),
        in_shardings=(spec.shardings, {key: value.sharding for key, value in batch.items()}),
        out_shardings=(spec.shardings, partitioning.replicated(mesh)),
        donate_argnums=0,
    )
    for _ in range(warmup):
        state, step_metrics = step(state, batch)
    jax.block_until_ready(step_metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, step_metrics = step(state, batch)
    loss = float(step_metrics["loss"])
    seconds = (time.perf_counter() - start) / steps
    tokens = config.train.batch_size * seq_len
    flops = models.flops_per_token(model_cfg, seq_len) * tokens / seconds
    peak = metrics.peak_flops_per_device(override_tflops=peak_tflops)
    return dict(
        peer="bertjax",
        size=config.model.size,
        seq=seq_len,
        batch=config.train.batch_size,
        device=jax.devices()[0].device_kind,
        dtype=config.model.dtype,
        params=models.count_params(boxed),
        step_ms=round(seconds * 1e3, 2),
        seq_per_s=round(config.train.batch_size / seconds, 1),
        tok_per_s=round(tokens / seconds),
        tflops=round(flops / 1e12, 3),
        mfu=round(flops / (peak * jax.device_count()), 4) if peak else None,
        loss=loss,
    )


def peer_throughput(args) -> list[dict]:
    device = "cpu" if jax.default_backend() == "cpu" else "cuda"
    command = [sys.executable, str(args.peer), "--size", args.size, "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps), "--device", device, "--compile", args.peer_compile]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mini", choices=sorted(config_lib.SIZES))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--predictions", type=int, default=20, help="masked positions per sequence (BERT: 20 at 128)")
    parser.add_argument(
        "--no-keep-memory", action="store_true",
        help="let glibc unmap XLA's freed temporaries between steps (by default bertjax's side runs with bertjax.host_memory.keep(), "
        "as the bertjax command does; the peer runs in a process of its own, as it ships)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=config_lib.DTYPES)
    parser.add_argument("--attention", default="xla", choices=config_lib.ATTENTION_IMPLEMENTATIONS)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per device, for MFU (0: known from the device kind)")
    parser.add_argument("--peer", type=pathlib.Path, default=PEER)
    parser.add_argument("--peer-compile", default="no", choices=("no", "yes", "both"))
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args(argv)
    ours = bertjax_throughput(benchmark_config(args), args.steps, args.warmup, args.peak_tflops)
    print(json.dumps(ours), flush=True)
    if args.skip_peer:
        return
    for peer in peer_throughput(args):
        print(json.dumps(peer), flush=True)
        print(json.dumps({"ratio_bertjax_over_peer": round(ours["seq_per_s"] / peer["seq_per_s"], 3), "peer_compile": peer["compile"]}), flush=True)


if __name__ == "__main__":
    main()
