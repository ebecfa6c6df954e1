"""The grain pipeline from prepared documents to masked pretraining batches (DESIGN.md's batch contract).

train: batch number -> the instance ids (and their epochs) at this process's positions of the shuffled
(data seed, reshuffled every epoch), endlessly repeated stream, a batch at a time (`index_shuffle`: grain's
shuffle order, vectorised) -> assemble tokens and mask (vectorised per batch) -> prefetch. Every step is a pure function of (seed, epoch, index), so the
iterator's state is just a position: `it.get_state()` / `it.set_state()` (and grain's orbax
`CheckpointSave`/`CheckpointRestore`) resume with exactly the next batch.

eval: the held-out documents' instances in order, with fixed masking (masking.MaskingSpec.from_config);
the last batch is filled up by wrapping around to the first instances so that every batch has the
same shape; finite and identical on every call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile

import grain
import numpy as np

from bertjax.data import corpus, index_shuffle, masking, noising, pretraining
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import UserError

SPLITS = ("train", "eval")
# Instance tables of the eval split use a fixed seed, so evaluation data is the same for every data seed.
EVAL_INSTANCE_SEED = masking.EVAL_SEED
# Part of the key of stored instance tables: bumped when create_instances gives other instances.
INSTANCE_TABLE_VERSION = 2
# Threads assembling batches. One: a batch is small numpy gathers from the mapped tokens and Python glue,
# so more threads cost CPU without adding throughput (measured at 20 MB of text: ~15,700 sequences per CPU second with 1 thread, ~14,000 with 2 or 4); grain's prefetch already
# runs it beside the training step, and data.num_workers adds processes.
READ_THREADS = 1

log = logging.getLogger(__name__)


class BatchBuilder:
    """Turns a [B, 2] array of (instance id, epoch) into a masked batch."""

    def __init__(self, tokens, instances, max_seq_length: int, tokenizer, masker: masking.Masker):
        self.tokens = tokens
        self.instances = instances
        self.max_seq_length = max_seq_length
        self.tokenizer = tokenizer
        self.masker = masker

    def __call__(self, ids_and_epochs: np.ndarray) -> dict[str, np.ndarray]:
        index, epoch = ids_and_epochs[:, 0], ids_and_epochs[:, 1]
        batch = pretraining.assemble(self.tokens, self.instances, index, self.max_seq_length, self.tokenizer)
        batch.update(self.masker(batch["input_ids"], epoch, index))
        return batch


@functools.lru_cache(maxsize=8)
def _prepared(data_json: str, vocab_size: int | None):
    """Tokenizer, documents and instance tables of a data config (computed once per process)."""
    import ml_collections

    config = ml_collections.ConfigDict({"data": json.loads(data_json)})
    if vocab_size is not None:
        config.model = ml_collections.ConfigDict({"vocab_size": vocab_size})
    tokenizer = tokenizer_lib.for_config(config)
    if vocab_size is not None and tokenizer.vocab_size < vocab_size:
        log.warning(
            "tokenizer %s has %d pieces but config.model.vocab_size=%d: %d embedding rows are never used "
            "(set --config.model.vocab_size=%d to drop them)",
            tokenizer.path,
            tokenizer.vocab_size,
            vocab_size,
            vocab_size - tokenizer.vocab_size,
            tokenizer.vocab_size,
        )
    documents = corpus.prepare(config, tokenizer)
    data = config.data
    instances = {}
    for split in SPLITS:
        if documents[split].num_documents == 0:
            continue
        seed = data.seed if split == "train" else EVAL_INSTANCE_SEED
        instances[split], report = instance_table(
            documents[split], corpus.cache_root(config), data.max_seq_length, data.short_seq_prob, data.sentence_objective, seed, f"the {split} split of {data.corpus!r}"
        )
        log.info("%s instances of %s: %s", split, data.corpus, json.dumps(report))
        unused = report["single_sentence_documents_unused"] + report["trailing_single_sentences_unused"]
        if unused:
            log.warning(
                "%s split of %s: %d single-sentence documents and %d single sentences left at the end of a document "
                "cannot make a sentence pair (objective %r) and are not used as segment A (objective 'none' uses them)",
                split,
                data.corpus,
                report["single_sentence_documents_unused"],
                report["trailing_single_sentences_unused"],
                data.sentence_objective,
            )
    return tokenizer, documents, instances


def instance_table(documents, root, max_seq_length: int, short_seq_prob: float, objective: str, seed: int, name: str):
    """`pretraining.create_instances` of a prepared split, computed once (a block at a time, written as
    it comes) and stored beside the prepared data, keyed by the split and the arguments; every start
    maps it from disk (all of it: about 36 bytes an instance, in the page cache, not in anonymous memory)."""
    key = corpus.cache_key([documents.key, max_seq_length, short_seq_prob, objective, seed, INSTANCE_TABLE_VERSION])
    directory = pathlib.Path(root) / "corpora" / "instances" / key
    fields = [field.name for field in dataclasses.fields(pretraining.Instances) if field.name != "objective"]
    if not (directory / "done").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        scratch = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{key}-"))
        try:
            report: dict = {}
            files = {name: open(scratch / f"{name}.bin", "wb") for name in fields}
            dtypes = {}
            with contextlib.ExitStack() as stack:
                for file in files.values():
                    stack.enter_context(file)
                for block in pretraining.instance_blocks(documents, max_seq_length, short_seq_prob, objective, seed, name, report):
                    for field in fields:
                        values = getattr(block, field)
                        dtypes[field] = values.dtype.str
                        files[field].write(values.tobytes())
            (scratch / "report.json").write_text(json.dumps(dict(report, dtypes=dtypes)))
            (scratch / "done").write_text("")
            corpus.publish(scratch, directory)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    report = json.loads((directory / "report.json").read_text())
    dtypes = report.pop("dtypes")
    arrays = {name: corpus.map_random(directory / f"{name}.bin", dtypes[name], populate=True) for name in fields}
    return pretraining.Instances(objective=objective, **arrays), report


def prepared(config):
    """(tokenizer, {split: TokenizedDocuments}, {split: Instances}) for `config`."""
    vocab_size = config.model.vocab_size if "model" in config else None
    # Masking, noising and prefetching do not change the instances: leave them out of the cache key.
    data = {key: value for key, value in config.data.to_dict().items() if key not in ("masking", "noising", "prefetch", "num_workers")}
    return _prepared(json.dumps(data, sort_keys=True), vocab_size)


def parse_shard(spec: str) -> tuple[int, int] | None:
    """'I/N' (0 <= I < N) as (I, N); '' as None."""
    if not spec:
        return None
    index, _, count = spec.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise UserError(f"--shard {spec!r}: give I/N with 0 <= I < N (this preparer's number and how many there are)")
    return int(index), int(count)


def prepare(config, shard: tuple[int, int] | None = None) -> dict:
    """`bertjax data prepare`: tokenize and store the corpus, and build the instance tables of `config`.

    With `shard` (i, n) only every n-th file from the i-th is prepared (nothing else), so that n hosts
    or processes share the work; a run without a shard afterwards finds every file prepared and only
    decides the splits and builds the instance tables. Returns a summary (one JSON line in the CLI).
    """
    if shard is not None:
        tokenizer = tokenizer_lib.for_config(config)
        corpus.prepare(config, tokenizer, shard)
        return dict(shard=f"{shard[0]}/{shard[1]}", corpus=config.data.corpus)
    tokenizer, documents, instances = prepared(config)
    summary = dict(corpus=config.data.corpus, tokenizer=tokenizer.path)
    for split in SPLITS:
        summary[f"{split}_documents"] = documents[split].num_documents
        summary[f"{split}_instances"] = len(instances[split]) if split in instances else 0
    return summary


def batches(config, split: str = "train", process_index: int | None = None, process_count: int | None = None):
    """Masked pretraining batches of this process: endless for 'train', finite for 'eval'.

    Each is a dict of int32 arrays: input_ids, token_type_ids, attention_mask [B, S];
    masked_positions, masked_ids, masked_weights [B, P]; sentence_label [B] (not for objective 'none').
    With `data.noising` (seq2seq denoising) each instance is corrupted instead: noising.Noiser.collate's
    input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels, label_weights [B, S].
    B = train.batch_size // process_count.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {SPLITS}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if config.train.batch_size % process_count:
        raise ValueError(f"config.train.batch_size={config.train.batch_size} is not divisible by the {process_count} processes")
    batch_size = config.train.batch_size // process_count
    data = config.data
    tokenizer, documents, instances = prepared(config)
    if split not in instances:
        raise corpus.CorpusError(
            f"the eval split of {data.corpus!r} is empty: set config.data.eval_fraction > 0 (with at least two documents) "
            "or config.data.eval_corpus"
        )
    table = instances[split]
    if "noising" in data:
        noiser = noising.Noiser(noising.NoisingSpec.from_config(config, split), tokenizer, data.max_seq_length)
        build = noising.BatchBuilder(documents[split], table, noiser)
    else:
        masker = masking.Masker(masking.MaskingSpec.from_config(config, split), tokenizer)
        build = BatchBuilder(documents[split].tokens, table, data.max_seq_length, tokenizer, masker)
    count = len(table)
    # Batch b of this process holds positions (b * batch_size + k) * process_count + process_index, k < batch_size,
    # of the stream: for train, grain's `MapDataset.range(count).shuffle(data.seed).repeat()` (a new permutation
    # each epoch), computed a batch at a time by index_shuffle (the same order as grain's, ~30x cheaper than
    # asking grain's dataset element by element); for eval, the instances in order, wrapped around to fill the
    # last batch. Each id is paired with its epoch, which seeds its masking.
    global_batch = batch_size * process_count
    offsets = np.arange(batch_size, dtype=np.int64) * process_count + process_index
    if split == "train":
        if not 0 <= data.seed < 2**32:
            raise UserError(f"config.data.seed={data.seed}: the data seed must be an integer in [0, 2**32)")
        num_batches = sys.maxsize // global_batch  # endless

        def batch_ids(number: int) -> np.ndarray:
            ids, epochs = index_shuffle.epoch_order(number * global_batch + offsets, count, data.seed)
            return np.stack([ids, epochs], 1)
    else:
        num_batches = -(-count // global_batch)
        if num_batches * global_batch != count:
            log.info("eval: %d instances; the last batch repeats the first %d to keep its shape", count, num_batches * global_batch - count)

        def batch_ids(number: int) -> np.ndarray:
            positions = number * global_batch + offsets
            return np.stack([positions % count, np.zeros_like(positions)], 1)
    dataset = grain.MapDataset.range(num_batches).map(batch_ids).map(build)
    # With READ_THREADS > 1 grain keeps the batches' order, so the stream is the same for any number.
    threads = min(READ_THREADS, os.cpu_count() or 1)
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(data.prefetch, threads)))
    if data.num_workers > 0:
        from absl import flags

        # grain's worker processes read absl flags; programs that are not absl apps never parse them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    return iter(iter_dataset)
