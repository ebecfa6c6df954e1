"""Seq2seq training speed: bertjax's pretraining step vs HuggingFace BART's, steps per second, same shapes and batch.

    python experiments/seq2seq_train_speed/bench.py                      # tiny and small
    python experiments/seq2seq_train_speed/bench.py --sizes tiny --rounds 9

One full training step on each side: forward, backward and the AdamW update, dropout on (0.1 on the
hidden states and the attention probabilities, as configs/seq2seq.py and BART). bertjax runs the
trainer's own step (`bertjax.train.pretrain.jit_train_step`: jitted with its shardings, the state donated,
the loss of `loss_sums`, gradient clipping, the decay mask and the warm-up schedule of `optim.create`)
on the model and state `train_and_evaluate` builds from `configs/seq2seq.py:SIZE`. HuggingFace runs
`BartForConditionalGeneration` with the same config (`bertjax.convert.hf.bart_hf_config_from`: same
layers, widths, vocabulary, positions, dropout, LayerNorm epsilon), its loss from `labels`, then
`clip_grad_norm_`, `torch.optim.AdamW` (same lr, betas, eps, weight decay off for biases and LayerNorms)
and the same linear warm-up; eager PyTorch, as `transformers`' Trainer runs it by default.

The batch is the seq2seq batch contract of `bertjax.data.noising` at the config's batch size and
max_seq_length (32 x 128): random token ids, targets of full length for most rows (pretraining chunks
fill the sequence) and a shorter one every eighth row, sources at ~80% of their target's length (text
infilling at 30% shrinks the source); the same arrays on both sides, padding included.

Each side lives in a worker process of its own (`--same-process` puts both in this one, as the figures
before 2026-12-03 did: there the two frameworks' allocations and caches interfere, at the small model's
batch 32 by ~35% against bertjax). The two sides alternate: each round times `--steps` steps of one,
then of the other (which goes first alternates), so that both see the same background load; the median
per-step time over the rounds is kept, in wall seconds and in the side's own process CPU seconds.
The workers inherit this environment: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python .../bench.py` gives
both sides transparent huge pages (fewer page faults; no steady gain measured, see the README).
Compilation (bertjax) and one warm-up step (both) come before. Both sides get the same number
of CPU threads (`--threads`, 1 by default: the XLA flags this repository runs JAX with,
--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1, and torch.set_num_threads).
Prints one JSON line per size and a table; the ratio is bertjax steps/s over HF steps/s.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import numpy as np


def batch_arrays(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A seq2seq batch (noising.Noiser's contract) of random ids with realistic lengths."""
    batch, length = config.train.batch_size, config.data.max_seq_length
    pad, bos, eos, start = config.model.pad_token_id, config.model.bos_token_id, config.model.eos_token_id, config.model.decoder_start_token_id
    target_length = np.where(np.arange(batch) % 8 == 7, length // 2, length)
    source_length = np.maximum((0.8 * target_length).astype(int), 3)
    position = np.arange(length)[None, :]

    def framed(lengths):
        ids = rng.integers(5, config.model.vocab_size, (batch, length)).astype(np.int32)
        ids[:, 0] = bos
        ids[np.arange(batch), lengths - 1] = eos
        return np.where(position < lengths[:, None], ids, pad).astype(np.int32)

    labels = framed(target_length)
    label_weights = (position < target_length[:, None]).astype(np.int32)
    decoder_input_ids = np.concatenate([np.full((batch, 1), start, np.int32), labels[:, :-1]], axis=1)
    return dict(
        input_ids=framed(source_length),
        attention_mask=(position < source_length[:, None]).astype(np.int32),
        decoder_input_ids=np.where(label_weights == 1, decoder_input_ids, pad).astype(np.int32),
        decoder_attention_mask=label_weights,
        labels=labels,
        label_weights=label_weights,
    )


def bertjax_step(config, batch: dict):
    """A function that takes one training step of the trainer's own jitted step (compiled and warmed up)."""
    import jax

    from bertjax import models
    from bertjax.train import optim, partitioning, pretrain
    from bertjax.train import state as state_lib

    total_steps, seq_len = config.train.total_steps, config.data.max_seq_length
    mesh, rule_table = partitioning.make_mesh(config.mesh), partitioning.rules(config.mesh)
    model = models.Seq2Seq(models.Seq2SeqConfig.from_config(config.model))
    schedule = optim.learning_rate_schedule(config.optim, total_steps)
    tx = optim.create(config.optim, total_steps, state_lib.abstract_params(model, seq_len))
    state, state_spec = state_lib.create(model, tx, config.train.seed, seq_len, mesh, rule_table)
    train_step = pretrain.jit_train_step(model, tx, schedule, config, mesh, rule_table, state_spec)
    global_batch = partitioning.global_batch(batch, mesh, rule_table)
    holder = {"state": state}

    def step():
        holder["state"], metrics = train_step(holder["state"], global_batch)
        jax.block_until_ready(metrics)
        return float(metrics["loss"])

    start = time.perf_counter()
    step()
    return step, time.perf_counter() - start


def transformers_step(config, batch: dict):
    """A function that takes one eager PyTorch training step of BartForConditionalGeneration (warmed up)."""
    import torch
    import transformers

    from bertjax import models
    from bertjax.convert import hf

    torch.manual_seed(config.train.seed)
    hf_config = transformers.BartConfig(**hf.bart_hf_config_from(models.Seq2SeqConfig.from_config(config.model)))
    model = transformers.BartForConditionalGeneration(hf_config).train()
    optim_config = config.optim
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        (not_decayed if name.endswith("bias") or "layer_norm" in name or "layernorm" in name else decayed).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": optim_config.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}],
        lr=optim_config.lr, betas=(optim_config.b1, optim_config.b2), eps=optim_config.eps,
    )
    warmup, total = optim_config.warmup_steps, config.train.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: step / warmup if step < warmup else max(0.0, (total - step) / max(total - warmup, 1))
    )
    tensors = {key: torch.tensor(batch[key], dtype=torch.long) for key in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")}
    labels = torch.tensor(np.where(batch["label_weights"] == 1, batch["labels"], -100), dtype=torch.long)

    def step():
        loss = model(**tensors, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    start = time.perf_counter()
    step()
    return step, time.perf_counter() - start


def size_config(size: str, args):
    import importlib.util

    spec = importlib.util.spec_from_file_location("seq2seq_config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "seq2seq.py"))
    configs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(configs)
    config = configs.get_config(size)
    if args.batch:
        config.train.batch_size = args.batch
    if args.length:
        config.data.max_seq_length = args.length
    return config


def make_step(side: str, config, batch):
    return (bertjax_step if side == "bertjax" else transformers_step)(config, batch)


def timed(step, steps: int, warmup: int = 0) -> tuple[float, float, list[float], float]:
    """(wall s per step, this process's CPU s per step, losses, page faults per step) of `steps` steps,
    after `warmup` untimed ones."""
    import resource

    for _ in range(warmup):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = [step() for _ in range(steps)]
    wall, cpu = (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps
    return wall, cpu, losses, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps


def keeps_memory(side: str, args) -> bool:
    """Whether `side` runs with glibc keeping freed memory (bertjax.host_memory): bertjax's CLI does, HF does not."""
    return args.keep_memory == "both" or args.keep_memory == side


def worker(side: str, size: str, args, connection) -> None:
    """One side in a process of its own: build and warm up its step, then time `n` steps per request."""
    if keeps_memory(side, args):
        from bertjax import host_memory

        host_memory.keep()  # first, as bertjax.cli.main does: before any thread allocates
    set_threads(args)
    config = size_config(size, args)
    step, compile_s = make_step(side, config, batch_arrays(config, np.random.default_rng(0)))
    connection.send(compile_s)
    while (request := connection.recv()) is not None:
        steps, warmup = request
        connection.send(timed(step, steps, warmup))


def set_threads(args) -> None:
    threaded = "true" if args.threads > 1 else "false"
    os.environ["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen={threaded} intra_op_parallelism_threads={args.threads} {args.xla_flags}".strip()
    import torch

    torch.set_num_threads(args.threads)


class _Remote:
    """A side living in a worker process; calling it times `steps` steps there."""

    def __init__(self, side: str, size: str, args):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=worker, args=(side, size, args, child), daemon=True)
        self.process.start()
        self.compile_s = self.connection.recv()

    def __call__(self, steps: int, warmup: int):
        self.connection.send((steps, warmup))
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def measure(size: str, args) -> dict:
    config = size_config(size, args)
    sides, compile_s = {}, {}
    if args.same_process:
        batch = batch_arrays(config, np.random.default_rng(0))
        for side in ("bertjax", "transformers"):
            step, compile_s[side] = make_step(side, config, batch)
            sides[side] = functools.partial(timed, step)
    else:
        for side in ("bertjax", "transformers"):
            sides[side] = _Remote(side, size, args)
            compile_s[side] = sides[side].compile_s
    bertjax_compile_s = compile_s["bertjax"]
    times = {name: [] for name in sides}
    cpu_times = {name: [] for name in sides}
    losses = {name: [] for name in sides}
    faults = {name: [] for name in sides}
    for round_index in range(args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
        for name in order:
            wall, cpu, round_losses, round_faults = sides[name](args.steps, args.round_warmup)
            times[name].append(wall)
            cpu_times[name].append(cpu)
            losses[name].extend(round_losses)
            faults[name].append(round_faults)
    for side in sides.values():
        if isinstance(side, _Remote):
            side.close()
    row = {
        "size": size,
        "batch": config.train.batch_size,
        "source_length": config.data.max_seq_length,
        "target_length": config.data.max_seq_length,
        "bertjax_step_s": statistics.median(times["bertjax"]),
        "transformers_step_s": statistics.median(times["transformers"]),
        "bertjax_step_s_all": [round(t, 4) for t in times["bertjax"]],
        "transformers_step_s_all": [round(t, 4) for t in times["transformers"]],
        "bertjax_cpu_s": statistics.median(cpu_times["bertjax"]),
        "transformers_cpu_s": statistics.median(cpu_times["transformers"]),
        "bertjax_compile_s": round(bertjax_compile_s, 2),
        # Minor page faults per step (in --same-process mode both sides' together): the first touch of memory
        # the allocator has just mapped, paid in kernel time.
        "bertjax_page_faults_per_step": statistics.median(faults["bertjax"]),
        "transformers_page_faults_per_step": statistics.median(faults["transformers"]),
        "processes": "one" if args.same_process else "one per side",
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "keep_memory": args.keep_memory,
        "round_warmup": args.round_warmup,
        "bertjax_first_loss": losses["bertjax"][0],
        "transformers_first_loss": losses["transformers"][0],
    }
    row["ratio"] = row["transformers_step_s"] / row["bertjax_step_s"]
    row["cpu_ratio"] = row["transformers_cpu_s"] / row["bertjax_cpu_s"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median round is kept")
    parser.add_argument("--steps", type=int, default=2, help="steps per side per round")
    parser.add_argument(
        "--round-warmup", type=int, default=1,
        help="untimed steps each side takes at the start of its round, so that its timed steps follow a step as in "
        "training, not the other side's round (0: the figures before 2026-12-03 afternoon)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for each side")
    parser.add_argument("--batch", type=int, default=0, help="override config.train.batch_size")
    parser.add_argument("--length", type=int, default=0, help="override config.data.max_seq_length")
    parser.add_argument("--xla-flags", default="", help="more XLA flags for bertjax's side, e.g. --xla_cpu_use_xnnpack=true")
    parser.add_argument(
        "--same-process", action="store_true",
        help="run both sides in this process (the figures before 2026-12-03); by default each side has a worker process of its own",
    )
    parser.add_argument(
        "--keep-memory", default="bertjax", choices=["bertjax", "transformers", "both", "none"],
        help="which sides run with glibc keeping freed memory (bertjax.host_memory.keep, what `bertjax` itself does; "
        "default: bertjax only, each side as it ships). With --same-process, any choice but none applies to both",
    )
    args = parser.parse_args(argv)

    if args.same_process and args.keep_memory != "none":
        from bertjax import host_memory

        host_memory.keep()
    set_threads(args)
    import jax
    import torch
    import transformers

    rows = []
    for size in args.sizes:
        row = measure(size, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(
        f"\njax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}; load average {os.getloadavg()[0]:.1f}"
    )
    print("| size | batch x length | bertjax steps/s | transformers steps/s | ratio | CPU s/step bertjax | CPU s/step transformers | CPU ratio | bertjax compile (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['size']} | {row['batch']} x {row['source_length']} | {1 / row['bertjax_step_s']:.3f} | "
            f"{1 / row['transformers_step_s']:.3f} | **{row['ratio']:.2f}x** | {row['bertjax_cpu_s']:.2f} | "
            f"{row['transformers_cpu_s']:.2f} | **{row['cpu_ratio']:.2f}x** | {row['bertjax_compile_s']:.1f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
