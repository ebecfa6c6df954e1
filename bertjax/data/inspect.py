"""`bertjax data stats|show`: look at the batches a config produces before spending compute on them."""

from __future__ import annotations

import itertools
import time

import numpy as np

from bertjax.config import CORRUPTIONS
from bertjax.data import loader
from bertjax.data import tokenizer as tokenizer_lib


def stats(config, split: str = "train", num_batches: int = 20) -> dict:
    """Realised statistics of `num_batches` batches of this process (one JSON-able dict); for a
    seq2seq config (one with `data.noising`), the realised corruption rates."""
    if "noising" in config.data:
        from bertjax.data import noising

        start = time.perf_counter()
        _, examples = _seq2seq_examples(config, split, num_batches * config.train.batch_size)
        seconds = time.perf_counter() - start
        configured = {key: config.data.noising[key] for key in (*CORRUPTIONS, "poisson_lambda")}
        realised = noising.realised_stats([e.record for e in examples])
        return dict(split=split, configured=configured, **realised, examples_per_second=len(examples) / seconds)
    tokenizer = loader.prepared(config)[0]
    iterator = loader.batches(config, split, process_index=0, process_count=1)
    totals = dict(examples=0, real=0, chosen=0, mask=0, random=0, keep=0, padding=0, positions=0, label_1=0, labelled=0)
    start = time.perf_counter()
    batches = 0
    for batch in itertools.islice(iterator, num_batches):
        batches += 1
        weights = batch["masked_weights"].astype(bool)
        shown = np.take_along_axis(batch["input_ids"], batch["masked_positions"], axis=1)[weights]
        original = batch["masked_ids"][weights]
        is_mask = shown == tokenizer.mask_id
        totals["examples"] += len(batch["input_ids"])
        # Masked positions hold [MASK] or a random token in input_ids: count them as the real tokens they were.
        totals["real"] += int((~tokenizer.is_special[batch["input_ids"]]).sum() + is_mask.sum())
        totals["chosen"] += int(weights.sum())
        totals["mask"] += int(is_mask.sum())
        totals["random"] += int((~is_mask & (shown != original)).sum())
        totals["keep"] += int((shown == original).sum())
        totals["padding"] += int((batch["attention_mask"] == 0).sum())
        totals["positions"] += batch["attention_mask"].size
        if "sentence_label" in batch:
            totals["label_1"] += int(batch["sentence_label"].sum())
            totals["labelled"] += len(batch["sentence_label"])
    seconds = time.perf_counter() - start
    chosen = max(totals["chosen"], 1)
    masking = config.data.masking
    return dict(
        split=split,
        batches=batches,
        examples_seen=totals["examples"],
        sentence_objective=config.data.sentence_objective,
        configured_rate=masking.eval_rate if split == "eval" else masking.rate,
        chosen_fraction=totals["chosen"] / max(totals["real"], 1),
        predictions_per_example=totals["chosen"] / max(totals["examples"], 1),
        mask_fraction=totals["mask"] / chosen,
        random_fraction=totals["random"] / chosen,
        keep_fraction=totals["keep"] / chosen,
        sentence_label_1_fraction=totals["label_1"] / totals["labelled"] if totals["labelled"] else None,
        padding_fraction=totals["padding"] / max(totals["positions"], 1),
        batches_per_second=batches / seconds if seconds > 0 else None,
    )


def _piece_text(tokenizer, token_id: int) -> str:
    piece = tokenizer.id_to_piece(token_id)
    if token_id in tokenizer.special_ids:
        return " " + piece
    if isinstance(tokenizer, tokenizer_lib.WordPieceTokenizer):
        return piece[2:] if piece.startswith("##") else " " + piece
    return piece.replace("\u2581", " ")


def render(tokenizer, batch: dict, row: int) -> str:
    """One example as text; a masked position shows what the model sees and the target: [MASK→whale]."""
    length = int(batch["attention_mask"][row].sum())
    targets = {
        int(p): int(t) for p, t, w in zip(batch["masked_positions"][row], batch["masked_ids"][row], batch["masked_weights"][row]) if w
    }
    parts = []
    for position in range(length):
        token_id = int(batch["input_ids"][row, position])
        if position in targets:
            shown = _piece_text(tokenizer, token_id).strip()
            target = _piece_text(tokenizer, targets[position])
            parts.append(f"{' ' if target.startswith(' ') else ''}[{shown}\u2192{target.strip()}]")
        else:
            parts.append(_piece_text(tokenizer, token_id))
    return "".join(parts).strip()


def _seq2seq_examples(config, split: str, count: int):
    """The tokenizer and the first `count` seq2seq examples of `split` (instance order, epoch 0):
    chunks of whole sentences (as sentence_objective 'none' gathers them), corrupted by `data.noising`."""
    from bertjax.data import corpus, noising

    tokenizer, documents, instances = loader.prepared(config)
    if split not in instances:
        raise corpus.CorpusError(f"the {split} split of {config.data.corpus!r} is empty: set config.data.eval_fraction > 0 or config.data.eval_corpus")
    index = np.arange(min(count, len(instances[split])))
    noiser = noising.Noiser(noising.NoisingSpec.from_config(config, split), tokenizer, config.data.max_seq_length)
    return tokenizer, noiser.examples(noising.chunks(documents[split], instances[split], index), 0, index)


def show(config, split: str = "train", num_examples: int = 3) -> str:
    """The first `num_examples` examples of `split`, decoded, with segment labels and masks marked
    (seq2seq: the corrupted source above the target)."""
    if "noising" in config.data:
        tokenizer, examples = _seq2seq_examples(config, split, num_examples)
        lines = []
        for number, example in enumerate(examples):
            record = example.record
            lines.append(f"--- example {number} ({len(example.target)} target tokens, {len(example.source)} source tokens, rotation offset {record['rotation_offset']})")
            lines.append("source: " + "".join(_piece_text(tokenizer, int(i)) for i in example.source).strip())
            lines.append("target: " + "".join(_piece_text(tokenizer, int(i)) for i in example.target).strip())
        return "\n".join(lines)
    tokenizer = loader.prepared(config)[0]
    lines = []
    shown = 0
    for batch in loader.batches(config, split, process_index=0, process_count=1):
        for row in range(len(batch["input_ids"])):
            if shown == num_examples:
                return "\n".join(lines)
            label = f" sentence_label={int(batch['sentence_label'][row])}" if "sentence_label" in batch else ""
            predictions = int(batch["masked_weights"][row].sum())
            lines.append(f"--- example {shown} ({int(batch['attention_mask'][row].sum())} tokens, {predictions} predictions{label})")
            lines.append(render(tokenizer, batch, row))
            shown += 1
    return "\n".join(lines)
