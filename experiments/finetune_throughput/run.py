"""How fast does bertjax fine-tune, against transformers fine-tuning the same model on the same batches?

  python experiments/finetune_throughput/run.py                       # mini (L4/H256), SST-2, seq 128, batch 32
  python experiments/finetune_throughput/run.py --seq-len 64 --steps 30 --rounds 3

Both sides start from the same weights (a random bertjax mini encoder written as a HuggingFace
directory with `bertjax.convert.hf.save` and read by `BertForSequenceClassification.from_pretrained`)
and train on the same SST-2 batches (tokenised once, by a sentencepiece model trained on SST-2):
bertjax with `bertjax.train.finetune`'s own state and jitted step (AdamW, gradient clipping,
dropout), transformers with torch AdamW, gradient clipping and dropout (model.train()). Compilation
and the first steps are excluded; the rounds alternate between the two so that the machine's load
affects both alike. Prints one JSON line per round and the median examples/second and ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys

from bertjax import host_memory

if "--no-keep-memory" not in sys.argv:
    host_memory.keep()  # before numpy, JAX or torch start threads, as bertjax.cli.main does

import jax
import numpy as np
from flax import linen as nn

from bertjax import config as config_lib
from bertjax import models
from bertjax.convert import hf
from bertjax.data import tasks
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.train import finetune
from bertjax.train import state as state_lib

REPO = pathlib.Path(__file__).resolve().parents[2]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared-data", default=os.environ.get("BERTJAX_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--size", default="mini")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--no-keep-memory", action="store_true",
        help="let glibc unmap XLA's freed temporaries between steps (by default both sides, which share this process, run with "
        "bertjax.host_memory.keep(), as the bertjax command does)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=8192)
    return parser.parse_args()


def sst2_batches(args, scratch: pathlib.Path):
    """(tokenizer, labels, records, [batch dicts of numpy arrays]) from the start of SST-2 train."""
    train_file = pathlib.Path(args.shared_data) / "glue/SST-2/train.tsv"
    records = tasks.read_tsv(train_file, "text", None, "label")
    tok = tokenizer_lib.load(tokenizer_lib.train_from_sentences((r.texts[0] for r in records), args.vocab_size, scratch / "tok"))
    labels = tasks.Labels.from_records(r.label for r in records)
    count = (args.steps + args.warmup) * args.batch_size
    features = tasks.encode_classification(tok, records[:count], args.seq_len, labels)
    batches = [{name: value[i : i + args.batch_size] for name, value in features.items()} for i in range(0, count, args.batch_size)]
    return tok, labels, batches


def finetune_config(args, vocab_size: int):
    config = config_lib.load(f"{REPO / 'configs' / 'finetune.py'}:sst2")
    config.model = config_lib.model_config(args.size)
    config.model.vocab_size = vocab_size
    config.data.max_seq_length = args.seq_len
    config.train.batch_size = args.batch_size
    config.optim.lr = 2e-5
    return config


class BertjaxRunner:
    def __init__(self, config, labels, pretrained, batches):
        placement = finetune.Placement.from_config(config)
        model = finetune.build_model(config, labels)
        self.state, spec, tx, _ = finetune.create_state(config, model, 0, 10_000, placement, pretrained)
        self.step = finetune.make_train_step(config, model, tx, spec, placement)
        keys = finetune.MODEL_INPUTS + finetune.TARGETS["single"]
        self.batches = [placement.batch({name: batch[name] for name in keys}) for batch in batches]
        self.key = jax.random.key(0)
        self.count = 0

    def run(self, batches) -> None:
        loss = None
        for batch in batches:
            self.count += 1
            self.state, loss = self.step(self.state, batch, jax.random.fold_in(self.key, self.count))
        jax.block_until_ready(loss)


class TransformersRunner:
    def __init__(self, hf_dir, batches, lr: float):
        import torch
        import transformers

        torch.manual_seed(0)
        self.torch = torch
        self.model = transformers.BertForSequenceClassification.from_pretrained(hf_dir, num_labels=2)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.01, eps=1e-6)
        self.batches = [
            dict(
                input_ids=torch.from_numpy(b["input_ids"].astype(np.int64)),
                token_type_ids=torch.from_numpy(b["token_type_ids"].astype(np.int64)),
                attention_mask=torch.from_numpy(b["attention_mask"].astype(np.int64)),
                labels=torch.from_numpy(b["label"].astype(np.int64)),
            )
            for b in batches
        ]

    def run(self, batches) -> None:
        for batch in batches:
            loss = self.model(**batch).loss
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def timed(runner, args) -> float:
    """Examples per second over `args.steps` steps, after `args.warmup` untimed ones."""
    runner.run(runner.batches[: args.warmup])
    start = time.perf_counter()
    runner.run(runner.batches[args.warmup : args.warmup + args.steps])
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        tok, labels, batches = sst2_batches(args, scratch)
        config = finetune_config(args, tok.vocab_size)
        encoder = models.BertForPreTraining(models.BertConfig.from_config(config.model))
        params = nn.meta.unbox(encoder.init(jax.random.key(0), *state_lib.example_inputs(1, 16))["params"])
        hf.save(encoder, {"params": params}, scratch / "hf")
        runners = {
            "bertjax": BertjaxRunner(config, labels, params, batches),
            "transformers": TransformersRunner(scratch / "hf", batches, config.optim.lr),
        }
        setting = dict(size=args.size, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, devices=jax.device_count())
        rates = {name: [] for name in runners}
        for round_index in range(args.rounds):
            for name, runner in runners.items():
                rates[name].append(timed(runner, args))
                print(json.dumps(dict(round=round_index, framework=name, examples_per_second=round(rates[name][-1], 2), **setting)), flush=True)
        medians = {name: statistics.median(values) for name, values in rates.items()}
        print(
            json.dumps(
                dict(
                    bertjax_examples_per_second=round(medians["bertjax"], 2),
                    transformers_examples_per_second=round(medians["transformers"], 2),
                    ratio=round(medians["bertjax"] / medians["transformers"], 3),
                    **setting,
                )
            )
        )


if __name__ == "__main__":
    main()
