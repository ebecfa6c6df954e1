"""How fast does the data pipeline turn the prepared token cache into masked batches?

  python experiments/data_throughput/run.py                         # default corpus (python-docs)
  python experiments/data_throughput/run.py --corpus "$BERTJAX_SHARED_DATA/corpus/*.txt"

Measures, at sequence length 128 and after the corpus is prepared (preparation is cached and not
timed): sequences per second of `bertjax.data.batches` (instances -> shuffled, assembled, masked
int32 batches, through grain) for token-level, whole-word and span masking, and of transformers'
`DataCollatorForLanguageModeling` (padding + 80/10/10 masking at 15%) on the same token ids, already
assembled into sequences (so the collator is spared the pairing work ours includes). Prints one
JSON line per measurement and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

from bertjax import config as config_lib
from bertjax.data import loader


def build_config(args, **masking):
    config = config_lib.pretrain_config("tiny")
    config.data.corpus = args.corpus
    config.data.max_seq_length = 128
    config.data.max_predictions = 20
    config.train.batch_size = args.batch_size
    config.data.masking.update(masking)
    return config_lib.validate(config)


def time_loader(config, num_batches: int) -> float:
    iterator = loader.batches(config, "train", process_index=0, process_count=1)
    for _ in range(5):  # warm-up: thread start, first prefetches
        next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return num_batches * config.train.batch_size / (time.perf_counter() - start)


def hf_collator_rate(config, num_batches: int, return_tensors: str) -> float:
    import tokenizers
    import transformers

    tokenizer, documents, instances = loader.prepared(config)
    # The same vocabulary as a transformers tokenizer, so the collator knows the special and [MASK] ids.
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({p: i for i, p in enumerate(tokenizer.pieces)}, unk_token="[UNK]"))
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    collator = transformers.DataCollatorForLanguageModeling(hf_tokenizer, mlm=True, mlm_probability=0.15, return_tensors=return_tensors)
    batch_size = config.train.batch_size
    rng = np.random.default_rng(0)
    table = instances["train"]
    # The same token ids, already laid out as [CLS] A [SEP] B [SEP] and unpadded, as a tokenized HF dataset holds them.
    from bertjax.data import pretraining

    index = rng.permutation(len(table))[: batch_size * 4]
    assembled = pretraining.assemble(documents["train"].tokens, table, index, config.data.max_seq_length, tokenizer)
    features = [
        {"input_ids": ids[: int(mask.sum())].tolist(), "token_type_ids": types[: int(mask.sum())].tolist(), "next_sentence_label": int(label)}
        for ids, types, mask, label in zip(assembled["input_ids"], assembled["token_type_ids"], assembled["attention_mask"], assembled["sentence_label"])
    ]
    collator(features[:batch_size])
    start = time.perf_counter()
    for step in range(num_batches):
        collator(features[(step % 4) * batch_size : (step % 4 + 1) * batch_size])
    return num_batches * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="python-docs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    results = {}
    for name, masking in (("token", {}), ("whole_word", {"whole_word": True}), ("span", {"span": True})):
        results[name] = time_loader(build_config(args, **masking), args.batches)
        print(json.dumps({"pipeline": f"bertjax.data.batches ({name} masking)", "sequences_per_second": round(results[name])}))
    for return_tensors in ("pt", "np"):
        rate = hf_collator_rate(build_config(args), args.batches, return_tensors)
        results[f"hf_{return_tensors}"] = rate
        print(json.dumps({"pipeline": f"transformers DataCollatorForLanguageModeling (return_tensors={return_tensors})", "sequences_per_second": round(rate)}))
    print(
        json.dumps(
            {
                "speedup_vs_hf_collator_pt": round(results["token"] / results["hf_pt"], 2),
                "speedup_vs_hf_collator_np": round(results["token"] / results["hf_np"], 2),
                "meets_6000_per_second": results["token"] >= 6000,
                "cpu_cores": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
