"""A/B of `model.dense_backward`: the trainer's seq2seq step with XLA's own matmul form for the MLP
kernels' gradient ('xla', the default) and with the transpose written out first ('transpose'), and
HuggingFace BART's eager step beside them, all in one process on the same batch.

    python experiments/seq2seq_train_speed/dense_backward_ab.py --size small --batch 8 --rounds 9

The three sides alternate each round (the order reverses every other round) and each step's process
CPU seconds are recorded; prints the medians and HF's CPU seconds over each bertjax variant's (the ratio
bench.py reports). One thread per side, as bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    settings = argparse.Namespace(threads=1, xla_flags="", batch=args.batch, length=0)
    bench.set_threads(settings)  # before JAX starts: one thread per side
    config = bench.size_config(args.size, settings)
    batch = bench.batch_arrays(config, np.random.default_rng(0))
    sides = {}
    for mode in ("xla", "transpose"):
        config.model.dense_backward = mode
        sides[mode], _ = bench.bertjax_step(config, batch)
    sides["transformers"], _ = bench.transformers_step(config, batch)
    cpu = {name: [] for name in sides}
    for round_index in range(args.rounds):
        for name in list(sides) if round_index % 2 == 0 else list(sides)[::-1]:
            cpu[name].append(bench.timed(sides[name], 1)[1])
    median = {name: statistics.median(times) for name, times in cpu.items()}
    row = {
        "size": args.size,
        "batch": args.batch,
        "cpu_s": {name: round(value, 3) for name, value in median.items()},
        "cpu_s_all": {name: [round(t, 2) for t in times] for name, times in cpu.items()},
        "cpu_ratio_xla": round(median["transformers"] / median["xla"], 3),
        "cpu_ratio_transpose": round(median["transformers"] / median["transpose"], 3),
        "transpose_speedup": round(median["xla"] / median["transpose"], 3),
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
